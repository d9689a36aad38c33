"""Crashes on the real Redis broker with real worker processes and PostgreSQL.

Worker processes are SIGKILLed mid-sync, Redis is restarted mid-run, PostgreSQL connections are
dropped mid-save: every job still ends, and every message is stored exactly once.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import dramatiq
import psycopg
import pytest
import redis
from dramatiq.brokers.stub import StubBroker

import broker_config
import middleware
from mailpipe.retry import RetryPolicy
from mailpipe.settings import Settings
from tests.support import postgres
from tests.support.cluster import running_cluster
from tests.support.crash import CRASH_ENV, PER_ROUND, CrashReport, Drill, kill_loop, wait_for
from tests.support.faultproxy import FaultProxy
from tests.support.redis_server import RedisServer
from tests.support.workers import REDIS_URL, ROOT, delete_namespace, new_namespace
from worker.broker import build_broker

KILLS = int(os.environ.get("MAILPIPE_TEST_KILLS", "3"))
LINK_LATENCY = 0.03  # seconds each way: a sync lasts long enough to be killed in the middle
SLOT_HOLDER = """
import time
import broker_config
from worker import runtime
with runtime.host_slot("imap.example.org", ttl_ms=1500) as acquired:
    print("held" if acquired else "busy", flush=True)
    time.sleep(60)
"""
SLOT_TRY = """
import broker_config
from worker import runtime
with runtime.host_slot("imap.example.org", ttl_ms=1500) as acquired:
    print("free" if acquired else "busy")
"""


def first_message(consumer, seconds: float = 3.0):
    """The consumer's next message, or None when none comes in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            return message
    return None


