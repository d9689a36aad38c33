"""What keeping folder names and Message-IDs from the database costs: per stored message, the
conversion of rows from before migration 0013, and the check every sync start makes.

Run from the repository root: `python -m bench.names [--rows N] [--runs N]`. On a fresh SQLite
database: (1) building the row of a 20 kB message with and without its sealed name columns
(two HMACs, two AES-GCM encryptions), side by side; (2) converting N clear rows of one account
(`names.convert_account`), in rows per second; (3) the check that finds nothing left to convert,
against the whole `store.folder_states` a sync starts with, which includes it. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import insert

from mailpipe import db, names, store
from mailpipe.accounts import add_account, create_user
from mailpipe.fetch import FetchedMessage
from mailpipe.imap import ImapSettings
from mailpipe.models import Email, FolderState, utcnow
from mailpipe.parse import parse_message
from tests.support.messages import plain_message

FOLDERS = 10
REPEAT = 2_000  # row builds per timing


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def seed(sessions, key, rows: int) -> int:
    """One account with `rows` emails rows and FOLDERS positions, names in clear (before 0013)."""
    with sessions.begin() as session:
        owner, _ = create_user(session, f"u{uuid.uuid4().hex[:8]}", "pw", iterations=1_000)
        settings = ImapSettings(host="h", username="x", password="y", security="none")
        account_id = add_account(session, owner, key, settings).id
        session.execute(
            insert(FolderState),
            [
                {"account_id": account_id, "folder": f"Ordner {f}", "uidvalidity": 1}
                for f in range(FOLDERS)
            ],
        )
        session.execute(
            insert(Email),
            [
                {
                    "id": uuid.uuid4(),
                    "account_id": account_id,
                    "folder": f"Ordner {i % FOLDERS}",
                    "uidvalidity": 1,
                    "uid": i + 1,
                    "message_id": f"<m{i}@example.org>",
                    "flags": "",
                    "size": 0,
                    "content_hash": uuid.uuid4().bytes * 2,
                    "raw_enc": b"",
                    "status": "parsed",
                    "fetched_at": utcnow(),
                }
                for i in range(rows)
            ],
        )
    return account_id


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.names", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        engine = db.make_engine(f"sqlite:///{Path(workdir) / 'names.db'}")
        db.migrate(engine)
        sessions = db.session_factory(engine)
        with sessions.begin() as session:
            _owner, key = create_user(session, "bench", "pw", iterations=1_000)
        raw = plain_message(1, size=20_000)
        message = FetchedMessage(uid=1, body=raw, flags=(), internal_date=utcnow(), size=len(raw))
        parsed = parse_message(raw)
        writer = store.BatchWriter(sessions, account_id=1, key=key, folder="INBOX")
        whole, names_only = [], []
        ids = [uuid.uuid4() for _ in range(REPEAT)]
        for _ in range(args.runs):
            started = time.perf_counter()
            for row_id in ids:
                writer._row(1, row_id, message, parsed, None)
            whole.append((time.perf_counter() - started) / REPEAT)
            started = time.perf_counter()
            for row_id in ids:
                names.email_columns(
                    key,
                    row_id=row_id,
                    folder="INBOX",
                    message_id=parsed.message_id,
                    hashed=writer.folder_hash,
                )
            names_only.append((time.perf_counter() - started) / REPEAT)
        row, name = median_ms(whole), median_ms(names_only)
        print(f"row of a 20 kB message:       median {row * 1000:8.1f} us")
        print(f"  of which folder/Message-ID: median {name * 1000:8.1f} us ({name / row:.1%})")

        converting, checking, reading = [], [], []
        for _ in range(args.runs):
            account_id = seed(sessions, key, args.rows)
            with sessions.begin() as session:
                started = time.perf_counter()
                changed = names.convert_account(session, account_id=account_id, key=key)
                converting.append(time.perf_counter() - started)
            assert changed == args.rows + FOLDERS, changed
            with sessions() as session:
                started = time.perf_counter()
                states = store.folder_states(session, account_id, key)
                reading.append(time.perf_counter() - started)
                started = time.perf_counter()
                assert names.convert_account(session, account_id=account_id, key=key) == 0
                checking.append(time.perf_counter() - started)
            assert len(states) == FOLDERS
        engine.dispose()
    convert = statistics.median(converting)
    print(
        f"conversion of {args.rows} rows:   median {convert * 1000:8.1f} ms "
        f"({args.rows / convert:,.0f} rows/s)"
    )
    check, total = median_ms(checking), median_ms(reading)
    print(f"folder_states, converted:     median {total:8.2f} ms")
    print(f"  of which the check:         median {check:8.2f} ms ({check / total:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
