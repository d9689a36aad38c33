"""metrics/: bounded labels, the observer's records, the multiprocess directory, the collectors."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dramatiq
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import q_name
from prometheus_client import REGISTRY, generate_latest
from sqlalchemy import update

from mailpipe import db, grants, jobs, models
from mailpipe.accounts import add_account, create_user
from mailpipe.errors import MailpipeError
from mailpipe.failures import Failure
from mailpipe.imap import ImapSettings
from mailpipe.jobs import FinishedJob
from mailpipe.observer import PhaseTimer
from mailpipe.runner import Next, RunOutcome
from mailpipe.sync import FolderResult, SyncResult
from mailpipe.vocabulary import CircuitState, Health, JobType
from metrics import exporter, multiprocess
from metrics.collectors import AccountCollector, QueueCollector
from metrics.middleware import DramatiqMetrics
from metrics.observer import MetricsObserver, WatchMetrics, record_finished_job
from tests.support.workers import REDIS_URL, ROOT, delete_namespace, new_namespace

FAST_KDF = 1_000
PLANTED = ("planted-user", "planted-account", "planted.address@example.org", "PlantedFolder")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def collected(collector) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


# -- labels --------------------------------------------------------------------------------


def test_labels_never_carry_names_or_addresses_whatever_the_caller_passes():
    # Given an observer and records fed with a user, account, address and folder name
    observer = MetricsObserver(provider="planted.address@example.org")
    for planted in PLANTED:
        observer.after_phase(planted, 0.1)
        observer.after_batch(
            fetched=1, fetched_bytes=10, saved=1, duplicates=0, quarantined={planted: 1}
        )
        observer.record_outcome(RunOutcome(Next.DONE, failure=Failure(planted, "m")), seconds=1.0)
        observer.record_outcome(RunOutcome(Next.RETRY, failure=Failure(planted, "m")), seconds=1.0)
        observer.after_token_refresh(planted)

    # When the metrics are exposed
    exposition = generate_latest(REGISTRY).decode()

    # Then none of the planted words appears, and the values fell back to the fixed vocabulary
    for planted in PLANTED:
        assert planted.lower() not in exposition.lower()
    assert observer.provider == "other"
    assert 'mailpipe_phase_duration_seconds_count{phase="other",provider="other"}' in exposition
    assert 'mailpipe_emails_quarantined_total{reason="parse_error"}' in exposition
    assert 'mailpipe_retries_total{error_class="unknown"}' in exposition
    assert 'mailpipe_oauth2_token_refreshes_total{outcome="failed",provider="other"}' in exposition


# -- the observer --------------------------------------------------------------------------


def test_a_failure_is_counted_under_the_phase_it_happened_in_not_the_cleanup_after_it():
    # Given a sync whose fetch phase raises, followed (as in the core) by a timed disconnect
    observer = MetricsObserver(provider="gmx")
    timer = PhaseTimer(observer)
    before = sample("mailpipe_errors_total", error_class="timeout", phase="fetch", provider="gmx")
    retries = sample("mailpipe_retries_total", error_class="timeout")
    with pytest.raises(TimeoutError):
        try:
            with timer.phase("connect"):
                pass
            with timer.phase("fetch"):
                raise TimeoutError
        finally:
            with timer.phase("disconnect"):
                pass

    # When the runner's outcome is a retry of that timeout
    observer.record_outcome(RunOutcome(Next.RETRY, failure=Failure("timeout", "m")), seconds=2.0)

    # Then the error counts under fetch, and the retry under its class
    assert observer.failed_phase == "fetch"
    errors = sample("mailpipe_errors_total", error_class="timeout", phase="fetch", provider="gmx")
    assert errors == before + 1
    assert sample("mailpipe_retries_total", error_class="timeout") == retries + 1


def test_an_exception_already_being_handled_is_not_taken_for_a_failed_phase():
    # Given an observer made while the caller handles an unrelated exception
    try:
        raise ValueError("not ours")
    except ValueError:
        observer = MetricsObserver(provider="gmx")
        # When a phase ends normally inside that handler
        PhaseTimer(observer).add("connect", 0.01)
    # Then no phase counts as failed
    assert observer.failed_phase is None


@pytest.mark.parametrize(
    ("outcome", "counted"),
    [
        (RunOutcome(Next.DONE, result=SyncResult()), "success"),
        (RunOutcome(Next.DONE, failure=Failure("invalid_credentials", "m")), "failed"),
        (RunOutcome(Next.DONE), "skipped"),
        (RunOutcome(Next.BUSY), None),
        (RunOutcome(Next.RETRY, failure=Failure("timeout", "m")), None),
    ],
)
def test_each_run_outcome_counts_once_under_its_status(outcome, counted):
    # Given the counts of finished icloud runs
    statuses = ("success", "failed", "skipped")
    before = {
        s: sample("mailpipe_account_runs_total", provider="icloud", outcome=s) for s in statuses
    }
    durations = {
        s: sample("mailpipe_account_run_duration_seconds_count", provider="icloud", outcome=s)
        for s in statuses
    }

    # When the actor records what run_account returned
    MetricsObserver(provider="icloud").record_outcome(outcome, seconds=3.0)

    # Then only a final run counts, under its status, with its duration
    for status in statuses:
        expected = 1 if status == counted else 0
        runs = sample("mailpipe_account_runs_total", provider="icloud", outcome=status)
        timed = sample(
            "mailpipe_account_run_duration_seconds_count", provider="icloud", outcome=status
        )
        assert (runs - before[status], timed - durations[status]) == (expected, expected)


def test_batches_add_to_the_throughput_counters():
    # Given the counters for yahoo
    fetched = sample("mailpipe_emails_fetched_total", provider="yahoo")
    size = sample("mailpipe_fetched_bytes_total", provider="yahoo")
    saved = sample("mailpipe_emails_saved_total")
    quarantined = sample("mailpipe_emails_quarantined_total", reason="not_a_message")

    # When one batch is committed
    MetricsObserver(provider="yahoo").after_batch(
        fetched=5, fetched_bytes=5000, saved=4, duplicates=1, quarantined={"not_a_message": 1}
    )

    # Then each counter moved by the batch's numbers
    assert sample("mailpipe_emails_fetched_total", provider="yahoo") == fetched + 5
    assert sample("mailpipe_fetched_bytes_total", provider="yahoo") == size + 5000
    assert sample("mailpipe_emails_saved_total") == saved + 4
    assert sample("mailpipe_emails_quarantined_total", reason="not_a_message") == quarantined + 1


@pytest.mark.parametrize(("fetched", "counted"), [(3, True), (0, False)])
def test_mail_phase_seconds_count_only_runs_that_fetched_mail(fetched, counted):
    # Given the seconds the per-mail targets read, for yahoo
    phases = ("fetch", "parse", "save")
    before = {
        p: sample("mailpipe_mail_phase_seconds_total", phase=p, provider="yahoo") for p in phases
    }
    observer = MetricsObserver(provider="yahoo")

    # When a run spends time in its phases and succeeds, with mail or with none (a no-change
    # poll, whose EXAMINE is timed as fetch)
    for phase, seconds in (("connect", 1.0), ("fetch", 2.0), ("fetch", 0.5), ("parse", 0.25)):
        observer.after_phase(phase, seconds)
    observer.after_phase("save", 0.125)
    result = SyncResult(folders=[FolderResult(folder="INBOX", fetched=fetched)])
    observer.record_outcome(RunOutcome(Next.DONE, result=result), seconds=4.0)

    # Then fetch, parse and save seconds are counted only for the run that fetched mail
    moved = {
        p: sample("mailpipe_mail_phase_seconds_total", phase=p, provider="yahoo") - before[p]
        for p in phases
    }
    assert moved == (
        {"fetch": 2.5, "parse": 0.25, "save": 0.125} if counted else dict.fromkeys(phases, 0.0)
    )


def test_flag_updates_and_vanished_mail_count_by_provider():
    # Given the state-sync counters for gmx
    flags = sample("mailpipe_flag_updates_total", provider="gmx")
    vanished = sample("mailpipe_vanished_total", provider="gmx")

    # When a folder's flag changes and vanished mail are committed
    MetricsObserver(provider="gmx").after_state_sync(flags_changed=6, vanished=4)

    # Then each counter moved by those numbers, under the provider only
    assert sample("mailpipe_flag_updates_total", provider="gmx") == flags + 6
    assert sample("mailpipe_vanished_total", provider="gmx") == vanished + 4


def test_a_watcher_counts_connections_reconnects_push_runs_and_latency_without_names():
    # Given the push metrics for gmx
    held = sample("mailpipe_idle_connections", provider="gmx")
    runs = sample("mailpipe_push_runs_total", provider="gmx")
    resets = sample("mailpipe_idle_reconnects_total", error_class="connection_reset")
    oddities = sample("mailpipe_idle_reconnects_total", error_class="unknown")
    latencies = sample("mailpipe_push_latency_seconds_count", provider="gmx")
    watch = WatchMetrics()
    # When two connections open and one closes, two reconnects (one of a class no metric knows)
    watch.idle_connected(provider="gmx")
    watch.idle_connected(provider="gmx")
    watch.idle_closed(provider="gmx")
    watch.reconnect(error_class="connection_reset")
    watch.reconnect(error_class="planted-account")
    watch.push_runs(provider="gmx", count=3)
    # And a push run stores mail 0.4 s after its watcher saw it come
    MetricsObserver(provider="gmx").after_push(seconds=0.4)
    # Then each moved by that, and the unknown class counts as unknown, not by its name
    assert sample("mailpipe_idle_connections", provider="gmx") == held + 1
    assert sample("mailpipe_idle_reconnects_total", error_class="connection_reset") == resets + 1
    assert sample("mailpipe_idle_reconnects_total", error_class="unknown") == oddities + 1
    assert sample("mailpipe_push_runs_total", provider="gmx") == runs + 3
    assert sample("mailpipe_push_latency_seconds_count", provider="gmx") == latencies + 1
    assert "planted-account" not in generate_latest(REGISTRY).decode()


@pytest.fixture
def sessions(tmp_path: Path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'metrics.db'}")
    db.migrate(engine)
    yield db.session_factory(engine)
    engine.dispose()


def test_a_finalised_job_counts_with_its_type_and_age(sessions):
    # Given a scheduled job enqueued 42 s ago that just failed
    with sessions.begin() as session:
        user, _key = create_user(session, "planted-user", "pw", iterations=FAST_KDF)
        job = jobs.create_job(
            session, user_id=user.id, account_ids=[], type=JobType.SCHEDULED, options={}
        )
        job.created_at = models.utcnow() - timedelta(seconds=42)
        job.finished_at = models.utcnow()
        job_id, user_id = job.id, user.id
    labels = {"type": "scheduled", "status": "failed"}
    before = sample("mailpipe_jobs_total", **labels)
    under_30 = sample("mailpipe_job_duration_seconds_bucket", le="30.0", **labels)
    under_60 = sample("mailpipe_job_duration_seconds_bucket", le="60.0", **labels)

    # When the process that finalised it records it
    record_finished_job(
        sessions, FinishedJob(job_id=job_id, user_id=user_id, status="failed", grant_id=None)
    )

    # Then it counts once, with a duration above 30 s and at most 60 s
    assert sample("mailpipe_jobs_total", **labels) == before + 1
    assert sample("mailpipe_job_duration_seconds_bucket", le="30.0", **labels) == under_30
    assert sample("mailpipe_job_duration_seconds_bucket", le="60.0", **labels) == under_60 + 1


# -- the multiprocess directory ------------------------------------------------------------


def test_prepare_wipes_metric_files_and_points_dramatiq_at_the_same_directory(tmp_path):
    # Given a directory with files of an earlier run, and another file
    (tmp_path / "counter_123.db").write_bytes(b"x")
    (tmp_path / "histogram_124.db").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("keep")
    environ = {multiprocess.DIRECTORY_ENV: str(tmp_path)}

    # When the worker command prepares it
    prepared = multiprocess.prepare(environ)

    # Then only prometheus_client's files are gone and Dramatiq writes to the same place
    assert prepared == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert environ[multiprocess.DRAMATIQ_ENV] == str(tmp_path)


def test_prepare_refuses_two_different_directories(tmp_path):
    environ = {
        multiprocess.DIRECTORY_ENV: str(tmp_path / "a"),
        multiprocess.DRAMATIQ_ENV: str(tmp_path / "b"),
    }
    with pytest.raises(MailpipeError, match="same directory"):
        multiprocess.prepare(environ)


def test_prepare_without_a_directory_changes_nothing():
    environ: dict[str, str] = {}
    assert multiprocess.prepare(environ) is None
    assert environ == {}


def test_dramatiq_metrics_refuse_a_directory_the_exporter_does_not_read(monkeypatch, tmp_path):
    # Given PROMETHEUS_MULTIPROC_DIR set to somewhere Dramatiq's middleware does not write
    monkeypatch.setenv(multiprocess.DIRECTORY_ENV, str(tmp_path))
    middleware = DramatiqMetrics()
    # When the dramatiq CLI boots the worker process, then the middleware refuses to start
    with pytest.raises(ValueError, match="dramatiq_prom_db"):
        middleware.after_process_boot(StubBroker(middleware=[]))
    assert not middleware.booted


@pytest.mark.parametrize("boot", [False, True], ids=["never booted", "no directory"])
def test_dramatiq_metrics_stay_dormant_without_boot_or_directory(monkeypatch, boot):
    # Given a broker with the middleware, never booted by the CLI or booted without a directory
    monkeypatch.delenv(multiprocess.DIRECTORY_ENV, raising=False)
    broker = StubBroker(middleware=[DramatiqMetrics()])
    if boot:
        broker.emit_after("process_boot")
    done = []

    @dramatiq.actor(broker=broker, queue_name="metrics-test")
    def work() -> None:
        done.append(True)

    # When a worker processes a message
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        work.send()
        broker.join("metrics-test", fail_fast=True)
        worker.join()
    finally:
        worker.stop()

    # Then the message ran, and the middleware neither failed nor switched the process over
    assert done == [True]
    assert multiprocess.DIRECTORY_ENV not in os.environ


# -- collectors ----------------------------------------------------------------------------


@pytest.fixture
def namespace():
    name = new_namespace()
    yield name
    delete_namespace(name)


def test_queue_depth_reads_the_redis_brokers_ready_delayed_and_dead_messages(namespace):
    # Given a real Redis broker with 2 ready, 1 delayed and 1 dead-lettered fetch message
    broker = RedisBroker(url=REDIS_URL, namespace=namespace, middleware=[])

    @dramatiq.actor(broker=broker, queue_name="fetch")
    def fetch_account(job_id: str, account_id: int) -> None: ...

    for account in (1, 2, 3):
        broker.enqueue(fetch_account.message("job", account))
    broker.enqueue(fetch_account.message("job", 4), delay=600_000)
    consumer = broker.consume("fetch", prefetch=1, timeout=1000)
    consumer.nack(next(consumer))
    consumer.close()

    # When the collector reads the namespace
    collector = QueueCollector(REDIS_URL, namespace=namespace, queues=["fetch", "schedule"])
    samples = collected(collector)

    # Then each state has its count, and an empty queue shows zeros rather than nothing
    def depth(queue: str, state: str) -> float:
        key = ("mailpipe_queue_messages", (("queue", queue), ("state", state)))
        return samples[key]

    assert (depth("fetch", "ready"), depth("fetch", "delayed"), depth("fetch", "dead")) == (2, 1, 1)
    assert depth("schedule", "ready") == 0
    assert samples[("mailpipe_exporter_source_up", (("source", "redis"),))] == 1


def test_an_unreachable_redis_shows_as_a_down_source():
    collector = QueueCollector("redis://127.0.0.1:1/0", namespace="x", queues=["fetch"])
    assert collected(collector) == {("mailpipe_exporter_source_up", (("source", "redis"),)): 0}


def test_account_gauges_count_enabled_accounts_and_the_stalest_due_one(sessions):
    # Given two users; only the first holds a background grant
    public = grants.public_key_bytes(X25519PrivateKey.generate())
    settings = ImapSettings(host="imap.gmx.net", port=993, username="u", password="p")
    now = models.utcnow()
    with sessions.begin() as session:
        synced, key = create_user(session, "planted-user", "pw", iterations=FAST_KDF)
        locked, other_key = create_user(session, "locked-user", "pw", iterations=FAST_KDF)
        grants.grant_background(
            session, user_id=synced.id, key=key, public_key=public, ttl_seconds=3600
        )
        fresh = add_account(session, synced, key, settings)
        stale = add_account(session, synced, key, settings)
        broken = add_account(session, synced, key, settings)
        disabled = add_account(session, synced, key, settings)
        never = add_account(session, locked, other_key, settings)
        values = {
            fresh.id: {"last_success_at": now - timedelta(seconds=60)},
            stale.id: {
                "last_success_at": now - timedelta(seconds=1200),
                "health_status": Health.DEGRADED,
                "circuit_state": CircuitState.HALF_OPEN,
            },
            broken.id: {
                "last_success_at": now - timedelta(days=3),
                "health_status": Health.BROKEN,
                "circuit_state": CircuitState.OPEN,
            },
            disabled.id: {"enabled": False, "last_success_at": now - timedelta(days=9)},
            never.id: {"created_at": now - timedelta(days=30)},  # LOCKED: not late
        }
        for account_id, row in values.items():
            session.execute(
                update(models.MailAccount).where(models.MailAccount.id == account_id).values(**row)
            )

    # When the collector reads the database
    samples = collected(AccountCollector(sessions.kw["bind"]))

    # Then disabled accounts are left out, and staleness covers only accounts due for sync
    def gauge(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert gauge("mailpipe_accounts", health="healthy") == 2
    assert gauge("mailpipe_accounts", health="degraded") == 1
    assert gauge("mailpipe_accounts", health="broken") == 1
    assert gauge("mailpipe_circuits", state="closed") == 2
    assert gauge("mailpipe_circuits", state="half_open") == 1
    assert gauge("mailpipe_circuits", state="open") == 1
    assert 1200 <= gauge("mailpipe_last_success_age_seconds") < 1260
    assert gauge("mailpipe_exporter_source_up", source="database") == 1


def test_a_database_without_the_schema_shows_as_a_down_source(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    samples = collected(AccountCollector(engine))
    assert samples == {("mailpipe_exporter_source_up", (("source", "database"),)): 0}


def test_the_exporter_watches_every_queue_the_actors_declare():
    import actors  # noqa: F401  (declares the actors on the broker)
    import broker_config

    declared = {q_name(queue) for queue in broker_config.broker.get_declared_queues()}
    assert set(exporter.QUEUES) == declared


def test_the_exporter_writes_no_metric_files_of_its_own(tmp_path):
    # Given an empty multiprocess directory and an exporter reading it
    env = {
        **os.environ,
        multiprocess.DIRECTORY_ENV: str(tmp_path),
        multiprocess.DRAMATIQ_ENV: str(tmp_path),
        "MAILPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite'}",
    }
    code = (
        "from metrics import exporter; from mailpipe.settings import Settings; "
        "exporter.build_registry(Settings.from_env()).collect()"
    )
    # When it builds its registry and collects once
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)
    # Then the directory still holds no file of prometheus_client's
    assert list(tmp_path.glob(multiprocess.FILE_PATTERN)) == []


def test_the_exporter_says_in_one_line_that_it_needs_the_directory():
    env = {k: v for k, v in os.environ.items() if k != multiprocess.DIRECTORY_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "metrics.exporter", "--port", "0", "--host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "metrics.exporter: set PROMETHEUS_MULTIPROC_DIR to the workers' metrics directory "
        "(an existing one)"
    ]
