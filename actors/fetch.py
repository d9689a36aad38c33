"""fetch_account: one message per account of a job, so accounts run in parallel."""

from __future__ import annotations

import functools
import random
import time

import dramatiq
from dramatiq.middleware import CurrentMessage, TimeLimitExceeded

from mailpipe.runner import Next, record_crash, run_account
from mailpipe.vocabulary import ErrorClass
from metrics.observer import (
    MetricsObserver,
    record_account_run,
    record_error,
    record_finished_job,
)
from middleware import report_attempt
from worker import runtime

QUEUE = "fetch"
BUSY_DELAY_MS = (1_000, 3_000)
DEFAULT_TIME_LIMIT_MS = 180_000
SLOT_MARGIN_MS = 60_000  # a blocking IMAP read may outlast the time limit by its own timeout


class TransientFailure(dramatiq.Retry):
    """Asks Dramatiq's Retries middleware for a retry with backoff (logged as a retry, not an
    error); carries only the error class."""

    def __init__(self, error_class: ErrorClass) -> None:
        super().__init__(error_class)
        self.error_class = error_class


def retry_when(retries: int, error: BaseException) -> bool:
    """Transient failures (and crashes outside the sync) come back as the retry policy says.

    Permanent failures never reach here: the core records them and the message ends normally.
    """
    return isinstance(error, Exception) and runtime.settings().retry.retry_crash(retries)


# max_retries is the Retries middleware's, built from the same retry policy (worker/broker.py).
@dramatiq.actor(
    queue_name=QUEUE,
    retry_when=retry_when,
    time_limit=DEFAULT_TIME_LIMIT_MS,
    on_retry_exhausted="fetch_exhausted",
    account_health=True,
)
def fetch_account(job_id: str, account_id: int) -> None:
    """Sync one account for one job; the core records the outcome and finalises the job."""
    message = CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message else 0
    time_limit = (message.options.get("time_limit") if message else None) or DEFAULT_TIME_LIMIT_MS
    settings = runtime.settings()
    slot_ttl = min(settings.host_slot_ttl_ms, time_limit + SLOT_MARGIN_MS)
    observer = MetricsObserver()  # the core tells it the account's provider as the run starts
    started = time.perf_counter()
    outcome = run_account(
        runtime.sessions(),
        job_id=job_id,
        account_id=account_id,
        attempt=retries + 1,
        retry_policy=settings.retry,
        address_policy=settings.address_policy,
        private_key=runtime.private_key(),
        processors=runtime.processors(),
        connection_slot=functools.partial(runtime.host_slot, ttl_ms=slot_ttl),
        timeouts=(TimeLimitExceeded,),
        observer=observer,
        oauth2_providers=settings.oauth2_providers,
        circuit=settings.circuit,
    )
    observer.record_outcome(outcome, seconds=time.perf_counter() - started)
    if outcome.finished is not None:
        record_finished_job(runtime.sessions(), outcome.finished)
    report_attempt(
        attempted=outcome.attempted,
        error_class=outcome.failure.error_class if outcome.failure else None,
        health_recorded=outcome.health_recorded,
    )
    if outcome.action == Next.RETRY and outcome.failure is not None:
        raise TransientFailure(outcome.failure.error_class) from None
    if outcome.action == Next.BUSY:
        # Another sync of this account (or the host's connection cap) is in the way: wait.
        limit = message.options.get("time_limit") if message else None
        fetch_account.send_with_options(
            args=(job_id, account_id),
            delay=random.randint(*BUSY_DELAY_MS),
            **({"time_limit": limit} if limit else {}),
        )


@dramatiq.actor(queue_name=QUEUE)
def fetch_exhausted(message: dict, retry_info: dict) -> None:
    """A fetch that kept crashing outside the sync still ends its run, so the job finalises."""
    job_id, account_id = message["args"]
    sessions = runtime.sessions()
    finished = record_crash(sessions, job_id=job_id, account_id=account_id)
    provider = MetricsObserver.for_account(sessions, account_id).provider
    record_error(ErrorClass.UNKNOWN, "other", provider)
    record_account_run(provider, "failed", 0.0)
    if finished is not None:
        record_finished_job(sessions, finished)
