"""The Dramatiq broker, built from the settings, with its middleware in one fixed order.

Actors are declared on Dramatiq's global broker when their modules are imported, and some
middleware adds actor options that Dramatiq checks then: set the broker before importing
`actors` (`use_broker` does; `broker_config` does in worker processes).

Middleware order, outermost first:
  0. DramatiqMetrics       Dramatiq's own Prometheus metrics, into the multiprocess directory
  1. AgeLimit              drop messages older than their max_age (none by default)
  2. TimeLimit             interrupt a message that runs past its time limit
  3. ShutdownNotifications let a running message notice a worker shutdown
  4. Callbacks             on_success / on_failure actors
  5. Pipelines             pipe results into the next message
  6. DurableRetries        transient failures come back with 1 s, 2 s, 4 s backoff plus jitter
                           (Dramatiq's Retries, whose retry survives a Redis outage)
  7. CurrentMessage        actors read their own retry count
  8. PeriodiqMiddleware    periodic actors (the scheduler) and their skip of stale ticks
  9. AccountHealth         after each attempt, move the account between HEALTHY, DEGRADED and
                           BROKEN (the run itself passes the circuit gate and notes a success
                           on a healthy account, in its first and last transactions)
"""

from __future__ import annotations

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)
from periodiq import PeriodiqMiddleware

from mailpipe.settings import Settings
from metrics.middleware import DramatiqMetrics
from middleware import AccountHealth, DurableRetries

from . import runtime

DELAY_QUEUE_SUFFIX = ".DQ"


class MailpipeRedisBroker(RedisBroker):
    """RedisBroker that takes back the delayed messages a worker dropped on a connection error.

    On a Redis connection error Dramatiq's consumer thread discards the delayed messages it holds
    in memory (retries waiting out their backoff, fetches of busy accounts sent again later), yet
    they stay in its worker's acks set; the worker lives on and keeps its heartbeat, so Redis
    maintenance never requeues them and their runs never end (Bogdanp/dramatiq#527, 2.2.1). A new
    consumer of a delay queue requeues what its worker still holds there: no one else holds it.
    """

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000):
        if queue_name.endswith(DELAY_QUEUE_SUFFIX):
            try:
                held = self.client.smembers(
                    f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
                )
                if held:
                    self.do_requeue(queue_name, *held)
            except redis.ConnectionError as error:
                raise ConnectionClosed(error) from None
        return super().consume(queue_name, prefetch, timeout)


def middleware_stack(settings: Settings) -> list[dramatiq.Middleware]:
    """The middleware, in the documented order; retries and health share one retry policy."""
    return [
        DramatiqMetrics(),
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        DurableRetries(policy=settings.retry),
        CurrentMessage(),
        PeriodiqMiddleware(),
        AccountHealth(
            sessions=runtime.sessions,
            retry_policy=settings.retry,
            circuit=settings.circuit,
        ),
    ]


def build_broker(settings: Settings) -> dramatiq.Broker:
    """A Redis broker for production, or the in-process stub for the embedded default."""
    if settings.embedded:
        built: dramatiq.Broker = StubBroker(middleware=[])
    else:
        built = MailpipeRedisBroker(
            url=settings.broker_url,
            namespace=settings.redis_namespace,
            middleware=[],
            heartbeat_timeout=settings.redis_heartbeat_ms,
            maintenance_chance=settings.redis_maintenance_chance,
        )
    for middleware in middleware_stack(settings):
        built.add_middleware(middleware)
    return built


def use_broker(settings: Settings) -> dramatiq.Broker:
    """The broker actors are declared on: Dramatiq's global one when this process set it
    already, else one built from `settings` and made global."""
    if dramatiq.broker.global_broker is None:
        dramatiq.set_broker(build_broker(settings))
    return dramatiq.get_broker()
