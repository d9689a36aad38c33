"""Mail state sync on a real Dovecot: flags, expunges and moves kept in step, newest first."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailpipe import db, store
from mailpipe.accounts import add_account, create_user
from mailpipe.errors import NotFound
from mailpipe.folders import requested_role, role_of
from mailpipe.imap import ImapSettings
from mailpipe.mail import list_mail, mail_changes, read_mail
from mailpipe.models import MailAccount
from mailpipe.sync import SyncOptions, sync_account
from mailpipe.vocabulary import FolderRole
from tests.support import scripted_imap
from tests.support.dovecot import DOVECOT, Dovecot
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK
from tests.support.scripted_imap import UIDVALIDITY, ScriptedImap, tagged
from tests.test_cli import mailpipe, sync_args
from tests.test_sync import BatchCounter, Mailbox, Recorder, make_mailbox

# Dovecot announcing neither CONDSTORE nor QRESYNC, as Courier and many older servers do
NO_CONDSTORE = """
protocol imap {
  imap_capability = IMAP4rev1 LITERAL+ SASL-IR ENABLE IDLE UIDPLUS MOVE NAMESPACE MULTIAPPEND
}
"""


@pytest.fixture
def mailbox(dovecot, tmp_path) -> Mailbox:
    return make_mailbox(dovecot, f"sqlite:///{tmp_path / 'mailpipe.db'}")


def set_flags(box: Mailbox, uids, *, add=(), remove=(), folder: str = "INBOX") -> None:
    """Change flags on the server, as the user's own mail program would."""
    with box.dovecot.session(box.user, box.password) as client:
        client.select_folder(folder)
        if add:
            client.add_flags(uids, list(add))
        if remove:
            client.remove_flags(uids, list(remove))


def move(box: Mailbox, uids, target: str) -> None:
    with box.dovecot.session(box.user, box.password) as client:
        if not client.folder_exists(target):
            client.create_folder(target)
        client.select_folder("INBOX")
        client.move(uids, target)


def held(box: Mailbox, **where) -> list:
    """The stored mail that the server still holds (tombstones of vanished mail left out)."""
    return [e for e in box.stored(**where) if e.vanished_at is None]


def stored_flags(box: Mailbox, folder: str = "INBOX") -> dict[int, set[str]]:
    return {e.uid: set(e.flags.split()) for e in held(box, folder=folder)}


def server_flags(box: Mailbox, folder: str = "INBOX") -> dict[int, set[str]]:
    with box.dovecot.session(box.user, box.password) as client:
        client.select_folder(folder, readonly=True)
        flags = client.get_flags(client.search("ALL"))
    return {uid: {f.decode() for f in value} - {"\\Recent"} for uid, value in flags.items()}


# -- the bars ------------------------------------------------------------------------------


