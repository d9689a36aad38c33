"""A mailpipe cluster in miniature: real Redis broker, real `dramatiq` worker processes,
PostgreSQL, and the real Dovecot; each in a namespace or database of its own."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

import broker_config  # noqa: F401  (the stub broker the actors of this process are declared on)
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun
from mailpipe.models import User as UserRow
from mailpipe.settings import Settings
from tests.support import postgres
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK_HOSTS
from tests.support.workers import REDIS_URL, Workers, delete_namespace, new_namespace
from worker.broker import build_broker

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
    namespace: str = ""
    database: str = ""
    redis_url: str = REDIS_URL

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

    def wait(self, job_id: str, user_id: int, *, seconds: float = JOB_WAIT_SECONDS) -> dict:
        """The job once final, in the JSON form host apps read."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = self.pipeline.get_job_status(job_id, user_id)
            if status.final:
                return status.to_json()
            time.sleep(0.1)
        raise AssertionError(f"job not final in time; worker log:\n{self.workers.log()[-3000:]}")

    def runs(self, job_id: str) -> list[AccountRun]:
        with self.sessions() as session:
            return list(session.scalars(select(AccountRun).where(AccountRun.job_id == job_id)))

    def restart_workers(self) -> Workers:
        """Stop (or reap) the worker group and start a fresh one with the same settings."""
        self.workers.stop()
        self.workers = Workers(
            self.env, processes=self.workers.processes, threads=self.workers.threads
        ).start()
        return self.workers


@contextlib.contextmanager
def running_cluster(
    dovecot,
    tmp_path: Path,
    *,
    redis_url: str = REDIS_URL,
    extra_env: Mapping[str, str] | None = None,
    processes: int = 2,
    threads: int = 4,
) -> Iterator[Cluster]:
    """Start a cluster (own namespace, own database, own workers) and remove all of it after."""
    namespace = new_namespace()
    name = postgres.create_database()
    url = postgres.database_url(postgres.ADMIN_URL, name)
    key_file = tmp_path / "worker.key"
    public_key = grants.generate_worker_key(key_file)
    env = {
        **os.environ,
        "MAILPIPE_BROKER_URL": redis_url,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_DATABASE_URL": url,
        "MAILPIPE_WORKER_KEY_FILE": str(key_file),
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_MIN_BACKOFF_MS": "200",
        "MAILPIPE_ALLOW_PRIVATE_HOSTS": LOOPBACK_HOSTS,  # Dovecot and the proxies: loopback
        "TZ": "UTC",
        **(extra_env or {}),
    }
    engine = db.make_engine(url)
    broker = None
    workers = None
    cluster: Cluster | None = None
    try:
        db.migrate(engine)
        sessions = db.session_factory(engine)
        settings = Settings.from_env(env)  # what the workers read from the same environment
        broker = build_broker(settings)
        workers = Workers(env, processes=processes, threads=threads).start()
        cluster = Cluster(
            env,
            sessions,
            PipelineBroker(sessions, settings=settings, public_key=public_key, broker=broker),
            dovecot,
            workers,
            namespace=namespace,
            database=name,
            redis_url=redis_url,
        )
        yield cluster
    finally:
        if cluster is not None:
            cluster.workers.stop()  # the cluster may have restarted its workers
        if workers is not None:
            workers.stop()
        if broker is not None:
            broker.close()
        engine.dispose()
        with contextlib.suppress(Exception):  # a Redis the test stopped has nothing to clean
            delete_namespace(namespace, redis_url)
        postgres.drop_database(name)


@pytest.fixture
def cluster(dovecot, tmp_path) -> Iterator[Cluster]:
    with running_cluster(dovecot, tmp_path) as running:
        yield running
