"""The core's observer, backed by Prometheus metrics, and the outcome records the actors make."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import models
from mailpipe.jobs import FinishedJob
from mailpipe.observer import Observer, WatchObserver
from mailpipe.runner import Next, RunOutcome
from mailpipe.vocabulary import ErrorClass, RefreshOutcome, RunStatus

from . import catalogue as c


class MetricsObserver(Observer):
    """Feeds one account run's phase timings and batch counts into the catalogue.

    It also notes the first phase that ended with an exception in flight (the core times phases
    in `finally` blocks), so a failure can be counted under the phase it happened in.
    """

    def __init__(self, *, provider: str = c.OTHER) -> None:
        self.failed_phase: str | None = None
        self.mail_phases = dict.fromkeys(c.MAIL_PHASES, 0.0)  # this run's, counted if it had mail
        self._ambient = sys.exc_info()[1]  # an exception already being handled is not ours
        self._lock = threading.Lock()
        self.before_run(provider=provider)

    def before_run(self, *, provider: str) -> None:
        """Label what follows with the account's provider, which the core read as the run began."""
        self.provider = c.bounded(provider, c.PROVIDERS)
        self._fetched = c.EMAILS_FETCHED.labels(self.provider)
        self._bytes = c.FETCHED_BYTES.labels(self.provider)

    @classmethod
    def for_account(cls, sessions: sessionmaker[Session], account_id: int) -> MetricsObserver:
        """An observer labelled with the account's provider (one primary-key read)."""
        with sessions() as session:
            provider = session.scalar(
                select(models.MailAccount.provider).where(models.MailAccount.id == account_id)
            )
        return cls(provider=provider or c.OTHER)

    def after_phase(self, phase: str, seconds: float) -> None:
        phase = c.bounded(phase, c.PHASES)
        c.PHASE_DURATION.labels(phase, self.provider).observe(max(seconds, 0.0))
        in_flight = sys.exc_info()[1]
        with self._lock:
            if phase in self.mail_phases:
                self.mail_phases[phase] += max(seconds, 0.0)
            if in_flight is not None and in_flight is not self._ambient:
                self.failed_phase = self.failed_phase or phase

    def after_batch(
        self,
        *,
        fetched: int,
        fetched_bytes: int,
        saved: int,
        duplicates: int,
        quarantined: Mapping[str, int],
    ) -> None:
        self._fetched.inc(fetched)
        self._bytes.inc(fetched_bytes)
        c.EMAILS_SAVED.inc(saved)
        for reason, count in quarantined.items():
            c.EMAILS_QUARANTINED.labels(
                c.bounded(reason, c.QUARANTINE_REASONS, fallback=c.PARSE_ERROR)
            ).inc(count)

    def after_state_sync(self, *, flags_changed: int, vanished: int) -> None:
        c.FLAG_UPDATES.labels(self.provider).inc(flags_changed)
        c.VANISHED.labels(self.provider).inc(vanished)

    def after_push(self, *, seconds: float) -> None:
        c.PUSH_LATENCY.labels(self.provider).observe(seconds)

    def after_token_refresh(self, outcome: str) -> None:
        c.TOKEN_REFRESHES.labels(
            self.provider, c.bounded(outcome, c.REFRESH_OUTCOMES, fallback=RefreshOutcome.FAILED)
        ).inc()

    def record_outcome(self, outcome: RunOutcome, *, seconds: float) -> None:
        """Count what `run_account` returned: a final run, or a failed attempt sent to retry.

        Busy and duplicate deliveries are not runs and count nothing.
        """
        failure = outcome.failure
        if failure is not None:
            record_error(failure.error_class, self.failed_phase or c.OTHER, self.provider)
        if outcome.action == Next.RETRY and failure is not None:
            record_retry(failure.error_class)
        elif outcome.action == Next.DONE:
            if failure is not None:
                status = RunStatus.FAILED
            elif outcome.result is not None:
                status = RunStatus.SUCCESS
            else:
                status = RunStatus.SKIPPED
            record_account_run(self.provider, status, seconds)
        if outcome.result is not None and outcome.result.fetched > 0:
            for phase, spent in self.mail_phases.items():
                c.MAIL_PHASE_SECONDS.labels(phase, self.provider).inc(spent)


def record_account_run(provider: str, outcome: str, seconds: float) -> None:
    """An account run ended (success, failed or skipped) after `seconds`."""
    provider = c.bounded(provider, c.PROVIDERS)
    outcome = c.bounded(outcome, c.RUN_OUTCOMES)
    c.ACCOUNT_RUNS.labels(provider, outcome).inc()
    c.ACCOUNT_RUN_DURATION.labels(provider, outcome).observe(max(seconds, 0.0))


def record_job(type: str, status: str, seconds: float) -> None:
    """A fetch job reached its final status `seconds` after it was enqueued."""
    job_type = c.bounded(type, c.JOB_TYPES)
    status = c.bounded(status, c.JOB_STATUSES)
    c.JOBS.labels(job_type, status).inc()
    c.JOB_DURATION.labels(job_type, status).observe(max(seconds, 0.0))


def record_login(outcome: str) -> None:
    """A web login ended: success, failed or throttled."""
    c.LOGINS.labels(c.bounded(outcome, c.LOGIN_OUTCOMES, fallback="failed")).inc()


def record_error(error_class: str, phase: str, provider: str) -> None:
    """An account-run attempt failed with `error_class` during `phase`."""
    c.ERRORS.labels(
        c.bounded(error_class, c.ERROR_CLASSES, fallback=ErrorClass.UNKNOWN),
        c.bounded(phase, c.PHASES),
        c.bounded(provider, c.PROVIDERS),
    ).inc()


def record_retry(error_class: str) -> None:
    """A transient failure sent the message back to the queue for another attempt."""
    c.RETRIES.labels(c.bounded(error_class, c.ERROR_CLASSES, fallback=ErrorClass.UNKNOWN)).inc()


def record_finished_job(sessions: sessionmaker[Session], finished: FinishedJob) -> None:
    """Count a job that this process finalised, with its type and time since enqueue."""
    with sessions() as session:
        job = session.get(models.PipelineJob, finished.job_id)
        if job is None:
            return
        ended = job.finished_at or datetime.now(UTC)
        record_job(job.type, finished.status, (ended - job.created_at).total_seconds())


class WatchMetrics(WatchObserver):
    """A watcher's connections, reconnects and push runs as Prometheus metrics."""

    def idle_connected(self, *, provider: str) -> None:
        c.IDLE_CONNECTIONS.labels(c.bounded(provider, c.PROVIDERS)).inc()

    def idle_closed(self, *, provider: str) -> None:
        c.IDLE_CONNECTIONS.labels(c.bounded(provider, c.PROVIDERS)).dec()

    def reconnect(self, *, error_class: str) -> None:
        c.IDLE_RECONNECTS.labels(c.bounded(error_class, c.ERROR_CLASSES, fallback="unknown")).inc()

    def push_runs(self, *, provider: str, count: int) -> None:
        c.PUSH_RUNS.labels(c.bounded(provider, c.PROVIDERS)).inc(count)

    def token_refreshes(self, *, provider: str) -> Observer:
        return MetricsObserver(provider=provider)
