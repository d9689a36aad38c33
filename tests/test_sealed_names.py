"""Folder names and Message-IDs leave no clear trace in the database (issue 15, finding 5),
including rows written before migration 0013, which the owner's key converts later."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select, update

from mailpipe import db, names
from mailpipe.crypto import USER_WRAP, DataKey
from mailpipe.mail import list_mail, read_mail
from mailpipe.models import Email, FolderState, MailAccount, User
from mailpipe.sync import SyncOptions, sync_account
from tests.support.policy import LOOPBACK
from tests.test_sync import Mailbox, make_mailbox
from tests.test_web_api import logged_in, site  # noqa: F401  (fixture)

FOLDER = "Mandant Schröder"
DOMAIN = "kanzlei-mueller.example"
MESSAGE_IDS = [f"<akte-{i}.7f3a@{DOMAIN}>" for i in range(3)]
NEEDLES = (FOLDER, DOMAIN, "akte-")


def message(i: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = f"Kanzlei <post@{DOMAIN}>"
    mail["To"] = "mandant@example.org"
    mail["Subject"] = f"Akte {i}"
    mail["Message-ID"] = MESSAGE_IDS[i]
    mail.set_content(f"Inhalt {i}")
    return mail.as_bytes()


def clear_traces(engine) -> list[str]:
    """Every table.column whose raw value contains a folder name or Message-ID of the test."""
    found = []
    with engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            result = connection.exec_driver_sql(f'SELECT * FROM "{table}"')
            columns = list(result.keys())
            for row in result:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes | memoryview):
                        text = bytes(value).decode("utf-8", "replace")
                    else:
                        text = str(value)
                    if any(needle in text for needle in NEEDLES):
                        found.append(f"{table}.{column}")
    return sorted(set(found))


def back_to_0012(engine, sessions, key: DataKey) -> None:
    """Make the database one written before 0013: names in clear, then the schema downgraded."""
    with sessions.begin() as session:
        for email in session.scalars(select(Email)):
            email.folder = names.email_folder(key, email)
            email.message_id = names.email_message_id(key, email)
            email.folder_hash = email.folder_enc = None
            email.message_id_hash = email.message_id_enc = None
        for state in session.scalars(select(FolderState)):
            state.folder = names.state_folder(
                key,
                account_id=state.account_id,
                clear=None,
                hashed=state.folder_hash,
                sealed=state.folder_enc,
            )
            state.folder_hash = state.folder_enc = None
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        with connection.begin():
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0012")
    assert db.schema_revision(engine) == "0012"


def user_of(box: Mailbox) -> int:
    with box.sessions() as session:
        return session.get_one(MailAccount, box.account_id).user_id


def folder_mail(box: Mailbox, folder: str) -> list[tuple[str, str]]:
    """What the mail API lists for a folder: (folder, subject) of each message."""
    with box.sessions() as session:
        page = list_mail(session, user_id=user_of(box), key=box.key, folder=folder)
    return sorted((item.folder, item.subject) for item in page.mail)


@pytest.mark.dovecot
def test_a_database_from_0012_keeps_no_clear_name_after_the_next_sync(dovecot, db_url):
    # Given mail in INBOX and in a folder whose name says who the user works for, synced, and
    # the database then taken back to 0012 with every folder name and Message-ID in clear
    box = make_mailbox(dovecot, db_url)
    box.deliver([message(0)])
    box.deliver([message(1), message(2)], folder=FOLDER)
    assert box.sync(folders=["*"]).saved == 3
    engine = db.make_engine(db_url)
    assert clear_traces(engine) == []
    back_to_0012(engine, box.sessions, box.key)
    assert clear_traces(engine) == ["emails.folder", "emails.message_id", "folder_state.folder"]
    # When the schema is migrated, as workers do at start
    db.migrate(engine)
    # Then the half-converted database reads as before: the folder filter and names work
    assert folder_mail(box, FOLDER) == [(FOLDER, "Akte 1"), (FOLDER, "Akte 2")]
    # When the account syncs again with the owner's key
    again = box.sync(folders=["*"])
    # Then nothing was taken twice, and no table holds a folder name or Message-ID in clear
    assert (again.saved, again.fetched) == (0, 0)
    assert clear_traces(engine) == []
    # And everything still reads: folders, Message-IDs, the folder filter, one message
    assert folder_mail(box, FOLDER) == [(FOLDER, "Akte 1"), (FOLDER, "Akte 2")]
    assert folder_mail(box, "INBOX") == [("INBOX", "Akte 0")]
    stored = box.stored()
    assert sorted(names.email_message_id(box.key, e) for e in stored) == MESSAGE_IDS
    with box.sessions() as session:
        one = read_mail(session, user_id=user_of(box), key=box.key, mail_id=str(stored[0].id))
    assert one.folder in {FOLDER, "INBOX"}
    # And new mail in the converted folder is stored once, beside the converted rows
    box.deliver([message(0)], folder=FOLDER)
    assert box.sync(folders=["*"]).saved == 1
    assert box.sync(folders=["*"]).saved == 0
    assert clear_traces(engine) == []
    engine.dispose()


@pytest.mark.dovecot
def test_a_web_login_converts_the_users_rows_and_the_mail_api_reads_them(
    site,  # noqa: F811  (the fixture)
    dovecot,
    tmp_path,
):
    # Given a user's account with mail in a named folder, stored before 0013 (names in clear)
    bob = site.user("bob")
    login, password = dovecot.new_user()
    dovecot.append(login, password, [message(1), message(2)], folder=FOLDER)
    account_id = site.account(bob, port=dovecot.port, login=login, password=password)
    options = SyncOptions(folders=["*"])
    sync_account(
        site.sessions, account_id=account_id, key=bob.key, options=options, policy=LOOPBACK
    )
    engine = db.make_engine(f"sqlite:///{tmp_path / 'web.db'}")
    back_to_0012(engine, site.sessions, bob.key)
    db.migrate(engine)
    with engine.begin() as connection:  # the way down dropped key_wrap: bob's wrap is bound to him
        connection.execute(update(User).values(key_wrap=USER_WRAP))
    assert clear_traces(engine) != []
    # When bob logs in to the web app (no sync has run since)
    client, _headers = logged_in(site, bob)
    # Then his rows hold no folder name or Message-ID in clear any more
    assert clear_traces(engine) == []
    # And the mail API lists and filters them by folder as before
    listed = client.get("/api/mail", query_string={"folder": FOLDER}).json["mail"]
    assert sorted((item["folder"], item["subject"]) for item in listed) == [
        (FOLDER, "Akte 1"),
        (FOLDER, "Akte 2"),
    ]
    assert client.get("/api/mail", query_string={"folder": "INBOX"}).json["mail"] == []
    # And a sync afterwards takes nothing twice
    again = sync_account(
        site.sessions, account_id=account_id, key=bob.key, options=options, policy=LOOPBACK
    )
    assert again.saved == 0
    engine.dispose()


def test_the_keyed_hashes_need_the_users_key(tmp_path):
    # Given two users' keys
    one, other = DataKey.generate(), DataKey.generate()
    # Then a folder or Message-ID hashes alike under one key, differently under another, and
    # the two purposes never give the same hash for the same text
    assert names.folder_hash(one, FOLDER) == names.folder_hash(one, FOLDER)
    assert names.folder_hash(one, FOLDER) != names.folder_hash(other, FOLDER)
    assert names.folder_hash(one, MESSAGE_IDS[0]) != names.message_id_hash(one, MESSAGE_IDS[0])
    # And a sealed folder name opens only in the row it was written for
    columns = names.state_columns(one, account_id=1, folder=FOLDER)
    assert FOLDER.encode() not in columns["folder_enc"]
    opened = names.state_folder(
        one, account_id=1, clear=None, hashed=columns["folder_hash"], sealed=columns["folder_enc"]
    )
    assert opened == FOLDER
    with pytest.raises(Exception, match="damaged, moved or under another key"):
        names.state_folder(
            one,
            account_id=2,
            clear=None,
            hashed=columns["folder_hash"],
            sealed=columns["folder_enc"],
        )
