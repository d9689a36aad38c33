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
from dramatiq.middleware import Retries
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import health
from mailpipe.policies import CircuitPolicy
from mailpipe.retry import RetryPolicy
from mailpipe.vocabulary import ErrorClass

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


def report_attempt(
    *, attempted: bool, error_class: str | None, health_recorded: bool = False
) -> None:
    """Called by an actor that opted in: what this attempt did, for after_process_message
    (`health_recorded`: a success the run itself recorded on the account's health, nothing left
    to do)."""
    _attempt.value = {
        "attempted": attempted,
        "error_class": error_class,
        "health_recorded": health_recorded,
    }


class AccountHealth(dramatiq.Middleware):
    """After each fetch attempt, move the account between HEALTHY, DEGRADED and BROKEN.

    The circuit gate before a fetch (an open circuit skips it) is the run's own: it passes it
    in its first transaction (`run_account(circuit=...)`), as it records a success on the
    account's health in its last (a job seen final then shows its accounts' health). Actors opt in with `account_health=True`: their messages carry
    (job_id, account_id) and they tell each attempt's outcome with `report_attempt`.
    """

    def __init__(
        self,
        *,
        sessions: Callable[[], sessionmaker[Session]],
        retry_policy: RetryPolicy,
        circuit: CircuitPolicy,
    ) -> None:
        self.sessions = sessions
        self.retry_policy = retry_policy
        self.circuit = circuit

    @property
    def actor_options(self) -> set[str]:
        return {"account_health"}

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if _opted_in(broker, message):
            _attempt.value = None

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
        if isinstance(exception, DBAPIError) and exception.connection_invalidated:
            return  # our database connection had dropped: the account was not tried, it retries
        if exception is not None:
            error_class = getattr(exception, "error_class", ErrorClass.UNKNOWN)
        elif attempt is not None and attempt["attempted"]:
            if attempt["health_recorded"]:
                return  # the run's last transaction recorded it
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
        change.log(account_id)


def _opted_in(broker: dramatiq.Broker, message: MessageProxy) -> bool:
    return bool(broker.get_actor(message.actor_name).options.get("account_health"))
