"""Real Redis broker, real `dramatiq` worker processes, real Dovecot and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select
from tests.support.faultproxy import FaultProxy

import broker_config
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, Email, PipelineJob
from mailpipe.models import User as UserRow
from tests.support import postgres
from tests.support.workers import REDIS_URL, ROOT, Workers, delete_namespace, new_namespace
from tests.test_sync import message

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
def cluster(dovecot, tmp_path):
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


def overlap(runs: list[AccountRun]) -> bool:
    """Every run started before any run finished: they ran side by side."""
    return max(run.started_at for run in runs) < min(run.finished_at for run in runs)


def test_accounts_of_one_job_run_in_parallel(cluster, dovecot):
    # Given three accounts behind links of different latency
    user_id, key = cluster.user("alice")
    with (
        FaultProxy(upstream=(dovecot.host, dovecot.port)) as slow,
        FaultProxy(upstream=(dovecot.host, dovecot.port)) as slower,
        FaultProxy(upstream=(dovecot.host, dovecot.port)) as fast,
    ):
        slow.latency(0.25)
        slower.latency(0.32)
        fast.latency(0.18)
        for proxy in (slow, slower, fast):
            cluster.account(user_id, key, port=proxy.port, mails=3)
        # When one job fetches all of them
        job_id = cluster.pipeline.enqueue_fetch_job(user_id, key=key)
        status = cluster.wait(job_id, user_id)
    # Then it succeeds, and the three syncs ran at the same time, not one after another
    assert status["status"] == "success"
    assert status["emails_fetched"] == 9
    assert overlap(cluster.runs(job_id))


def test_a_timing_out_account_is_retried_without_holding_back_the_others(cluster, dovecot):
    user_id, key = cluster.user("alice")
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as stuck:
        stuck.stall()
        good = [cluster.account(user_id, key, port=dovecot.port, mails=2) for _ in range(2)]
        bad = cluster.account(user_id, key, port=stuck.port, mails=2)
        job_id = cluster.pipeline.enqueue_fetch_job(user_id, key=key, timeout_seconds=2)
        status = cluster.wait(job_id, user_id)
    runs = {run.account_id: run for run in cluster.runs(job_id)}
    assert status["status"] == "partial_failure"
    assert runs[bad].status == "failed"
    assert runs[bad].error_class == "timeout"
    assert runs[bad].attempt == broker_config.MAX_RETRIES + 1
    assert status["retry_count"] == broker_config.MAX_RETRIES
    for account in good:
        assert runs[account].status == "success"
        assert runs[account].finished_at < runs[bad].finished_at
    assert stuck.connections == broker_config.MAX_RETRIES + 1


def test_the_same_account_never_syncs_twice_at_once(cluster, dovecot):
    user_id, key = cluster.user("alice")
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as link:
        link.latency(0.05)
        account = cluster.account(user_id, key, port=link.port, mails=20)
        # When two jobs for the one account are enqueued back to back
        first = cluster.pipeline.enqueue_fetch_job(user_id, account, key=key)
        second = cluster.pipeline.enqueue_fetch_job(user_id, account, key=key)
        statuses = [cluster.wait(job, user_id) for job in (first, second)]
    # Then both end well, one after the other, and every message is stored once
    assert [s["status"] for s in statuses] == ["success", "success"]
    assert link.max_active == 1
    with cluster.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Email)) == 20
    assert sorted(s["emails_fetched"] for s in statuses) == [0, 20]


def test_two_schedulers_never_enqueue_an_account_twice(cluster, dovecot):
    user_id, key = cluster.user("alice")
    accounts = [cluster.account(user_id, key, port=dovecot.port) for _ in range(12)]
    with cluster.sessions.begin() as session:
        grants.grant_background(
            session,
            user_id=user_id,
            key=key,
            public_key=cluster.pipeline.public_key,
            ttl_seconds=600,
        )
    # When two scheduler processes fire at the same moment
    tick = "from actors.schedule import schedule_due; schedule_due()"
    schedulers = [
        subprocess.Popen([sys.executable, "-c", tick], env=cluster.env, cwd=ROOT) for _ in range(2)
    ]
    assert [p.wait(60) for p in schedulers] == [0, 0]
    # Then each account got exactly one scheduled job
    with cluster.sessions() as session:
        per_account = dict(
            session.execute(
                select(AccountRun.account_id, func.count())
                .join(PipelineJob, PipelineJob.id == AccountRun.job_id)
                .where(PipelineJob.type == "scheduled")
                .group_by(AccountRun.account_id)
            ).all()
        )
    assert per_account == {account: 1 for account in accounts}
