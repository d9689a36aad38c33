"""A worker process keeps its PostgreSQL connections: busy threads open no new backends."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import dramatiq
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker

import broker_config
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.crypto import DataKey
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, MailAccount
from mailpipe.vocabulary import Health, JobStatus
from tests.support import postgres
from worker import runtime

THREADS = 8  # `mailpipe worker`'s default
ROUNDS = 3


def test_worker_threads_reuse_their_postgresql_connections(pg_url: str) -> None:
    """Given a worker runtime on PostgreSQL, when 8 threads each hold a connection at the same
    moment, give them back, and do that again three times (busy, then waiting on IMAP), then no
    more backends served them than there are threads: no connection was closed on its return
    and opened again as a new backend at the next busy moment."""
    runtime.configure(replace(broker_config.SETTINGS, database_url=pg_url))
    sessions = runtime.sessions()
    backends: set[int] = set()
    together = threading.Barrier(THREADS)

    def work() -> None:
        for _ in range(ROUNDS):
            with sessions() as session:
                backends.add(session.scalar(text("SELECT pg_backend_pid()")))
                together.wait()  # every thread holds its connection now
            together.wait()  # every connection is back in the pool

    try:
        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 1 <= len(backends) <= THREADS
    finally:
        engine = sessions.kw["bind"]
        engine.dispose()
        runtime.configure(broker_config.SETTINGS)


@dataclass
class PgWorker:
    """A worker runtime on a PostgreSQL database of its own, an in-process worker on the stub
    broker, and one Dovecot account of a user; `fetch` runs a job of that user to its end."""

    url: str
    sessions: sessionmaker[Session]
    pipeline: PipelineBroker
    worker: dramatiq.Worker
    user_id: int
    key: DataKey
    account_id: int

    def fetch(self) -> tuple[str, list[int]]:
        """The job's status and its run's attempts."""
        job_id = self.pipeline.enqueue_fetch_job(self.user_id, key=self.key)
        broker_config.broker.join("fetch", fail_fast=True)
        self.worker.join()
        with self.sessions() as session:
            attempts = session.scalars(
                select(AccountRun.attempt).where(AccountRun.job_id == job_id)
            ).all()
        return self.pipeline.get_job_status(job_id, self.user_id).status, list(attempts)


@pytest.fixture
def pg_worker(pg_admin_url: str, dovecot) -> Iterator[PgWorker]:
    name = postgres.create_database(pg_admin_url)  # its own: every backend of it is the worker's
    url = postgres.database_url(pg_admin_url, name)
    runtime.configure(
        replace(broker_config.SETTINGS, database_url=url), private_key=X25519PrivateKey.generate()
    )
    sessions = runtime.sessions()
    engine = sessions.kw["bind"]
    broker_config.broker.flush_all()
    worker = dramatiq.Worker(broker_config.broker, worker_threads=2, worker_timeout=50)
    worker.start()
    web = db.make_engine(url)  # the enqueuing side's own engine, as a web process has
    pipeline = PipelineBroker(
        db.session_factory(web),
        settings=broker_config.SETTINGS,
        public_key=grants.public_key_bytes(runtime.private_key()),
    )
    try:
        with sessions.begin() as session:
            user, key = create_user(session, f"pg-{secrets.token_hex(4)}", "pw", iterations=1_000)
            login, password = dovecot.new_user()
            settings = ImapSettings(
                host=dovecot.host,
                port=dovecot.port,
                username=login,
                password=password,
                security="none",
            )
            account_id = add_account(session, user, key, settings).id
            user_id = user.id
        yield PgWorker(url, sessions, pipeline, worker, user_id, key, account_id)
    finally:
        worker.stop()
        broker_config.broker.flush_all()
        engine.dispose()
        web.dispose()
        runtime.configure(broker_config.SETTINGS)
        postgres.drop_database(name, pg_admin_url)


def test_a_postgresql_backend_killed_between_runs_costs_one_retried_attempt(
    pg_worker: PgWorker,
) -> None:
    """Given a worker on PostgreSQL whose pool pings no connection before use, and a job that
    synced an account, when PostgreSQL ends every backend of the worker's connections
    (pg_terminate_backend, as a restart or failover does) and the account is fetched again,
    then that run needs exactly one retried attempt and succeeds: the dropped connection fails
    the first attempt's first statement, the pool replaces it, and the job does not fail; the
    account's health stays HEALTHY (the mail server was never tried by the failed attempt)."""
    assert pg_worker.sessions.kw["bind"].pool._pre_ping is False
    assert pg_worker.fetch() == (JobStatus.SUCCESS, [1])
    with psycopg.connect(postgres.libpq_url(pg_worker.url), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert killed is not None and killed[0] >= 1
    assert pg_worker.fetch() == (JobStatus.SUCCESS, [2])
    with pg_worker.sessions() as session:
        account = session.get_one(MailAccount, pg_worker.account_id)
        assert account.health_status == Health.HEALTHY


def test_a_no_change_poll_costs_the_worker_three_transactions_and_no_ping(
    pg_worker: PgWorker,
) -> None:
    """Given a worker on PostgreSQL and an account synced once, when the account is polled
    again and nothing changed, then the worker's engine began three transactions for that run
    (its start, the sync's, its end: the circuit gate and the health update ride in the first
    and the last) and one for the metrics of the job it finished (a job of one account), and
    sent no `SELECT 1` ping."""
    assert pg_worker.fetch() == (JobStatus.SUCCESS, [1])
    engine = pg_worker.sessions.kw["bind"]
    begun: list[int] = []
    pings: list[str] = []

    def on_begin(_connection: object) -> None:
        begun.append(1)

    def on_statement(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.strip().upper() == "SELECT 1":
            pings.append(statement)

    event.listen(engine, "begin", on_begin)
    event.listen(engine, "before_cursor_execute", on_statement)
    try:
        assert pg_worker.fetch() == (JobStatus.SUCCESS, [1])
    finally:
        event.remove(engine, "begin", on_begin)
        event.remove(engine, "before_cursor_execute", on_statement)
    # the test's own read of the run's attempts is one more
    assert (len(begun) - 1, pings) == (3 + 1, [])
