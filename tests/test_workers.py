"""Real Redis broker, real `dramatiq` worker processes, real Dovecot and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import func, select

import broker_config
from mailpipe import grants
from mailpipe.models import AccountRun, Email, PipelineJob
from tests.support.faultproxy import FaultProxy
from tests.support.workers import ROOT


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
    assert runs[bad].attempt == broker_config.SETTINGS.retry.max_retries + 1
    assert status["retry_count"] == broker_config.SETTINGS.retry.max_retries
    for account in good:
        assert runs[account].status == "success"
        assert runs[account].finished_at < runs[bad].finished_at
    assert stuck.connections == broker_config.SETTINGS.retry.max_retries + 1


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
    tick = "import broker_config; from actors.schedule import schedule_due; schedule_due()"
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