def test_cli_reports_flag_changes_and_vanished_mail_then_nothing(dovecot, imap_user, tmp_path):
    # Given an INBOX of 20 messages (two of them read) synced once from the command line
    user, password = imap_user
    uids = dovecot.append(user, password, [message(i) for i in range(18)])
    uids += dovecot.append(user, password, [message(18), message(19)], flags=["\\Seen"])
    db = f"sqlite:///{tmp_path / 'm.db'}"
    first = mailpipe(
        *sync_args(dovecot, user, db, "--json", "--folder", "INBOX"), password=password
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["saved"] == 20
    # When, in the user's own mail program, 6 messages change flags (3 read, 2 flagged,
    # 1 marked unread), 3 are deleted and 1 is moved out of INBOX
    with dovecot.session(user, password) as client:
        client.select_folder("INBOX")
        client.add_flags(uids[0:3], [b"\\Seen"])
        client.add_flags(uids[3:5], [b"\\Flagged"])
        client.remove_flags(uids[18:19], [b"\\Seen"])
        client.delete_messages(uids[10:13])
        client.uid_expunge(uids[10:13])
        client.create_folder("Archiv")
        client.move(uids[15:16], "Archiv")
    second = mailpipe(
        *sync_args(dovecot, user, db, "--json", "--folder", "INBOX"), password=password
    )
    # Then the sync reports 6 flag changes and 4 vanished messages, in total and per folder
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert (report["flags_changed"], report["vanished"], report["saved"]) == (6, 4, 0)
    [inbox] = report["folders"]
    assert (inbox["folder"], inbox["flags_changed"], inbox["vanished"]) == ("INBOX", 6, 4)
    # And the store (INBOX only was synced) holds what the server holds, with its flags
    with sqlite3.connect(tmp_path / "m.db") as connection:
        rows = dict(connection.execute("SELECT uid, flags FROM emails WHERE vanished_at IS NULL"))
    assert sorted(rows) == sorted(set(uids) - set(uids[10:13]) - {uids[15]})
    assert all("\\Seen" in rows[uid] for uid in uids[0:3])
    assert all("\\Flagged" in rows[uid] for uid in uids[3:5])
    assert "\\Seen" not in rows[uids[18]] and "\\Seen" in rows[uids[19]]
    # When it syncs again, then nothing changed and nothing was saved; the text says so too
    third = mailpipe(*sync_args(dovecot, user, db, "--folder", "INBOX"), password=password)
    assert third.returncode == 0, third.stderr
    assert "fetched 0, saved 0" in third.stdout
    assert "flags changed 0, vanished 0" in third.stdout
    fourth = json.loads(
        mailpipe(
            *sync_args(dovecot, user, db, "--json", "--folder", "INBOX"), password=password
        ).stdout
    )
    assert (fourth["flags_changed"], fourth["vanished"], fourth["saved"]) == (0, 0, 0)


def stored_uids(path) -> list[int]:
    with sqlite3.connect(path) as connection:
        return sorted(uid for (uid,) in connection.execute("SELECT uid FROM emails"))


def test_cli_capped_sync_takes_the_newest_first_then_backfills(dovecot, imap_user, tmp_path):
    # Given a folder of 60 messages
    user, password = imap_user
    dovecot.append(user, password, [message(i) for i in range(60)])
    db = f"sqlite:///{tmp_path / 'm.db'}"

    def sync(*extra: str) -> dict:
        result = mailpipe(*sync_args(dovecot, user, db, "--json", *extra), password=password)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # When a capped sync runs, then it stores the newest ten, UIDs 51-60
    assert sync("--max-mails", "10")["saved"] == 10
    assert stored_uids(tmp_path / "m.db") == list(range(51, 61))
    # When the next capped sync runs, then it backfills the ten below: 41-50
    report = sync("--max-mails", "10")
    assert report["saved"] == 10 and report["folders"][0]["backfill_pending"]
    assert stored_uids(tmp_path / "m.db") == list(range(41, 61))
    # When an uncapped one runs, then it stores the rest
    report = sync()
    assert report["saved"] == 40 and not report["folders"][0]["backfill_pending"]
    assert stored_uids(tmp_path / "m.db") == list(range(1, 61))
    # And a re-sync finds nothing
    report = sync()
    assert (report["fetched"], report["saved"]) == (0, 0)
    assert report["folders"][0]["unchanged"]


# -- flags and expunges ----------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_flags_set_and_cleared_follow_the_server(dovecot, db_url):
    # Given five stored messages, two of them read
    box = make_mailbox(dovecot, db_url)
    uids = box.deliver([message(i) for i in range(3)])
    uids += dovecot.append(box.user, box.password, [message(3), message(4)], flags=["\\Seen"])
    box.sync()
    # When one is flagged and answered, and one read message is marked unread
    set_flags(box, uids[:1], add=[b"\\Flagged", b"\\Answered"])
    set_flags(box, uids[3:4], remove=[b"\\Seen"])
    result = box.sync()
    # Then two stored messages changed, and the stored flags are the server's
    assert (result.flags_changed, result.vanished, result.fetched) == (2, 0, 0)
    assert stored_flags(box) == server_flags(box)
    assert stored_flags(box)[uids[0]] == {"\\Flagged", "\\Answered"}
    # And when nothing changes, the next sync is the no-change poll
    assert box.sync().folders[0].unchanged


def test_changed_flags_cost_enable_and_one_fetch(mailbox):
    # Given a synced folder in which one message is then read elsewhere
    uids = mailbox.deliver([message(i) for i in range(5)])
    mailbox.sync()
    set_flags(mailbox, uids[2:3], add=[b"\\Seen"])
    # When it syncs
    recorder = Recorder()
    result = mailbox.sync(connect=recorder.connect)
    # Then one EXAMINE, ENABLE QRESYNC and one FETCH (CHANGEDSINCE ... VANISHED) did it, the
    # ENABLE and the FETCH in one write (pipelined: one round trip, not two)
    assert result.flags_changed == 1
    assert recorder.commands == [b"EXAMINE", b"ENABLE", b"FETCH", b"LOGOUT"]
    assert recorder.writes == 3
    assert result.round_trips == 4  # connect, LOGIN, EXAMINE, ENABLE with FETCH


def test_expunge_and_move_between_synced_folders(mailbox):
    # Given INBOX and Archiv, both synced
    uids = mailbox.deliver([message(i) for i in range(6)])
    mailbox.deliver([message(100)], folder="Archiv")
    mailbox.sync(folders=["INBOX", "Archiv"])
    # When one message is deleted and one moved from INBOX to Archiv
    mailbox.dovecot.expunge(mailbox.user, mailbox.password, uids[:1])
    move(mailbox, uids[1:2], "Archiv")
    result = mailbox.sync(folders=["INBOX", "Archiv"])
    # Then INBOX lost both, and Archiv holds the moved one
    inbox, archive = result.folders
    assert (inbox.vanished, archive.vanished, archive.saved) == (2, 0, 1)
    assert [e.uid for e in held(mailbox, folder="INBOX")] == uids[2:]
    moved = [mailbox.plaintext(e) for e in held(mailbox, folder="Archiv")]
    assert any(b"Inhalt 1 " in body for body in moved)
    assert mailbox.sync(folders=["INBOX", "Archiv"]).vanished == 0


def test_a_message_moved_to_another_synced_folder_is_not_processed_again(mailbox):
    # Given INBOX and Archiv synced with a processor that counts what it sees
    uids = mailbox.deliver([message(i) for i in range(3)])
    mailbox.deliver([message(100)], folder="Archiv")
    seen: list[str] = []

    def subject(mail):
        seen.append(mail.fields["subject"])
        return {"subject_length": len(mail.fields["subject"])}

    mailbox.sync(folders=["INBOX", "Archiv"], processors={"subject": subject})
    assert sorted(seen) == ["Nachricht 0", "Nachricht 1", "Nachricht 100", "Nachricht 2"]
    [before] = [e for e in held(mailbox, folder="INBOX") if e.uid == uids[1]]
    annotations = mailbox.key.decrypt(
        before.annotations_enc, table="emails", column="annotations", row=before.id
    )
    # When one message moves from INBOX to Archiv (INBOX is synced first: it vanishes there
    # before Archiv sees it)
    move(mailbox, uids[1:2], "Archiv")
    result = mailbox.sync(folders=["INBOX", "Archiv"], processors={"subject": subject})
    # Then it left INBOX and was stored in Archiv without running the processor again
    assert (result.vanished, result.saved, result.processed) == (1, 1, 1)
    assert len(seen) == 4
    moved = [e for e in held(mailbox, folder="Archiv") if b"Inhalt 1 " in mailbox.plaintext(e)]
    assert len(moved) == 1 and moved[0].process_status == "done"
    assert (
        mailbox.key.decrypt(
            moved[0].annotations_enc, table="emails", column="annotations", row=moved[0].id
        )
        == annotations
    )
    # And INBOX holds the other two; the moved one's tombstone there keeps no content
    assert [e.uid for e in held(mailbox, folder="INBOX")] == [uids[0], uids[2]]
    [tombstone] = [e for e in mailbox.stored() if e.vanished_at is not None]
    assert (tombstone.uid, tombstone.raw_enc, tombstone.parsed_enc) == (uids[1], b"", None)
    assert tombstone.annotations_enc is None


def test_uidvalidity_change_with_qresync_resyncs_without_duplicates(mailbox, dovecot):
    # Given a synced folder with a modseq on record
    uids = mailbox.deliver([message(i) for i in range(4)])
    mailbox.sync()
    before = {e.id for e in held(mailbox)}
    # When a message is flagged and the folder gets a new UIDVALIDITY
    set_flags(mailbox, uids[:1], add=[b"\\Flagged"])
    new_validity = dovecot.change_uidvalidity(mailbox.user)
    result = mailbox.sync()
    # Then the same rows are re-keyed (no QRESYNC against the old validity), flags included
    assert result.folders[0].uidvalidity_changed
    assert (result.saved, result.duplicates, result.vanished) == (0, 4, 0)
    assert {e.id for e in held(mailbox)} == before
    assert {e.uidvalidity for e in held(mailbox)} == {new_validity}
    assert stored_flags(mailbox) == server_flags(mailbox)
    # And afterwards flag sync works against the new validity
    set_flags(mailbox, uids[1:2], add=[b"\\Seen"])
    assert mailbox.sync().flags_changed == 1


def test_crash_between_flag_fetch_and_commit_converges(mailbox, monkeypatch):
    # Given a synced folder in which flags change and a message is deleted
    uids = mailbox.deliver([message(i) for i in range(5)])
    mailbox.sync()
    set_flags(mailbox, uids[:2], add=[b"\\Seen"])
    mailbox.dovecot.expunge(mailbox.user, mailbox.password, uids[4:])
    # When the sync dies after fetching the changes and before committing them
    real = store.apply_state_changes

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("crash before the commit")

    monkeypatch.setattr(store, "apply_state_changes", crash)
    with pytest.raises(RuntimeError, match="crash"):
        mailbox.sync()
    # Then nothing of it was kept
    assert stored_flags(mailbox)[uids[0]] == set()
    assert len(held(mailbox)) == 5
    # And the next run brings the store in step
    monkeypatch.setattr(store, "apply_state_changes", real)
    result = mailbox.sync()
    assert (result.flags_changed, result.vanished) == (2, 1)
    assert stored_flags(mailbox) == server_flags(mailbox)
    assert mailbox.sync().folders[0].unchanged


@pytest.fixture(scope="module")
def plain_dovecot(tmp_path_factory) -> Dovecot:
    """A Dovecot that announces neither CONDSTORE nor QRESYNC."""

    if not DOVECOT.exists():
        pytest.skip(f"{DOVECOT} is missing")
    server = Dovecot.start(Path(tempfile.gettempdir()), extra_config=NO_CONDSTORE)
    try:
        yield server
    finally:
        server.close()


def test_server_without_condstore_refreshes_recent_flags_and_finds_expunges(
    plain_dovecot, tmp_path
):
    # Given a server without CONDSTORE and a synced folder
    box = make_mailbox(plain_dovecot, f"sqlite:///{tmp_path / 'm.db'}")
    uids = box.deliver([message(i) for i in range(6)])
    first = box.sync()
    assert first.saved == 6
    # When the newest message is read elsewhere
    set_flags(box, uids[-1:], add=[b"\\Seen"])
    recorder = Recorder()
    result = box.sync(connect=recorder.connect)
    # Then the bounded refresh of the newest messages' flags finds it: one FETCH, no size list
    assert result.flags_changed == 1
    assert recorder.commands == [b"EXAMINE", b"FETCH", b"LOGOUT"]
    # When two are deleted, then the count disagrees and the UID sets are compared
    plain_dovecot.expunge(box.user, box.password, uids[:2])
    assert box.sync().vanished == 2
    assert [e.uid for e in held(box)] == uids[2:]
    assert stored_flags(box) == server_flags(box)
    # And with nothing changed no row is written (flags refreshed, found equal)
    again = box.sync()
    assert (again.flags_changed, again.vanished, again.saved) == (0, 0, 0)
    assert again.folders[0].unchanged


def scripted_account(tmp_path, port: int):
    """A fresh database with one account on the scripted server; returns its sync."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        owner, key = create_user(session, "scripted-owner", "pw", iterations=1_000)
        account = add_account(
            session,
            owner,
            key,
            ImapSettings(host="127.0.0.1", port=port, username="u", password="p", security="none"),
        )
    return lambda: sync_account(
        sessions, account_id=account.id, key=key, options=SyncOptions(), policy=LOOPBACK
    )


def test_highestmodseq_sent_unasked_is_not_taken_for_condstore(tmp_path):
    # Given a server that does not announce CONDSTORE but sends HIGHESTMODSEQ anyway (as Cyrus
    # does), whose modseq moves between two syncs
    modseq = [5]

    def examine(tag: bytes, args: bytes) -> bytes:
        assert b"CONDSTORE" not in args
        return (
            b"* 2 EXISTS\r\n* OK [UIDVALIDITY %d] v\r\n* OK [UIDNEXT 3] n\r\n"
            b"* OK [HIGHESTMODSEQ %d] m\r\n" % (UIDVALIDITY, modseq[0])
        ) + tagged(tag, b"OK [READ-ONLY] EXAMINE completed")

    def flags(tag: bytes, args: bytes) -> bytes:
        return b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n" + tagged(tag, b"OK FETCH completed")

    with ScriptedImap({"EXAMINE": examine, "FETCH": flags}) as server:
        sync = scripted_account(tmp_path, server.port)
        assert sync().saved == 2
        modseq[0] = 9
        server.wait_idle()
        server.commands.clear()
        # When it syncs again
        again = sync()
        server.wait_idle()
        # Then no CHANGEDSINCE went to it: the newest messages' flags were refreshed instead
        # (and no CAPABILITY either: the greeting named them)
        assert again.flags_changed == 1
        assert server.commands == ["LOGIN", "EXAMINE", "FETCH", "LOGOUT"]


def test_courier_without_uidnext_in_examine_takes_it_from_status(tmp_path):
    # Given a scripted server that answers EXAMINE without UIDNEXT (as Courier does), has no
    # CONDSTORE, and says UIDNEXT in STATUS
    def examine(tag: bytes, args: bytes) -> bytes:
        return (
            b"* FLAGS (\\Seen \\Answered)\r\n* 2 EXISTS\r\n* 0 RECENT\r\n"
            b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % UIDVALIDITY
        ) + tagged(tag, b"OK [READ-ONLY] EXAMINE completed")

    def status(tag: bytes, args: bytes) -> bytes:
        return b'* STATUS "INBOX" (UIDNEXT 3)\r\n' + tagged(tag, b"OK STATUS completed")

    def flags(tag: bytes, args: bytes) -> bytes:
        return b"* 1 FETCH (UID 1 FLAGS ())\r\n* 2 FETCH (UID 2 FLAGS ())\r\n" + tagged(
            tag, b"OK FETCH completed"
        )

    with ScriptedImap({"EXAMINE": examine, "STATUS": status, "FETCH": flags}) as server:
        sync = scripted_account(tmp_path, server.port)
        assert sync().saved == 2
        server.wait_idle()
        server.commands.clear()
        # When it syncs again with nothing new
        again = sync()
        server.wait_idle()
        # Then UIDNEXT came from STATUS: no size list, no body fetch, nothing saved
        assert (again.fetched, again.saved) == (0, 0)
        assert again.folders[0].unchanged
        assert "UID FETCH" not in server.commands
        assert server.commands[-4:] == ["EXAMINE", "STATUS", "FETCH", "LOGOUT"]


# -- newest first ----------------------------------------------------------------------------


def test_newest_first_backfill_survives_a_crash_without_loss_or_duplicates(mailbox):
    # Given 30 messages and a capped sync whose batches hold three messages
    mailbox.deliver([message(i, size=2_000) for i in range(30)])
    first = mailbox.sync(max_mails=12, batch_bytes=7_000)
    assert sorted(e.uid for e in held(mailbox)) == list(range(19, 31))
    assert first.folders[0].backfill_pending
    # When the next capped backfill dies after its first committed batch
    with pytest.raises(RuntimeError, match="crash"):
        mailbox.sync(max_mails=12, batch_bytes=7_000, observer=BatchCounter(fail_at=1))
    partial = sorted(e.uid for e in held(mailbox))
    # Then what it committed is the newest part of the backfill, contiguous with the rest
    assert partial == list(range(partial[0], 31)) and partial[0] < 19
    # When new mail arrives and runs go on to the end
    mailbox.deliver([message(30)])
    for _ in range(5):
        if not mailbox.sync(max_mails=12, batch_bytes=7_000).folders[0].backfill_pending:
            break
    # Then every message is stored exactly once, and a re-sync finds nothing
    uids = [e.uid for e in held(mailbox)]
    assert sorted(uids) == list(range(1, 32))
    assert len(uids) == len(set(uids))
    assert mailbox.sync().folders[0].unchanged


# -- folder roles ----------------------------------------------------------------------------


def test_a_role_names_the_folder_and_a_wildcard_leaves_all_mail_out(mailbox):
    # Given INBOX, a German "Gesendet", an "Archiv" and a Gmail-like "All Mail" copying them all
    mailbox.deliver([message(1)])
    mailbox.deliver([message(2)], folder="Gesendet")
    mailbox.deliver([message(3)], folder="Archiv")
    mailbox.deliver([message(1), message(2), message(3)], folder="All Mail")
    # When the account syncs "@sent" and "@archive"
    result = mailbox.sync(folders=["@sent", "@archive"])
    # Then exactly those folders are synced, found by their common names
    assert [f.folder for f in result.folders] == ["Gesendet", "Archiv"]
    # And each folder's role is stored with its position
    with mailbox.sessions() as session:
        states = store.folder_states(session, mailbox.account_id, mailbox.key)
    roles = {name: position.role for name, position in states.items()}
    assert roles == {"Gesendet": "sent", "Archiv": "archive"}
    # When it syncs every folder by wildcard, then "All Mail" is left out
    everything = mailbox.sync(folders=["*"])
    assert sorted(f.folder for f in everything.folders) == ["Archiv", "Gesendet", "INBOX"]
    assert len(held(mailbox)) == 3


def test_roles_come_from_special_use_before_names():

    # Given LIST answers with and without SPECIAL-USE attributes
    # Then the attribute decides, the name is the fallback, and unknown names have no role
    assert role_of([b"\\HasNoChildren", b"\\Sent"], "Postausgang", "/") is FolderRole.SENT
    assert role_of([b"\\All"], "[Gmail]/Alle Nachrichten", "/") is FolderRole.ALL
    assert role_of([], "INBOX/Papierkorb", "/") is FolderRole.TRASH
    assert role_of([], "Entwürfe", "/") is FolderRole.DRAFTS
    assert role_of([], "Rechnungen", "/") is None
    # And "@sent" names a role while "@work" stays a folder name
    assert requested_role("@sent") is FolderRole.SENT
    assert requested_role("@Archive") is FolderRole.ARCHIVE
    assert requested_role("@work") is None and requested_role("Sent") is None


# -- the mail, for the host app --------------------------------------------------------------


def test_host_app_reads_the_owners_mail_newest_first_page_by_page(mailbox, dovecot):

    # Given five synced messages, the newest one read, with a processor's annotation
    uids = mailbox.deliver([message(i) for i in range(5)])
    set_flags(mailbox, uids[-1:], add=[b"\\Seen"])
    mailbox.sync(processors={"length": lambda mail: len(mail.fields["text"])})
    with mailbox.sessions() as session:
        owner = session.get_one(MailAccount, mailbox.account_id).user_id
        # When the owner lists them two at a time
        first = list_mail(session, user_id=owner, key=mailbox.key, folder="INBOX", limit=2)
        second = list_mail(
            session, user_id=owner, key=mailbox.key, limit=2, before=first.next_before
        )
        third = list_mail(
            session, user_id=owner, key=mailbox.key, limit=2, before=second.next_before
        )
        # Then the pages go from newest to oldest, once each, with sender, subject and read state
        listed = [item.uid for page in (first, second, third) for item in page.mail]
        assert sorted(listed) == sorted(uids) and len(listed) == 5
        assert third.next_before is None
        dates = [item.date for page in (first, second, third) for item in page.mail]
        assert dates == sorted(dates, reverse=True)
        by_uid = {item.uid: item for page in (first, second, third) for item in page.mail}
        assert by_uid[uids[-1]].read and not by_uid[uids[0]].read
        assert by_uid[uids[0]].subject == "Nachricht 0"
        assert by_uid[uids[0]].sender == "Absender <absender@example.org>"
        # And one message reads whole, with its fields and annotations, as JSON with offsets
        one = read_mail(session, user_id=owner, key=mailbox.key, mail_id=by_uid[uids[0]].id)
        assert "Inhalt 0" in one.fields["text"]
        assert one.annotations is not None and "length" in json.dumps(one.annotations)
        assert one.to_json()["date"].endswith("+00:00")
    # When another user asks for it, then it is not found
    with mailbox.sessions.begin() as session:
        stranger, key = create_user(session, "stranger", "pw", iterations=1_000)
        stranger_id = stranger.id
    with mailbox.sessions() as session:
        with pytest.raises(NotFound):
            read_mail(session, user_id=stranger_id, key=key, mail_id=one.id)
        assert list_mail(session, user_id=stranger_id, key=key).mail == []


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_change_feed_read_page_by_page_while_a_sync_runs(dovecot, db_url):
    # Given 40 messages on the server and a sync storing them in small batches, in a thread
    box = make_mailbox(dovecot, db_url)
    uids = box.deliver([message(i, size=2_000) for i in range(40)])
    with box.sessions() as session:
        owner = session.get_one(MailAccount, box.account_id).user_id
    syncing = threading.Thread(target=lambda: box.sync(batch_bytes=7_000))
    # When a reader pages through the feed, seven changes at a time, while the sync runs
    cursor, new, pages = None, [], 0
    syncing.start()
    while True:
        running = syncing.is_alive()
        with box.sessions() as session:
            page = mail_changes(session, user_id=owner, key=box.key, cursor=cursor, limit=7)
        pages += 1
        new += [c.mail_id for c in page.changes if c.kind == "new"]
        assert all(c.kind == "new" for c in page.changes)
        cursor = page.cursor
        if not running and not page.more:
            break
    syncing.join()
    # Then it saw every stored message once, as new, over several pages
    assert sorted(new) == sorted(str(e.id) for e in held(box))
    assert len(new) == len(set(new)) == 40 and pages > 5
    # When flags change on two messages and one is deleted, then the feed says just that
    set_flags(box, uids[:2], add=[b"\\Seen"])
    box.dovecot.expunge(box.user, box.password, uids[-1:])
    box.sync()
    with box.sessions() as session:
        page = mail_changes(session, user_id=owner, key=box.key, cursor=cursor)
    kinds = sorted((c.kind, c.mail.uid if c.mail else None) for c in page.changes)
    assert kinds == [("flags", uids[0]), ("flags", uids[1]), ("vanished", None)]
    assert all(c.mail.read for c in page.changes if c.kind == "flags")
    assert not page.more
    # And from the new cursor there is nothing more; a cursor it never gave is refused
    with box.sessions() as session:
        assert mail_changes(session, user_id=owner, key=box.key, cursor=page.cursor).changes == []
        with pytest.raises(ValueError):
            mail_changes(session, user_id=owner, key=box.key, cursor="1.x.y")


# -- the account's window ----------------------------------------------------------------------


def test_mail_before_the_window_is_never_fetched_newest_first_or_not(mailbox, dovecot):
    # Given six messages received in 2024 and six in 2026, interleaved
    with dovecot.session(mailbox.user, mailbox.password) as client:
        for i in range(12):
            year = 2024 if i % 2 else 2026
            client.append("INBOX", message(i), msg_time=datetime(year, 3, 1, 12, i, tzinfo=UTC))
    since = datetime(2025, 1, 1, tzinfo=UTC)
    # When capped syncs with the window run until nothing is left, then an uncapped one
    first = mailbox.sync(max_mails=4, since=since)
    assert first.saved == 4 and first.folders[0].backfill_pending
    rest = mailbox.sync(max_mails=4, since=since)
    # Then only the six from 2026 are stored, newest first, and the backfill ends at the window
    assert rest.saved == 2 and not rest.folders[0].backfill_pending
    subjects = sorted(e.uid for e in held(mailbox))
    assert subjects == [1, 3, 5, 7, 9, 11]
    assert mailbox.sync(since=since).folders[0].unchanged


def test_qresync_announced_but_enable_refused_falls_back_to_a_full_flag_refresh(tmp_path):
    # Given a server that announces QRESYNC but refuses ENABLE, whose modseq moves between syncs
    announced = b"IMAP4rev1 AUTH=PLAIN ENABLE CONDSTORE QRESYNC"
    modseq = [5]
    vanished_asked = []

    def login(tag: bytes, args: bytes) -> bytes:
        return tagged(tag, b"OK [CAPABILITY " + announced + b"] logged in")

    def examine(tag: bytes, args: bytes) -> bytes:
        return (
            b"* 2 EXISTS\r\n* OK [UIDVALIDITY %d] v\r\n* OK [UIDNEXT 3] n\r\n"
            b"* OK [HIGHESTMODSEQ %d] m\r\n" % (UIDVALIDITY, modseq[0])
        ) + tagged(tag, b"OK [READ-ONLY] EXAMINE completed")

    def uid_fetch(tag: bytes, args: bytes) -> bytes:
        if b"VANISHED" in args:
            vanished_asked.append(args)
            return tagged(tag, b"BAD QRESYNC not enabled")
        if b"(UID FLAGS)" in args:
            return b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n* 2 FETCH (UID 2 FLAGS ())\r\n" + tagged(
                tag, b"OK UID FETCH completed"
            )
        return scripted_imap.uid_fetch(tag, args)

    replies = {
        "LOGIN": login,
        "EXAMINE": examine,
        "ENABLE": lambda tag, args: tagged(tag, b"NO ENABLE refused"),
        "UID FETCH": uid_fetch,
    }
    greeting = b"* OK [CAPABILITY " + announced + b"] scripted server ready\r\n"
    with ScriptedImap(replies, greeting=greeting) as server:
        sync = scripted_account(tmp_path, server.port)
        assert sync().saved == 2
        modseq[0] = 9
        server.wait_idle()
        server.commands.clear()
        # When it syncs again
        again = sync()
        server.wait_idle()
        commands = list(server.commands)
    # Then ENABLE went out with the QRESYNC fetch, and after the refusal of both a full flag
    # refresh learnt the change on the same connection
    assert len(vanished_asked) == 1
    assert commands == ["LOGIN", "EXAMINE", "ENABLE", "UID FETCH", "UID FETCH", "LOGOUT"]
    assert again.flags_changed == 1
