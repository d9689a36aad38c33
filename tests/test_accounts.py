"""The one ownership check: an account is its owner's, and for anyone else it does not exist."""

from __future__ import annotations

import os

import pytest

from mailpipe import db
from mailpipe.accounts import (
    account_folders,
    add_account,
    convert_user_folders,
    create_user,
    owned_account,
    read_credentials,
    unlock_user,
)
from mailpipe.crypto import LEGACY_WRAP, WRAP_VERSION, KdfParams
from mailpipe.errors import DecryptionFailed, NotFound, WrongPassword
from mailpipe.imap import ImapSettings
from mailpipe.models import MailAccount, User
from tests.support.keys import legacy_wrap

FAST_KDF = 1_000


def test_an_account_is_found_for_its_owner_and_not_found_for_anyone_else(tmp_path):
    # Given alice's account and bob, in a fresh database
    engine = db.make_engine(f"sqlite:///{tmp_path / 'owned.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(host="imap.example.org", username="alice", password="pw")
    with sessions.begin() as session:
        alice, key = create_user(session, "alice", "alice-pw")
        bob, _ = create_user(session, "bob", "bob-pw")
        account_id = add_account(session, alice, key, settings).id
    with sessions() as session:
        # When alice asks for it, Then she gets it
        assert owned_account(session, account_id, alice.id).id == account_id
        # When bob asks for it, or anyone for one that does not exist, Then both are the same
        # "not found", so bob cannot tell that the account exists
        with pytest.raises(NotFound) as foreign:
            owned_account(session, account_id, bob.id)
        with pytest.raises(NotFound) as missing:
            owned_account(session, account_id + 1, alice.id)
    assert str(foreign.value) == f"account {account_id} not found"
    assert str(missing.value) == f"account {account_id + 1} not found"
    engine.dispose()


def test_a_data_key_copied_onto_another_users_row_is_refused(db_url):
    # Given alice, and mallory who can write to the database and knows her own password
    engine = db.make_engine(db_url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        create_user(session, "alice", "alice-pw", iterations=FAST_KDF)
        create_user(session, "mallory", "mallory-pw", iterations=FAST_KDF)
    # When mallory copies her wrapped data key (and its KDF parameters) onto alice's row
    with sessions.begin() as session:
        alice = session.query(User).filter_by(name="alice").one()
        mallory = session.query(User).filter_by(name="mallory").one()
        alice.kdf, alice.wrapped_dek, alice.key_wrap = (
            mallory.kdf,
            mallory.wrapped_dek,
            mallory.key_wrap,
        )
    # Then logging in as alice with mallory's password is refused with a clear error (it would
    # otherwise open a session as alice under a key mallory knows), and mallory's own row works
    with sessions.begin() as session, pytest.raises(WrongPassword) as refused:
        unlock_user(session, "alice", "mallory-pw")
    assert str(refused.value) == (
        "wrong password: it does not unlock this user's data key "
        "(or the key stored for this user was wrapped for another user)"
    )
    with sessions.begin() as session:
        assert unlock_user(session, "mallory", "mallory-pw")[0].name == "mallory"
    engine.dispose()


def test_an_old_format_key_is_rewrapped_at_login_and_then_bound_to_its_user(db_url):
    # Given alice's row as it was before migration 0014: her data key wrapped bound to no user,
    # and an account whose credentials that key encrypted
    engine = db.make_engine(db_url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(host="imap.example.org", username="alice", password="imap-pw")
    with sessions.begin() as session:
        alice, key = create_user(session, "alice", "alice-pw", iterations=FAST_KDF)
        account_id = add_account(session, alice, key, settings).id
        params = KdfParams(salt=os.urandom(16), iterations=FAST_KDF)
        alice.kdf = params.to_json()
        alice.wrapped_dek = legacy_wrap(key, "alice-pw", params)
        alice.key_wrap = LEGACY_WRAP
        bob, _ = create_user(session, "bob", "bob-pw", iterations=FAST_KDF)
        old_wrap, bob_id = alice.wrapped_dek, bob.id
    # When she logs in (the web login and the commands unlock in one committed transaction)
    with sessions.begin() as session:
        _user, opened = unlock_user(session, "alice", "alice-pw")
    # Then it is her key, and her row now carries the new form under the same KDF parameters
    with sessions() as session:
        row = session.query(User).filter_by(name="alice").one()
        assert row.key_wrap == WRAP_VERSION and row.wrapped_dek != old_wrap
        assert row.kdf == params.to_json()
        account = owned_account(session, account_id, row.id)
        assert read_credentials(account, opened)["password"] == "imap-pw"
        new_form = (row.kdf, row.wrapped_dek, row.key_wrap)
    # And she logs in again with it; a copy of the new form on bob's row no longer opens there
    with sessions.begin() as session:
        assert unlock_user(session, "alice", "alice-pw")[1].export() == key.export()
        bob_row = session.get_one(User, bob_id)
        bob_row.kdf, bob_row.wrapped_dek, bob_row.key_wrap = new_form
    with sessions.begin() as session, pytest.raises(WrongPassword):
        unlock_user(session, "bob", "alice-pw")
    engine.dispose()


def test_a_folder_list_is_stored_sealed_to_its_account_and_read_back(db_url):
    # Given alice's new account that syncs two folders whose names say what the mail is about
    engine = db.make_engine(db_url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(host="imap.example.org", username="alice", password="pw")
    wanted = ["INBOX", "Kanzlei/Scheidung Müller"]
    with sessions.begin() as session:
        alice, key = create_user(session, "alice", "alice-pw", iterations=FAST_KDF)
        first = add_account(session, alice, key, settings, folders=wanted)
        second = add_account(session, alice, key, settings)
    with sessions.begin() as session:
        first = session.get_one(MailAccount, first.id)
        second = session.get_one(MailAccount, second.id)
        # Then the list reads back with her key, and no folder name is in the row in clear
        assert account_folders(first, key) == wanted
        assert account_folders(second, key) == ["INBOX"]
        assert first.folders is None and first.folders_enc is not None
        assert b"Scheidung" not in first.folders_enc
        # When the sealed list is copied onto her other account's row
        second.folders_enc = first.folders_enc
    # Then it does not open there (it is bound to the row it was written for)
    with sessions() as session, pytest.raises(DecryptionFailed):
        account_folders(session.get_one(MailAccount, second.id), key)
    engine.dispose()


def test_a_folder_list_in_clear_from_before_0016_is_read_and_sealed_once(db_url):
    # Given an account whose folder list is still in clear, as before migration 0016
    engine = db.make_engine(db_url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(host="imap.example.org", username="anna", password="pw")
    with sessions.begin() as session:
        anna, key = create_user(session, "anna", "anna-pw", iterations=FAST_KDF)
        account = add_account(session, anna, key, settings)
        account.folders, account.folders_enc = ["INBOX", "Archiv"], None
    with sessions.begin() as session:
        account = session.get_one(MailAccount, account.id)
        # Then it is read as it is
        assert account_folders(account, key) == ["INBOX", "Archiv"]
        # When her key converts her accounts (as at her next web login)
        converted = convert_user_folders(session, user_id=anna.id, key=key)
    # Then the list is sealed and the clear copy gone; a second conversion finds nothing
    with sessions.begin() as session:
        account = session.get_one(MailAccount, account.id)
        assert converted == 1 and account.folders is None
        assert account_folders(account, key) == ["INBOX", "Archiv"]
        assert convert_user_folders(session, user_id=anna.id, key=key) == 0
    engine.dispose()
