"""Re-sync cost of flag and expunge sync, side by side, on a real Dovecot.

Run from the repository root (as root, Dovecot installed): `python -m bench.resync` (`make
bench`). It seeds one folder with --messages synthetic messages, syncs it once into SQLite, then
for each of --runs repetitions times three re-syncs in this process, interleaved:
  no-change  nothing happened on the server since the last sync (the poll: one EXAMINE);
  changed    --flags messages changed flags and --vanished were expunged since the last sync
             (CONDSTORE/QRESYNC: ENABLE and one UID FETCH ... CHANGEDSINCE ... VANISHED);
  full       the same changes learnt by a full flag refresh (`UID FETCH 1:n (UID FLAGS)`, what
             a server without CONDSTORE needs when its message count disagrees).
It prints median wall seconds, IMAP commands after login, and each ratio to the no-change poll.
"""

from __future__ import annotations

import argparse
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import update

from mailpipe import db, imap
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import FolderState
from mailpipe.sync import SyncResult, sync_account
from tests.support.dovecot import Dovecot

ROWS = ("no-change", "changed", "full")


class Counted:
    """imap.connect that counts the commands each connection sends after login."""

    def __init__(self) -> None:
        self.commands = 0

    def connect(self, settings: ImapSettings):
        client = imap.connect(settings)
        send = client._imap.send

        def counting_send(data: bytes) -> None:
            self.commands += 1
            send(data)

        client._imap.send = counting_send
        return client


def main(argv: list[str] | None = None) -> int:
    """Seed, sync once, then time the three kinds of re-sync run by run and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.resync", description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000, help="folder size (10000)")
    parser.add_argument("--flags", type=int, default=100, help="flag changes per run (100)")
    parser.add_argument("--vanished", type=int, default=10, help="expunges per run (10)")
    parser.add_argument("--runs", type=int, default=5, help="repetitions; medians shown (5)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-resync-"))
    try:
        with Dovecot.start(Path(tempfile.gettempdir())) as server:
            return _run(args, server, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, server: Dovecot, workdir: Path) -> int:
    user, password = server.new_user()
    server.seed_maildir(user, args.messages)
    engine = db.make_engine(f"sqlite:///{workdir / 'mailpipe.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(
        host=server.host, port=server.port, username=user, password=password, security="none"
    )
    with sessions.begin() as session:
        owner, key = create_user(session, "bench", "pw", iterations=1000)
        account_id = add_account(session, owner, key, settings).id

    def sync(counter: Counted | None = None) -> SyncResult:
        return sync_account(
            sessions,
            account_id=account_id,
            key=key,
            settings=settings,
            connect=counter.connect if counter else imap.connect,
        )

    started = time.perf_counter()
    initial = sync()
    print(
        f"seeded and synced {initial.saved} messages in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    rnd = random.Random(1)
    seconds: dict[str, list[float]] = {name: [] for name in ROWS}
    phases: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
    commands: dict[str, int] = {}

    def change_server() -> None:
        with server.session(user, password) as client:
            client.select_folder("INBOX")
            uids = client.search("ALL")
            picked = rnd.sample(uids, args.flags + args.vanished)
            flagged, gone = picked[: args.flags], picked[args.flags :]
            client.add_flags(flagged[: len(flagged) // 2], [b"\\Flagged"])
            client.remove_flags(flagged[len(flagged) // 2 :], [b"\\Flagged"])
            client.add_flags(flagged[len(flagged) // 2 :], [b"\\Seen"])
            client.delete_messages(gone)
            client.uid_expunge(gone)

    def forget_modseq() -> None:
        with sessions.begin() as session:
            session.execute(update(FolderState).values(highestmodseq=0))

    def timed(name: str, prepare: Callable[[], None] | None, expect_vanished: int) -> None:
        if prepare is not None:
            prepare()
        counter = Counted()
        start = time.perf_counter()
        result = sync(counter)
        seconds[name].append(time.perf_counter() - start)
        phases[name].append(result.phases)
        commands[name] = counter.commands
        if result.vanished != expect_vanished or result.saved:
            raise SystemExit(f"{name}: unexpected result {result.to_json()}")

    for run in range(args.runs):
        timed("no-change", None, 0)
        timed("changed", change_server, args.vanished)
        timed("full", lambda: (change_server(), forget_modseq()), args.vanished)
        print(f"run {run + 1}/{args.runs} done", flush=True)
    version = subprocess.run(
        ["/usr/sbin/dovecot", "--version"], capture_output=True, text=True, check=False
    ).stdout.split(" ")[0]
    print(
        f"\n{args.messages} messages, {args.flags} flag changes and {args.vanished} expunges per "
        f"changed run, median of {args.runs}, Dovecot {version or '?'} on loopback, SQLite, "
        f"Python {platform.python_version()}"
    )
    base = statistics.median(seconds["no-change"])
    print(f"{'re-sync':12} {'median s':>9} {'commands after login':>21} {'x no-change':>12}")
    for name in ROWS:
        median = statistics.median(seconds[name])
        print(f"{name:12} {median:9.4f} {commands[name]:21d} {median / base:12.2f}")
    for name in ROWS:
        names = list(dict.fromkeys(k for p in phases[name] for k in p))
        parts = [
            f"{n} {statistics.median([p.get(n, 0.0) for p in phases[name]]) * 1000:.1f} ms"
            for n in names
        ]
        print(f"  phases, {name}: {', '.join(parts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
