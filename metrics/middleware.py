"""Dramatiq's own Prometheus middleware, served by our exporter instead of its own HTTP fork.

Stock `dramatiq.middleware.prometheus.Prometheus` starts an exposition server on port 9191 in a
fork, and its metrics exist only after the dramatiq CLI's `process_boot`. This subclass writes the
same metrics into the shared multiprocess directory, where `metrics.exporter` serves them beside
mailpipe's own, and creates each actor's counters at zero when the worker starts, so a dashboard
shows 0 dead letters, errors and retries instead of "No data" until the first one. It stays dormant in processes the CLI never booted (embedded workers, tests) and
where `PROMETHEUS_MULTIPROC_DIR` is unset: the stock middleware would then write to a directory
under /tmp that nobody serves or empties. This module must not import prometheus_client.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import dramatiq
from dramatiq.middleware import prometheus

from .multiprocess import DIRECTORY_ENV, DRAMATIQ_ENV


class DramatiqMetrics(prometheus.Prometheus):
    """Dramatiq's message counters and durations, without a second /metrics server."""

    def __init__(self) -> None:
        super().__init__()
        self.booted = False

    @property
    def forks(self) -> list[Callable[[], int]]:
        return []

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        shared = os.environ.get(DIRECTORY_ENV)
        if not shared:
            return
        if Path(shared).resolve() != Path(prometheus.DB_PATH).resolve():
            raise ValueError(
                f"{DRAMATIQ_ENV} ({prometheus.DB_PATH}) must be {DIRECTORY_ENV} ({shared}) before "
                "Python starts (`mailpipe worker` sees to it), or Dramatiq's metrics land where "
                "the exporter never looks"
            )
        super().after_process_boot(broker)
        self.booted = True

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Create every actor's counters at zero (the dramatiq CLI imports the actors only after
        `process_boot`, so they are known here, not there)."""
        if not self.booted:
            return
        counters = (
            self.total_messages,
            self.total_errored_messages,
            self.total_retried_messages,
            self.total_rejected_messages,
        )
        for actor in broker.actors.values():
            for counter in counters:
                counter.labels(actor.queue_name, actor.actor_name)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.booted:
            super().after_worker_shutdown(broker, worker)

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        if self.booted:
            super().after_nack(broker, message)

    def after_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None
    ) -> None:
        if self.booted:
            super().after_enqueue(broker, message, delay)

    def before_delay_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        if self.booted:
            super().before_delay_message(broker, message)

    def before_process_message(
        self, broker: dramatiq.Broker, message: dramatiq.MessageProxy
    ) -> None:
        if self.booted:
            super().before_process_message(broker, message)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: object = None,
        exception: BaseException | None = None,
    ) -> None:
        if self.booted:
            super().after_process_message(broker, message, result=result, exception=exception)

    after_skip_message = after_process_message
