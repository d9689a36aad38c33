"""Mailpipe's own Dramatiq middleware; broker_config installs it (it must not import actors)."""

from __future__ import annotations

import logging
import threading
import time

import dramatiq
import redis
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Retries, SkipMessage

from mailpipe import health
from mailpipe.retry import RetryPolicy
from mailpipe.vocabulary import ErrorClass, Gate

FETCH_ACTOR = "fetch_account"
CIRCUIT_OPEN_MESSAGE = "skipped: fetching this account kept failing, so it is paused for a while"

REENQUEUE_DELAY_SECONDS = 1.0
REENQUEUE_PATIENCE_SECONDS = 600.0

logger = logging.getLogger(__name__)
_attempt = threading.local()


class DurableRetries(Retries):
    """Retries whose re-enqueue waits out a broker outage instead of dropping the retry.

    Stock Retries sends the retry from after_process_message; when Redis is down at that moment
    the error is only logged, the message is acked once Redis is back, and the retry is gone, so
    its run stays "retrying" and its job never ends. Here the send is tried again, as Dramatiq
    itself does with acks, each time from the message's options as they were.
    """

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        options = dict(message.options)
        deadline = time.monotonic() + REENQUEUE_PATIENCE_SECONDS
        while True:
            try:
                super().after_process_message(broker, message, result=result, exception=exception)
                return
            except (BrokerConnectionError, redis.ConnectionError) as error:
                if time.monotonic() > deadline:
                    raise
                logger.warning("retry of %s not sent yet (%s); trying again", message, error)
                message.options.clear()
                message.options.update(options)
                time.sleep(REENQUEUE_DELAY_SECONDS)


def report_attempt(*, attempted: bool, error_class: str | None) -> None:
    """Called by the fetch actor: what this attempt did, for after_process_message to read."""
    _attempt.value = {"attempted": attempted, "error_class": error_class}


class AccountHealth(dramatiq.Middleware):
    """After each fetch attempt, move the account between HEALTHY, DEGRADED and BROKEN.

    Before a fetch, skip it while the account's circuit is open (recorded as skipped, which
    ends the run, so the job still finalises); after the cool-down one probe goes through.
    """

    def __init__(self, *, retry_policy: RetryPolicy, circuit: health.CircuitPolicy) -> None:
        self.retry_policy = retry_policy
        self.circuit = circuit

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        if message.actor_name != FETCH_ACTOR:
            return
        _attempt.value = None
        from actors import runtime
        from mailpipe.runner import skip_run

        job_id, account_id = message.args
        sessions = runtime.sessions()
        with sessions.begin() as session:
            gate = health.circuit_gate(session, account_id, circuit=self.circuit)
        if gate == Gate.SKIP:
            skip_run(
                sessions,
                job_id=job_id,
                account_id=account_id,
                reason=ErrorClass.CIRCUIT_OPEN,
                message=CIRCUIT_OPEN_MESSAGE,
            )
            from metrics.observer import MetricsObserver, record_account_run

            provider = MetricsObserver.for_account(sessions, account_id).provider
            record_account_run(provider, "skipped", 0.0)
            raise SkipMessage("circuit open")

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if message.actor_name != FETCH_ACTOR:
            return
        attempt = getattr(_attempt, "value", None)
        _attempt.value = None
        if exception is not None:
            error_class = getattr(exception, "error_class", ErrorClass.UNKNOWN)
        elif attempt is not None and attempt["attempted"]:
            error_class = attempt["error_class"]
        else:
            return  # waited, redelivered or locked: nothing was tried, health stays
        from actors import runtime

        _job_id, account_id = message.args
        with runtime.sessions().begin() as session:
            change = health.record_outcome(
                session,
                account_id,
                error_class=error_class,
                retry_policy=self.retry_policy,
                circuit=self.circuit,
            )
        if (
            change.health_before != change.health_after
            or change.circuit_before != change.circuit_after
        ):
            logger.info(
                "account %s: health %s -> %s, circuit %s -> %s",
                account_id,
                change.health_before,
                change.health_after,
                change.circuit_before,
                change.circuit_after,
            )
