"""The Dramatiq broker, built from MAILPIPE_BROKER_URL, with its middleware in one fixed order.

Import this module before any actor is declared (`dramatiq broker_config actors` does): some
middleware adds actor options, and Dramatiq only knows those options once it is installed.

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
  9. AccountHealth         skip fetches of accounts whose circuit is open; after each attempt,
                           move the account between HEALTHY, DEGRADED and BROKEN
"""

from __future__ import annotations

import os

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
from dramatiq.rate_limits.backends import RedisBackend, StubBackend
from periodiq import PeriodiqMiddleware

from mailpipe import config
from mailpipe.health import CircuitPolicy
from mailpipe.retry import RetryPolicy
from metrics.middleware import DramatiqMetrics
from middleware import AccountHealth, DurableRetries

BROKER_URL = os.environ.get("MAILPIPE_BROKER_URL", "stub")
NAMESPACE = os.environ.get("MAILPIPE_REDIS_NAMESPACE", "mailpipe")
RETRY_POLICY = RetryPolicy(
    max_retries=config.int_setting("MAILPIPE_MAX_RETRIES", 3),
    min_backoff_ms=config.int_setting("MAILPIPE_MIN_BACKOFF_MS", 1000),
    max_backoff_ms=config.int_setting("MAILPIPE_MAX_BACKOFF_MS", 30000),
)
CIRCUIT = CircuitPolicy(
    failures=config.int_setting("MAILPIPE_CIRCUIT_FAILURES", 5),
    window_seconds=config.int_setting("MAILPIPE_CIRCUIT_WINDOW_SECONDS", 3600),
    cooldown_seconds=config.int_setting("MAILPIPE_CIRCUIT_COOLDOWN_SECONDS", 600),
)
HEARTBEAT_TIMEOUT_MS = int(os.environ.get("MAILPIPE_REDIS_HEARTBEAT_MS", "60000"))
MAINTENANCE_CHANCE = int(os.environ.get("MAILPIPE_REDIS_MAINTENANCE_CHANCE", "1000"))
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
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


def middleware_stack() -> list[dramatiq.Middleware]:
    """The middleware, in the documented order."""
    return [
        DramatiqMetrics(),
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        DurableRetries(
            max_retries=RETRY_POLICY.max_retries,
            min_backoff=RETRY_POLICY.min_backoff_ms,
            max_backoff=RETRY_POLICY.max_backoff_ms,
        ),
        CurrentMessage(),
        PeriodiqMiddleware(),
        AccountHealth(retry_policy=RETRY_POLICY, circuit=CIRCUIT),
    ]


def build_broker(url: str = BROKER_URL, *, namespace: str = NAMESPACE) -> dramatiq.Broker:
    """A Redis broker for production, or the in-process stub for the embedded default."""
    if url == "stub":
        built: dramatiq.Broker = StubBroker(middleware=[])
    elif url.startswith(REDIS_SCHEMES):
        built = MailpipeRedisBroker(
            url=url,
            namespace=namespace,
            middleware=[],
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=MAINTENANCE_CHANCE,
        )
    else:
        raise ValueError("MAILPIPE_BROKER_URL must be 'stub' or a redis:// URL")
    for middleware in middleware_stack():
        built.add_middleware(middleware)
    return built


def rate_limiter_backend(url: str = BROKER_URL):
    """Where connection caps are counted: Redis in production, in-process for the stub."""
    if url == "stub":
        return StubBackend()
    return RedisBackend(url=url)


broker = build_broker()
dramatiq.set_broker(broker)
