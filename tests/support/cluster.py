"""A mailpipe cluster in miniature: real Redis broker, real `dramatiq` worker processes,
PostgreSQL, and the real Dovecot; each in a namespace or database of its own."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
from sqlalchemy import select

import broker_config
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun
from mailpipe.models import User as UserRow
from tests.support import postgres
from tests.support.messages import plain_message as message
from tests.support.workers import REDIS_URL, Workers, delete_namespace, new_namespace

FAST_KDF = 1_000
JOB_WAIT_SECONDS = 90


@dataclass
class Cluster:
    """Workers, a scheduler-free pipeline on Redis, and the database they share."""

    env: dict[str, str]
    sessions: object
    pipeline: PipelineBroker
    dovecot: object
    workers: Workers

    def user(self, name: str):
        with self.sessions.begin() as session:
            user, key = create_user(session, name, "pw", iterations=FAST_KDF)
        return user.id, key

    def account(self, user_id, key, *, port: int, mails: int = 0) -> int:
        login, password = self.dovecot.new_user()
        if mails:
            self.dovecot.append(login, password, [message(i) for i in range(mails)])
        settings = ImapSettings(
            host="127.0.0.1", port=port, username=login, password=password, security="none"
        )
        with self.sessions.begin() as session:
            owner = session.get_one(UserRow, user_id)
            return add_account(session, owner, key, settings).id

    def wait(self, job_id: str, user_id: int) -> dict:
        deadline = time.monotonic() + JOB_WAIT_SECONDS
        while time.monotonic() < deadline:
            status = self.pipeline.get_job_status(job_id, user_id)
            if status["final"]:
                return status
            time.sleep(0.1)
        raise AssertionError(f"job not final in time; worker log:\n{self.workers.log()[-3000:]}")

    def runs(self, job_id: str) -> list[AccountRun]:
        with self.sessions() as session:
            return list(session.scalars(select(AccountRun).where(AccountRun.job_id == job_id)))


@pytest.fixture
def cluster(dovecot, tmp_path) -> Cluster:
    namespace = new_namespace()
    name = postgres.create_database()
    url = postgres.database_url(postgres.ADMIN_URL, name)
    key_file = tmp_path / "worker.key"
    public_key = grants.generate_worker_key(key_file)
    env = {
        **os.environ,
        "MAILPIPE_BROKER_URL": REDIS_URL,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_DATABASE_URL": url,
        "MAILPIPE_WORKER_KEY_FILE": str(key_file),
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_MIN_BACKOFF_MS": "200",
        "TZ": "UTC",
    }
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    broker = broker_config.build_broker(REDIS_URL, namespace=namespace)
    workers = Workers(env).start()
    try:
        yield Cluster(
            env,
            sessions,
            PipelineBroker(sessions, public_key=public_key, broker=broker),
            dovecot,
            workers,
        )
    finally:
        workers.stop()
        broker.close()
        engine.dispose()
        delete_namespace(namespace)
        postgres.drop_database(name)
