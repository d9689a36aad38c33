"""The one-shot sync stores in a forked process: once, quarantining, failing in one line."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import event, update

from cli.sync import one_line_failure
from mailpipe import db
from mailpipe.errors import MailpipeError
from mailpipe.models import FolderState
from mailpipe.sync import BATCH_BYTES, StoreProcess
from tests.support.messages import plain_message as message
from tests.test_sync import make_mailbox

NOT_A_MESSAGE = b"\xd0\xcf\x11\xe0 an Outlook .msg file, not RFC 5322\r\n"
SQLITE_NORMAL = 1  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL
SMALL_BATCHES = 5_000  # bytes: three messages of 2,000 bytes make two batches


class TimeLimitHit(Exception):
    """Stands in for a time limit or Ctrl-C raised into the fetching process."""


def in_the_store_process(mailbox, action) -> None:
    """Run `action(statement)` in the storing process before each statement it sends (the
    forked child inherits the engine's listeners; this process is left alone)."""
    here = os.getpid()

    def before(conn, cursor, statement, parameters, context, executemany) -> None:
        if os.getpid() != here:
            action(statement)

    event.listen(mailbox.sessions.kw["bind"], "before_cursor_execute", before)


def pid_recorder(path: Path):
    """An action that writes down the process it runs in."""

    def record(statement: str) -> None:
        with path.open("a") as out:
            out.write(f"{os.getpid()}\n")

    return record


def pids(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()}


def gone(pid: int) -> bool:
    """Whether the process has ended and been waited for (no zombie left behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def database(tmp_path) -> Path:
    return tmp_path / "mailpipe.db"


@pytest.fixture
def mailbox(dovecot, database):
    return make_mailbox(dovecot, f"sqlite:///{database}")


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_storing_runs_in_another_process_stores_once_and_quarantines(dovecot, db_url, tmp_path):
    # Given five messages and one that is no mail at all, in several batches
    mailbox = make_mailbox(dovecot, db_url)
    sent = [message(i, size=2_000 + 8_000 * (i % 2)) for i in range(5)] + [NOT_A_MESSAGE]
    mailbox.deliver(sent)
    seen = tmp_path / "pids"
    in_the_store_process(mailbox, pid_recorder(seen))
    # When the one-shot sync stores in a process of its own
    first = mailbox.sync(store_process=True, batch_bytes=SMALL_BATCHES)
    # Then every batch was written by one other process, which has ended
    (child,) = pids(seen)
    assert child != os.getpid()
    assert gone(child)
    # And each message is stored once, the odd one quarantined, with counts from the child
    assert (first.fetched, first.saved, first.duplicates, first.quarantined) == (6, 6, 0, 1)
    assert [e.uid for e in mailbox.stored()] == [1, 2, 3, 4, 5, 6]
    assert [e.status for e in mailbox.stored()].count("quarantined") == 1
    # And the mail crossed the pipe whole (out of band, store.Clear): each row decrypts to the
    # message sent
    assert [mailbox.plaintext(e).replace(b"\r\n", b"\n") for e in mailbox.stored()] == [
        raw.replace(b"\r\n", b"\n") for raw in sent
    ]
    assert {"parse", "save"} <= set(first.phases)  # the child's phases are told here
    # When the folder's position is lost and everything is fetched again
    with mailbox.sessions.begin() as session:
        session.execute(update(FolderState).values(last_uid=0, uidnext=0))
    again = mailbox.sync(store_process=True, batch_bytes=SMALL_BATCHES)
    # Then nothing is stored twice
    assert (again.fetched, again.saved, again.duplicates) == (6, 0, 6)
    assert len(mailbox.stored()) == 6


def test_a_database_error_in_the_store_process_is_raised_here_as_one_classified_line(
    mailbox, database, capsys
):
    # Given a database whose emails table disappears while the storing process works
    mailbox.deliver([message(i, size=2_000) for i in range(4)])

    def drop_emails(statement: str) -> None:
        if statement.startswith("UPDATE mail_accounts"):  # a batch's first, before any lock
            with sqlite3.connect(database) as connection:
                connection.execute("DROP TABLE IF EXISTS emails")

    in_the_store_process(mailbox, drop_emails)
    # When the one-shot sync runs
    with pytest.raises(MailpipeError, match="unexpected OperationalError") as raised:
        mailbox.sync(store_process=True, batch_bytes=SMALL_BATCHES)
    # Then the error comes back (SQLAlchemy's errors do not pickle: as a stand-in), with the
    # child's traceback as a note
    assert any("no such table: emails" in note for note in raised.value.__notes__)
    # And the command prints it as one classified line
    one_line_failure("sync", raised.value, host="imap.example.org", debug=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["mailpipe: sync failed (unknown): unexpected OperationalError"]


def test_a_store_process_that_dies_ends_the_sync_with_one_line(mailbox, capsys):
    # Given a storing process that dies in the middle of a batch
    mailbox.deliver([message(i, size=2_000) for i in range(4)])

    def die(statement: str) -> None:
        if statement.startswith("INSERT INTO emails"):
            os._exit(3)

    in_the_store_process(mailbox, die)
    # When the one-shot sync runs
    with pytest.raises(MailpipeError, match="ended unexpectedly") as raised:
        mailbox.sync(store_process=True, batch_bytes=SMALL_BATCHES)
    one_line_failure("sync", raised.value, host="imap.example.org", debug=False)
    # Then the command says so in one line, and nothing of the cut batch is stored
    (line,) = capsys.readouterr().err.splitlines()
    assert "(unknown): the process storing the mail ended unexpectedly (exit 3)" in line
    assert mailbox.stored() == []


def test_a_time_limit_in_the_fetching_process_ends_the_store_process_too(mailbox, tmp_path):
    # Given a storing process that hangs on the first batch
    mailbox.deliver([message(i, size=2_000) for i in range(6)])
    seen = tmp_path / "pids"
    record = pid_recorder(seen)

    def hang(statement: str) -> None:
        record(statement)
        time.sleep(60)

    in_the_store_process(mailbox, hang)

    def time_limit(signum, frame) -> None:
        raise TimeLimitHit

    previous = signal.signal(signal.SIGALRM, time_limit)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.monotonic()
    try:
        # When the time limit interrupts the fetching process
        with pytest.raises(TimeLimitHit):
            mailbox.sync(store_process=True, batch_bytes=SMALL_BATCHES)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # Then the sync ends within the drain time, and the storing process has ended with it
    assert time.monotonic() - started < StoreProcess.DRAIN_SECONDS + 5
    (child,) = pids(seen)
    assert gone(child)


def test_a_sqlite_connection_holds_a_whole_batch_before_its_commit(tmp_path):
    # Given the engine of a new SQLite database
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        # When a connection is made
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            # Then it writes ahead, syncs only at checkpoints, and keeps 16 MiB of pages, twice
            # a batch's bound of mail, so a batch is written at its commit, not spilled first
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA synchronous").scalar() == SQLITE_NORMAL
            assert -pragma("PRAGMA cache_size").scalar() * 1024 >= 2 * BATCH_BYTES
    finally:
        engine.dispose()
