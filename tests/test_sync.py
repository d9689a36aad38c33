"""The sync engine against a real Dovecot: incremental, idempotent, never marking mail \\Seen."""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select, update

from mailpipe import db, imap, names, store
from mailpipe.accounts import add_account, create_user
from mailpipe.crypto import DataKey
from mailpipe.imap import ImapSettings
from mailpipe.models import Email, FolderState
from mailpipe.observer import Observer
from mailpipe.sync import Pipeline, SyncOptions, sync_account
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK

FAST_KDF = 1_000


@dataclass
class Mailbox:
    """A Dovecot user and a mailpipe account syncing it into a fresh database."""

    dovecot: object
    user: str
    password: str
    sessions: object
    account_id: int
    key: DataKey

    def deliver(self, messages, folder: str = "INBOX") -> list[int]:
        return self.dovecot.append(self.user, self.password, messages, folder=folder)

    def sync(self, **options):
        connect = options.pop("connect", imap.connect)
        observer = options.pop("observer", None)
        return sync_account(
            self.sessions,
            account_id=self.account_id,
            key=self.key,
            options=SyncOptions(**options),
            connect=connect,
            observer=observer,
            policy=LOOPBACK,
        )

    def stored(self, **where) -> list[Email]:
        with self.sessions() as session:
            query = select(Email).where(Email.account_id == self.account_id)
            for name, value in where.items():
                if name == "folder":  # stored as a keyed hash (mailpipe.names)
                    name, value = "folder_hash", names.folder_hash(self.key, value)
                query = query.where(getattr(Email, name) == value)
            return list(session.scalars(query.order_by(Email.uid)))

    def plaintext(self, email: Email) -> bytes:
        return self.key.decrypt(email.raw_enc, table="emails", column="raw", row=email.id)


