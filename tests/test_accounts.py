"""The one ownership check: an account is its owner's, and for anyone else it does not exist."""

from __future__ import annotations

import pytest

from mailpipe import db
from mailpipe.accounts import add_account, create_user, owned_account
from mailpipe.errors import NotFound
from mailpipe.imap import ImapSettings


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