def try_slot(env: dict[str, str]) -> str:
    """Ask for the host's slot from a fresh process, as another worker would."""
    done = subprocess.run(
        [sys.executable, "-c", SLOT_TRY], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


@pytest.fixture
def crash_cluster(dovecot, tmp_path):
    """A cluster whose killed workers' messages come back within seconds."""
    with running_cluster(dovecot, tmp_path, extra_env=CRASH_ENV) as cluster:
        yield cluster


@pytest.mark.parametrize("kills", [KILLS])
def test_workers_killed_mid_sync_lose_and_double_nothing(crash_cluster, dovecot, kills, capsys):
    # Given three accounts behind a slow link, and fetch jobs taking all their mail
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as link:
        link.latency(LINK_LATENCY)
        drill = Drill(crash_cluster, port=link.port, accounts=3, rng=random.Random(kills))
        # When every worker process is SIGKILLed in the middle of a sync, again and again
        report = kill_loop(crash_cluster, drill, link, kills=kills, log=print)
    with capsys.disabled():
        print(f"\ncrash drill: {report.line()}")
    # Then every job is final, no run is left open, and each message is stored exactly once
    assert report.kills == kills
    assert report.final_jobs == report.jobs >= 1
    assert report.open_runs == 0
    assert set(report.statuses) == {"success"}
    assert (report.lost, report.duplicates) == (0, 0)
    assert report.stored == report.expected > 0


@pytest.mark.parametrize("down_seconds", [0.0, 2.0])
def test_redis_restarted_mid_run_jobs_still_finish(dovecot, tmp_path, down_seconds, capsys):
    # Given a Redis of our own that keeps an append-only file, and workers using it
    with (
        RedisServer(tmp_path / "redis") as server,
        running_cluster(dovecot, tmp_path, redis_url=server.url, extra_env=CRASH_ENV) as cluster,
        FaultProxy(upstream=(dovecot.host, dovecot.port)) as link,
    ):
        link.latency(LINK_LATENCY)
        drill = Drill(cluster, port=link.port, accounts=3, rng=random.Random(2))
        drill.deliver(PER_ROUND)
        drill.enqueue()
        drill.enqueue()  # its messages wait in Redis (the accounts are leased) during the restart
        assert wait_for(lambda: link.active > 0, 30), "no sync started"
        # When Redis is stopped and started again while the syncs run
        server.restart(down_seconds=down_seconds)
        drill.settle()
        report = drill.report(CrashReport())
    with capsys.disabled():
        print(f"\nredis restart ({down_seconds:g} s down): {report.line()}")
    # Then both jobs end well and each message is stored exactly once
    assert server.starts == 2
    assert report.final_jobs == report.jobs == 2
    assert set(report.statuses) == {"success"}
    assert report.open_runs == 0
    assert (report.lost, report.duplicates) == (0, 0)
    assert report.stored == report.expected == 3 * PER_ROUND


class FlakyBroker(StubBroker):
    """A stub broker whose first sends fail as they do while Redis restarts."""

    def __init__(self, failures: int) -> None:
        super().__init__(middleware=[])
        self.failures = failures
        self.sent: list[dramatiq.Message] = []

    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")
        self.sent.append(message)
        return message


def test_a_retry_sent_while_redis_is_down_is_sent_once_it_is_back(monkeypatch):
    # Given a failed attempt whose retry cannot be sent at first (Redis is restarting)
    monkeypatch.setattr(middleware, "REENQUEUE_DELAY_SECONDS", 0.0)
    broker = FlakyBroker(failures=2)
    dramatiq.actor(lambda: None, actor_name="flaky", broker=broker)
    message = dramatiq.Message(
        queue_name="default", actor_name="flaky", args=(), kwargs={}, options={}
    )
    retries = middleware.DurableRetries(
        policy=RetryPolicy(max_retries=3, min_backoff_ms=10, max_backoff_ms=20)
    )
    # When the Retries middleware handles the failure
    retries.after_process_message(broker, message, exception=RuntimeError("transient"))
    # Then the retry is sent once Redis answers, counted as the first retry, not the third
    assert [m.options["retries"] for m in broker.sent] == [1]
    assert broker.failures == 0


@pytest.fixture
def namespace():
    """A Redis namespace of this test's own on the shared Redis, removed afterwards."""
    name = new_namespace()
    yield name
    delete_namespace(name)


def test_a_delayed_message_dropped_on_a_connection_error_is_taken_back(namespace):
    # Given a worker's consumer holding a delayed message (a retry waiting out its backoff)
    broker = build_broker(Settings(broker_url=REDIS_URL, redis_namespace=namespace))
    try:
        dramatiq.actor(lambda: None, actor_name="delayed", broker=broker, queue_name="work")
        broker.enqueue(
            dramatiq.Message(
                queue_name="work", actor_name="delayed", args=(), kwargs={}, options={}
            ),
            delay=1,
        )
        held = first_message(broker.consume("work.DQ", timeout=100))
        # When a connection error makes Dramatiq drop it and start a new consumer
        again = broker.consume("work.DQ", timeout=100)
        # Then the new consumer gets the message again instead of leaving it stranded
        redelivered = first_message(again)
        assert redelivered is not None, "the delayed message stays stranded in the acks set"
        assert redelivered.message_id == held.message_id
    finally:
        broker.close()


def test_a_killed_workers_connection_slot_frees_itself(namespace, tmp_path):
    # Given a process holding the only connection slot of a host, with a 1.5 s claim (the
    # processes share a data directory, so one server secret names the host's slots alike)
    env = {
        **os.environ,
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_BROKER_URL": REDIS_URL,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_MAX_CONNECTIONS_PER_HOST": "1",
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", SLOT_HOLDER], env=env, cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        # When it is SIGKILLed while holding the slot
        holder.kill()
        holder.wait()
        # Then the slot is taken until the claim lapses, and free afterwards
        assert try_slot(env) == "busy"
        time.sleep(1.6)
        assert try_slot(env) == "free"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def drop_saving_connections(database: str, *, seconds: float = 30.0) -> int:
    """Wait for a worker's INSERT of mail into `database`, then terminate its connection."""
    deadline = time.monotonic() + seconds
    with psycopg.connect(postgres.libpq_url(postgres.ADMIN_URL), autocommit=True) as admin:
        while time.monotonic() < deadline:
            dropped = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()"
                " AND state IN ('active', 'idle in transaction')"
                " AND query ILIKE 'INSERT INTO emails%%'",
                (database,),
            ).fetchone()[0]
            if dropped:
                return dropped
            time.sleep(0.002)
    return 0


def test_postgres_connections_dropped_mid_save_jobs_still_finish(crash_cluster, dovecot, capsys):
    # Given three accounts whose syncs save mail in more than one batch
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as link:
        link.latency(LINK_LATENCY)
        drill = Drill(crash_cluster, port=link.port, accounts=3, rng=random.Random(3))
        drill.deliver(PER_ROUND)
        drill.enqueue()
        # When the database connection is killed in the middle of saving a batch, twice
        dropped = [drop_saving_connections(crash_cluster.database) for _ in range(2)]
        drill.settle()
    report = drill.report(CrashReport())
    with capsys.disabled():
        print(f"\npostgres connections dropped mid-save {dropped}: {report.line()}")
    # Then the job still succeeds, the interrupted runs took another attempt, nothing is doubled
    assert all(dropped), "no save was caught in the middle"
    [job_id] = drill.jobs
    runs = crash_cluster.runs(job_id)
    assert report.statuses == {"success": 1}
    assert report.open_runs == 0
    assert 1 < max(run.attempt for run in runs) <= broker_config.SETTINGS.retry.max_retries + 1
    assert (report.lost, report.duplicates) == (0, 0)
    assert report.stored == report.expected == 3 * PER_ROUND
