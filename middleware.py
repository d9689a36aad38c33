"""Mailpipe's own Dramatiq middleware; it is handed what it needs and imports no actor."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.errors import BrokerConnectionError
from dramatiq.middleware import Retries, SkipMessage
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import health
from mailpipe.policies import CircuitPolicy
from mailpipe.retry import RetryPolicy
from mailpipe.runner import skip_run
from mailpipe.vocabulary import ErrorClass, Gate

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
    itself does with acks, each time from the message's options as they were. Its retry count
    and backoff are the retry policy's.
    """

    def __init__(self, *, policy: RetryPolicy) -> None:
        super().__init__(
            max_retries=policy.max_retries,
            min_backoff=policy.min_backoff_ms,
            max_backoff=policy.max_backoff_ms,
        )
        self.policy = policy

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
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
    """Called by an actor that opted in: what this attempt did, for after_process_message."""
    _attempt.value = {"attempted": attempted, "error_class": error_class}


class AccountHealth(dramatiq.Middleware):
    """After each fetch attempt, move the account between HEALTHY, DEGRADED and BROKEN.

    Before a fetch, skip it while the account's circuit is open (recorded as skipped, which
    ends the run, so the job still finalises); after the cool-down one probe goes through.
    Actors opt in with `account_health=True`: their messages carry (job_id, account_id) and they
    tell each attempt's outcome with `report_attempt`. `on_skipped(sessions, account_id)` is
    called for each run the open circuit skipped (the metrics count it).
    """

    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        retry_policy: RetryPolicy,
        circuit: CircuitPolicy,
        on_skipped: Callable[[sessionmaker[Session], int], None],
    ) -> None:
        self.sessions = sessions
        self.retry_policy = retry_policy
        self.circuit = circuit
        self.on_skipped = on_skipped

    @property
    def actor_options(self) -> set[str]:
        return {"account_health"}

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if not _opted_in(broker, message):
            return
        _attempt.value = None
        job_id, account_id = message.args
        sessions = self.sessions()
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
            self.on_skipped(sessions, account_id)
            raise SkipMessage("circuit open")

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if not _opted_in(broker, message):
            return
        attempt = getattr(_attempt, "value", None)
        _attempt.value = None
        if exception is not None:
            error_class = getattr(exception, "error_class", ErrorClass.UNKNOWN)
        elif attempt is not None and attempt["attempted"]:
            error_class = attempt["error_class"]
        else:
            return  # waited, redelivered or locked: nothing was tried, health stays
        _job_id, account_id = message.args
        with self.sessions().begin() as session:
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


def _opted_in(broker: dramatiq.Broker, message: MessageProxy) -> bool:
    return bool(broker.get_actor(message.actor_name).options.get("account_health"))
