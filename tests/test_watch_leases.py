"""Watch leases: which watcher holds which account, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import db, grants, leases
from mailpipe.crypto import DataKey
from mailpipe.models import KeyGrant, MailAccount, User, utcnow
from mailpipe.vocabulary import Health

LEASE = 45.0


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield db.session_factory(engine)
    engine.dispose()


def user_with_accounts(
    sessions: sessionmaker[Session], name: str, count: int, *, grant: bool = True
) -> tuple[int, list[int]]:
    with sessions.begin() as session:
        user = User(name=name, kdf={}, wrapped_dek=b"not a real wrapped key")
        session.add(user)
        session.flush()
        accounts = [MailAccount(user_id=user.id) for _ in range(count)]
        session.add_all(accounts)
        if grant:
            grants.grant_background(
                session,
                user_id=user.id,
                key=DataKey.generate(),
                public_key=grants.public_key_bytes(X25519PrivateKey.generate()),
                ttl_seconds=3600,
            )
        session.flush()
        return user.id, [account.id for account in accounts]


def claim(sessions: sessionmaker[Session], owner: str, limit: int = 100) -> set[int]:
    with sessions.begin() as session:
        return leases.claim_watches(session, owner=owner, seconds=LEASE, limit=limit)


def test_two_watchers_never_hold_one_account(sessions):
    # Given five accounts with push on and a live grant
    _user, accounts = user_with_accounts(sessions, "anna", 5)
    # When two watchers claim, each with room for three
    first = claim(sessions, "w1", limit=3)
    second = claim(sessions, "w2", limit=3)
    # Then they share the accounts without overlap, and renewing keeps each one's own
    assert first.isdisjoint(second) and first | second == set(accounts)
    assert (len(first), len(second)) == (3, 2)
    assert claim(sessions, "w1", limit=3) == first
    assert claim(sessions, "w2", limit=3) == second


def test_a_lapsed_lease_is_taken_over(sessions):
    # Given a watcher holding every account, which then stops renewing (killed)
    _user, accounts = user_with_accounts(sessions, "ben", 2)
    assert claim(sessions, "dead") == set(accounts)
    assert claim(sessions, "alive") == set()
    with sessions.begin() as session:
        session.execute(update(MailAccount).values(watch_until=utcnow() - timedelta(seconds=1)))
    # When another watcher claims after the leases lapsed
    # Then it gets them, and the dead one's renewal (if it came back) gets nothing
    assert claim(sessions, "alive") == set(accounts)
    assert claim(sessions, "dead") == set()


def test_push_off_broken_or_without_grant_is_not_watched_and_is_given_back(sessions):
    # Given accounts held by a watcher
    user_id, accounts = user_with_accounts(sessions, "clara", 3)
    _other, ungranted = user_with_accounts(sessions, "dora", 1, grant=False)
    assert claim(sessions, "w1") == set(accounts)
    # When one account's push is turned off and another goes BROKEN
    with sessions.begin() as session:
        session.get_one(MailAccount, accounts[0]).push_enabled = False
        session.get_one(MailAccount, accounts[1]).health_status = Health.BROKEN
    # Then the watcher keeps only the third, and the others are free again
    assert claim(sessions, "w1") == {accounts[2]}
    with sessions() as session:
        assert session.get_one(MailAccount, accounts[0]).watch_owner is None
    # When the owner's background grant ends (logout)
    with sessions.begin() as session:
        grants.revoke_background(session, user_id)
    # Then nothing of that user is held; an account whose user never granted never was
    assert claim(sessions, "w1") == set()
    assert ungranted[0] not in claim(sessions, "w2")


def test_release_gives_every_lease_back(sessions):
    # Given a watcher holding accounts
    _user, accounts = user_with_accounts(sessions, "eva", 2)
    claim(sessions, "w1")
    # When it stops and releases them
    with sessions.begin() as session:
        leases.release_watches(session, owner="w1")
    # Then another watcher gets them at once, without waiting for a lapse
    assert claim(sessions, "w2") == set(accounts)


def test_an_expired_grant_ends_the_watching_like_a_logout(sessions):
    # Given a watcher holding a user's accounts
    user_id, accounts = user_with_accounts(sessions, "fritz", 2)
    assert claim(sessions, "w1") == set(accounts)
    # When the user's background grant expires (no logout, just time)
    with sessions.begin() as session:
        session.execute(
            update(KeyGrant)
            .where(KeyGrant.user_id == user_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    # Then the watcher's next renewal gives the accounts up
    assert claim(sessions, "w1") == set()