def make_mailbox(dovecot, db_url: str, *, security: str = "none", **settings) -> Mailbox:
    user, password = dovecot.new_user()
    engine = db.make_engine(db_url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    port = dovecot.tls_port if security == "tls" else dovecot.port
    with sessions.begin() as session:
        owner, key = create_user(session, f"owner-{user}", "pw", iterations=FAST_KDF)
        account = add_account(
            session,
            owner,
            key,
            ImapSettings(
                host=dovecot.host,
                port=port,
                username=user,
                password=password,
                security=security,
                ca_file=str(dovecot.ca_file),
                **settings,
            ),
        )
    return Mailbox(dovecot, user, password, sessions, account.id, key)


@pytest.fixture
def mailbox(dovecot, tmp_path) -> Mailbox:
    return make_mailbox(dovecot, f"sqlite:///{tmp_path / 'mailpipe.db'}")


class Recorder:
    """Wraps imap.connect and records each command the client sends after login."""

    def __init__(self) -> None:
        self.commands: list[bytes] = []
        self.writes = 0  # sends, each a burst of one or more commands
        self.before_send = None

    def connect(self, settings):
        client = imap.connect(settings)
        send = client._imap.send

        def recording_send(data: bytes) -> None:
            self.writes += 1
            for line in data.splitlines():  # pipelined commands come in one write
                words = line.strip().split(b" ", 3)
                if len(words) > 1:
                    name = words[1].upper()
                    self.commands.append(words[2].upper() if name == b"UID" else name)
            if self.before_send is not None:
                self.before_send(data)
            send(data)

        client._imap.send = recording_send
        return client


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_first_sync_stores_everything_then_only_what_is_new(dovecot, db_url):
    # Given a mailbox with five messages
    box = make_mailbox(dovecot, db_url)
    box.deliver([message(i) for i in range(5)])
    # When it is synced
    first = box.sync()
    # Then all five are stored, encrypted, parsed
    assert (first.fetched, first.saved, first.duplicates) == (5, 5, 0)
    stored = box.stored()
    assert [e.status for e in stored] == ["parsed"] * 5
    assert b"Inhalt 3" in box.plaintext(stored[3])
    assert b"Inhalt 3" not in stored[3].raw_enc
    parsed = json.loads(
        box.key.decrypt(stored[0].parsed_enc, table="emails", column="parsed", row=stored[0].id)
    )
    assert parsed["subject"] == "Nachricht 0"
    # When two more arrive and it syncs again
    box.deliver([message(5), message(6)])
    second = box.sync()
    # Then only the two new ones are fetched
    assert (second.fetched, second.saved) == (2, 2)
    assert [e.uid for e in box.stored()] == [1, 2, 3, 4, 5, 6, 7]
    # And a third run finds the folder unchanged
    third = box.sync()
    assert third.folders[0].unchanged
    assert third.fetched == 0


def test_unchanged_folder_costs_one_select_and_no_search_or_fetch(mailbox):
    mailbox.deliver([message(i) for i in range(3)])
    mailbox.sync()
    recorder = Recorder()
    result = mailbox.sync(connect=recorder.connect)
    assert result.folders[0].unchanged
    # LOGIN is sent before the recorder is attached; what follows is the whole conversation
    assert recorder.commands == [b"EXAMINE", b"LOGOUT"]


def test_sync_never_marks_mail_seen(mailbox, dovecot):
    uids = mailbox.deliver([message(i) for i in range(3)])
    mailbox.sync()
    with dovecot.session(mailbox.user, mailbox.password) as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags(uids)
    assert all(b"\\Seen" not in f for f in flags.values())


def test_flags_and_internal_date_are_kept(mailbox, dovecot):
    with dovecot.session(mailbox.user, mailbox.password) as client:
        client.append("INBOX", message(1), flags=[b"\\Flagged", b"\\Seen"])
    mailbox.sync()
    [email] = mailbox.stored()
    assert set(email.flags.split()) >= {"\\Flagged", "\\Seen"}
    assert email.internal_date is not None
    assert email.size == len(message(1)) or email.size > 0


def test_changed_uidvalidity_resyncs_without_duplicates(mailbox, dovecot):
    # Given a folder synced once
    mailbox.deliver([message(i) for i in range(4)])
    mailbox.sync()
    old = mailbox.stored()
    # When the server gives the folder a new UIDVALIDITY
    new_validity = dovecot.change_uidvalidity(mailbox.user)
    result = mailbox.sync()
    # Then the same mail is recognised, moved to the new UIDs, and nothing is stored twice
    assert result.folders[0].uidvalidity_changed
    assert (result.saved, result.duplicates) == (0, 4)
    now = mailbox.stored()
    assert len(now) == 4
    assert {e.id for e in now} == {e.id for e in old}
    assert {e.uidvalidity for e in now} == {new_validity}
    assert [mailbox.plaintext(e) for e in now] == [mailbox.plaintext(e) for e in old]


def test_message_expunged_between_listing_and_fetch_is_skipped(mailbox, dovecot):
    uids = mailbox.deliver([message(i) for i in range(5)])
    recorder = Recorder()

    def expunge_before_body_fetch(data: bytes) -> None:
        if b"BODY.PEEK[]" in data and recorder.before_send is not None:
            recorder.before_send = None
            dovecot.expunge(mailbox.user, mailbox.password, [uids[2]])

    recorder.before_send = expunge_before_body_fetch
    result = mailbox.sync(connect=recorder.connect)
    assert result.folders[0].expunged == 1
    assert [e.uid for e in mailbox.stored()] == [uids[0], uids[1], uids[3], uids[4]]


def test_max_mails_caps_a_run_and_the_next_run_continues(mailbox):
    mailbox.deliver([message(i) for i in range(10)])
    first = mailbox.sync(max_mails=4)
    assert first.saved == 4
    assert not first.folders[0].complete
    second = mailbox.sync()
    assert second.saved == 6
    assert sorted(e.uid for e in mailbox.stored()) == list(range(1, 11))
    assert mailbox.sync().folders[0].unchanged


class BatchCounter(Observer):
    def __init__(self, fail_at: int | None = None) -> None:
        self.batches: list[int] = []
        self.phases: set[str] = set()
        self.fail_at = fail_at

    def after_phase(self, phase, seconds):
        self.phases.add(phase)

    def after_batch(self, *, fetched, fetched_bytes, saved, duplicates, quarantined):
        self.batches.append(fetched)
        if self.fail_at is not None and len(self.batches) == self.fail_at:
            raise RuntimeError("crash after a committed batch")


def test_batches_are_bounded_by_bytes(mailbox):
    mailbox.deliver([message(i, size=3_000) for i in range(12)])
    counter = BatchCounter()
    result = mailbox.sync(batch_bytes=10_000, observer=counter)
    assert result.saved == 12
    assert len(counter.batches) >= 4
    assert max(counter.batches) <= 3
    assert {"connect", "diagnostics", "folder_list", "fetch", "parse", "save", "disconnect"} <= (
        counter.phases
    )


def test_a_store_processs_batches_ramp_up_to_the_bounds_and_down_at_the_end(mailbox):
    # Given 47 messages and a bound of 8 messages a batch (bytes no bound)
    mailbox.deliver([message(i) for i in range(47)])
    counter = BatchCounter()
    # When they are synced through a store process
    mailbox.sync(batch_messages=8, batch_bytes=10**9, observer=counter, store_process=True)
    # Then storing starts after one message (1/RAMP of the bound), batches double up to it,
    # and the last is cut down to 1/RAMP again
    assert counter.batches == [1, 2, 4, 8, 8, 8, 8, 4, 2, 1, 1]
    # When the same is synced again in this process (a worker's way)
    with mailbox.sessions.begin() as session:
        session.execute(update(FolderState).values(last_uid=0, uidnext=0))
    counter = BatchCounter()
    mailbox.sync(batch_messages=8, batch_bytes=10**9, observer=counter)
    # Then every batch is a whole one
    assert counter.batches == [8, 8, 8, 8, 8, 7]


def test_a_message_larger_than_the_batch_bound_is_still_fetched(mailbox):
    mailbox.deliver([message(0, size=50_000), message(1)])
    assert mailbox.sync(batch_bytes=1_000).saved == 2


def test_interrupted_sync_resumes_and_stores_each_message_once(mailbox):
    # Given a sync that dies after its second committed batch
    mailbox.deliver([message(i, size=2_000) for i in range(10)])
    with pytest.raises(RuntimeError, match="crash"):
        mailbox.sync(batch_bytes=5_000, observer=BatchCounter(fail_at=2))
    partial = len(mailbox.stored())
    assert 0 < partial < 10
    # When it runs again
    mailbox.sync()
    mailbox.sync()
    # Then every message is there exactly once
    uids = [e.uid for e in mailbox.stored()]
    assert uids == list(range(1, 11))


class TimeLimitHit(Exception):
    """Stands in for Dramatiq's TimeLimitExceeded, raised into a thread the same way."""


def interrupt(thread: threading.Thread) -> None:
    """Raise TimeLimitHit inside `thread`, as Dramatiq's TimeLimit middleware does."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(TimeLimitHit)
    )


def test_a_hanging_processor_does_not_hold_the_sync_past_its_time_limit(mailbox):
    # Given six messages in batches of two and a processor that hangs on the first batch
    mailbox.deliver([message(i, size=2_000) for i in range(6)])
    hanging, release = threading.Event(), threading.Event()

    def hang(mail):
        hanging.set()
        release.wait(60)

    ended: list[BaseException] = []

    def run() -> None:
        try:
            mailbox.sync(batch_bytes=5_000, processors={"hang": hang})
        except TimeLimitHit as error:
            ended.append(error)

    sync = threading.Thread(target=run)
    sync.start()
    try:
        assert hanging.wait(10)
        # When the job's time limit interrupts the sync
        interrupt(sync)
        sync.join(Pipeline.DRAIN_SECONDS + 5)
        # Then the sync ends with that error within seconds, though the processor still hangs
        assert not sync.is_alive()
        assert len(ended) == 1
    finally:
        release.set()
        sync.join(10)


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_mail_fetched_again_is_counted_as_duplicate_not_stored_or_processed(dovecot, db_url):
    # Given three stored mails whose folder position was lost (an older database restored)
    mailbox = make_mailbox(dovecot, db_url)
    mailbox.deliver([message(i) for i in range(3)])
    seen = []
    processors = {"count": lambda mail: seen.append(mail.id)}
    assert mailbox.sync(processors=processors).processed == 3
    with mailbox.sessions.begin() as session:
        session.execute(update(FolderState).values(last_uid=0, uidnext=0))
    # When a fourth mail arrives and the account is synced
    mailbox.deliver([message(3)])
    again = mailbox.sync(processors=processors)
    # Then only the new mail is stored and counted as processed; the rest are duplicates
    assert (again.fetched, again.saved, again.duplicates, again.processed) == (4, 1, 3, 1)
    assert [e.uid for e in mailbox.stored()] == [1, 2, 3, 4]
    assert {e.process_status for e in mailbox.stored()} == {"done"}


@pytest.mark.parametrize(
    "folder",
    ["Entwürfe", 'Quote "this"', "Back\\slash", "日本語 & more"],
    ids=["umlaut", "quotes", "backslash", "cjk-ampersand"],
)
def test_folder_names_round_trip(dovecot, tmp_path, folder):
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}")
    box.deliver([message(1), message(2)], folder=folder)
    result = box.sync(folders=[folder])
    assert result.saved == 2
    assert {names.email_folder(box.key, e) for e in box.stored()} == {folder}
    with box.sessions() as session:
        assert list(store.folder_states(session, box.account_id, box.key)) == [folder]
    assert box.sync(folders=[folder]).folders[0].unchanged


def test_wildcard_expands_to_every_selectable_folder(mailbox):
    mailbox.deliver([message(1)])
    mailbox.deliver([message(2)], folder="Archiv")
    result = mailbox.sync(folders=["*"])
    assert sorted(f.folder for f in result.folders) == ["Archiv", "INBOX"]
    assert result.saved == 2


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_with_verified_certificate(dovecot, tmp_path, security):
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}", security=security)
    box.deliver([message(1)])
    assert box.sync().saved == 1


def test_authenticate_plain(dovecot, tmp_path):
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}", auth="plain")
    box.deliver([message(1)])
    assert box.sync().saved == 1


def test_whole_corpus_through_imap(mailbox, dovecot, corpus_messages):
    # Given every real-world test message in the mailbox
    mailbox.deliver(corpus_messages)
    # When it is synced
    result = mailbox.sync()
    # Then each one is stored, parsed or quarantined, and none stopped the account
    stored = mailbox.stored()
    assert result.fetched == len(corpus_messages) == len(stored)
    assert {e.status for e in stored} <= {"parsed", "quarantined"}
    assert result.quarantined == sum(e.status == "quarantined" for e in stored) >= 1
    for email in stored:
        if email.status == "quarantined":
            assert email.quarantine_reason
    # And each is byte for byte what the server holds (it normalised line ends and NULs)
    with dovecot.session(mailbox.user, mailbox.password) as client:
        client.select_folder("INBOX", readonly=True)
        held = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
    assert {e.uid: mailbox.plaintext(e) for e in stored} == {
        uid: data[b"BODY[]"] for uid, data in held.items()
    }


def test_counts_in_the_database_match(mailbox):
    mailbox.deliver([message(i) for i in range(3)])
    mailbox.sync()
    with mailbox.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Email)) == 3
