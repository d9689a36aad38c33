"""Gauges read at scrape time: queue depth from Redis, account health from the database.

Each collector reads its source once per scrape and reports `mailpipe_exporter_source_up`, so a
source that cannot be read shows as down instead of as missing series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from mailpipe import grants, models
from mailpipe.vocabulary import CircuitState, Health

logger = logging.getLogger(__name__)

QUEUE_STATES = ("ready", "delayed", "dead")
HEALTH_STATES = (Health.HEALTHY, Health.DEGRADED, Health.BROKEN)
CIRCUIT_STATES = (CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN)
REDIS_TIMEOUT_SECONDS = 2.0


def source_up(source: str, up: bool) -> GaugeMetricFamily:
    """1 when the source answered this scrape, 0 when it did not."""
    family = GaugeMetricFamily(
        "mailpipe_exporter_source_up",
        "Whether the exporter could read this source at the last scrape.",
        labels=["source"],
    )
    family.add_metric([source], 1.0 if up else 0.0)
    return family


class QueueCollector(Collector):
    """Messages per Dramatiq queue and state, from the Redis broker's own keys.

    The Redis broker keeps ready message ids in the list `<ns>:<queue>`, delayed ones in the list
    `<ns>:<queue>.DQ` and dead-lettered ones in the sorted set `<ns>:<queue>.XQ`
    (dramatiq/brokers/redis/dispatch.lua).
    """

    def __init__(self, url: str, *, namespace: str, queues: Iterable[str]) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
        )
        self.namespace = namespace
        self.queues = sorted(set(queues))

    def depths(self) -> dict[tuple[str, str], int]:
        """(queue, state) -> number of messages, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            key = f"{self.namespace}:{queue}"
            pipe.llen(key)
            pipe.llen(f"{key}.DQ")
            pipe.zcard(f"{key}.XQ")
        counts = iter(pipe.execute())
        return {(q, state): int(next(counts)) for q in self.queues for state in QUEUE_STATES}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depths = self.depths()
        except redis.RedisError as error:
            logger.warning("queue depth: Redis could not be read: %s", error)
            yield source_up("redis", False)
            return
        family = GaugeMetricFamily(
            "mailpipe_queue_messages",
            "Messages in each broker queue: ready to run, delayed (retries, waits), dead-lettered.",
            labels=["queue", "state"],
        )
        for (queue, state), count in depths.items():
            family.add_metric([queue, state], count)
        yield family
        yield source_up("redis", True)


class AccountCollector(Collector):
    """Enabled accounts by health and by circuit state, and how stale the stalest one is."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            health, circuits, oldest = self.read()
        except Exception as error:  # any database error: report the source down, keep scraping
            logger.warning("account health: the database could not be read: %s", error)
            yield source_up("database", False)
            return
        accounts = GaugeMetricFamily(
            "mailpipe_accounts", "Enabled mail accounts by health.", labels=["health"]
        )
        for state in HEALTH_STATES:
            accounts.add_metric([state.lower()], health.get(state, 0))
        yield accounts
        circuit = GaugeMetricFamily(
            "mailpipe_circuits", "Enabled mail accounts by circuit-breaker state.", labels=["state"]
        )
        for circuit_state in CIRCUIT_STATES:
            circuit.add_metric([circuit_state], circuits.get(circuit_state, 0))
        yield circuit
        age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
        yield GaugeMetricFamily(
            "mailpipe_last_success_age_seconds",
            "Seconds since the last successful fetch of the stalest account background sync "
            "should keep current (since creation when it never succeeded); 0 when there is none.",
            value=max(age, 0.0),
        )
        yield source_up("database", True)

    def read(self) -> tuple[dict[str, int], dict[str, int], datetime | None]:
        """Counts by health and circuit, and the stalest last success, in one transaction.

        Staleness covers the accounts the scheduler keeps syncing: enabled, not BROKEN, circuit
        not open, owner holding a live background grant (LOCKED accounts are not late).
        """
        account = models.MailAccount
        background = select(models.KeyGrant.user_id).where(
            models.KeyGrant.purpose == grants.PURPOSE_BACKGROUND,
            models.KeyGrant.expires_at > models.utcnow(),
        )
        with self.engine.connect() as connection:
            health = connection.execute(
                select(account.health_status, func.count())
                .where(account.enabled.is_(True))
                .group_by(account.health_status)
            ).all()
            circuits = connection.execute(
                select(account.circuit_state, func.count())
                .where(account.enabled.is_(True))
                .group_by(account.circuit_state)
            ).all()
            oldest = connection.scalar(
                select(func.min(func.coalesce(account.last_success_at, account.created_at))).where(
                    account.enabled.is_(True),
                    account.health_status != Health.BROKEN,
                    account.circuit_state != CircuitState.OPEN,
                    account.user_id.in_(background),
                )
            )
        return dict(health), dict(circuits), oldest
