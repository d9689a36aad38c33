"""A whole mailpipe in one process: stub broker, in-process worker, real Dovecot, SQLite."""

from __future__ import annotations

from dataclasses import dataclass, field

import dramatiq
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select

import broker_config
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.crypto import DataKey
from mailpipe.imap import ImapSettings
from mailpipe.models import Email
from mailpipe.models import User as UserRow
from tests.support.messages import plain_message as message
from worker import runtime

FAST_KDF = 1_000


@dataclass
class User:
    id: int
    key: DataKey
    accounts: list[int] = field(default_factory=list)
    mailboxes: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class World:
    """A database, a worker key, a stub-broker worker and a real Dovecot to sync from."""

    sessions: object
    dovecot: object
    private_key: X25519PrivateKey
    pipeline: PipelineBroker
    worker: dramatiq.Worker

    def user(self, name: str) -> User:
        with self.sessions.begin() as session:
            row, key = create_user(session, name, "pw", iterations=FAST_KDF)
        return User(row.id, key)

    def account(self, user: User, *, password: str | None = None, mails: int = 0, **kw) -> int:
        login, real_password = self.dovecot.new_user()
        if mails:
            self.dovecot.append(login, real_password, [message(i) for i in range(mails)])
        settings = ImapSettings(
            host=self.dovecot.host,
            port=kw.pop("port", self.dovecot.port),
            username=login,
            password=password or real_password,
            security=kw.pop("security", "none"),
        )
        with self.sessions.begin() as session:
            owner = session.get_one(UserRow, user.id)
            account_id = add_account(session, owner, user.key, settings, **kw).id
        user.accounts.append(account_id)
        user.mailboxes[account_id] = (login, real_password)
        return account_id

    def run(self, user: User, account_id: int | None = None, **options) -> dict:
        """Run a job to its end; the job in the JSON form host apps read."""
        job_id = self.pipeline.enqueue_fetch_job(user.id, account_id, key=user.key, **options)
        self.wait()
        return self.pipeline.get_job_status(job_id, user.id).to_json()

    def wait(self) -> None:
        broker_config.broker.join("fetch", fail_fast=True)
        self.worker.join()

    def emails(self, account_id: int) -> list[Email]:
        with self.sessions() as session:
            return list(session.scalars(select(Email).where(Email.account_id == account_id)))


@pytest.fixture
def world(dovecot, tmp_path) -> World:
    assert isinstance(broker_config.broker, dramatiq.brokers.stub.StubBroker), (
        "unit tests run on the stub broker: unset MAILPIPE_BROKER_URL"
    )
    # broker_config.SETTINGS allow loopback (tests/conftest.py): Dovecot listens there
    assert broker_config.SETTINGS.address_policy.allow, "tests/conftest.py sets the allowance"
    engine = db.make_engine(f"sqlite:///{tmp_path / 'pipeline.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    private_key = X25519PrivateKey.generate()
    runtime.configure(broker_config.SETTINGS, sessions=sessions, private_key=private_key)
    broker_config.broker.flush_all()
    worker = dramatiq.Worker(broker_config.broker, worker_threads=4, worker_timeout=50)
    worker.start()
    pipeline = PipelineBroker(
        sessions, settings=broker_config.SETTINGS, public_key=grants.public_key_bytes(private_key)
    )
    try:
        yield World(sessions, dovecot, private_key, pipeline, worker)
    finally:
        worker.stop()
        broker_config.broker.flush_all()
        engine.dispose()
