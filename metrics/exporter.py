"""`python -m metrics.exporter --port N`: one /metrics for all worker processes of a host.

It merges the files every worker process writes into `PROMETHEUS_MULTIPROC_DIR` (mailpipe's
metrics and Dramatiq's own, see metrics/middleware.py), and adds gauges read at scrape time:
queue depth from Redis, accounts by health and circuit, and the stalest account's last success.
Run one exporter per worker host, next to the worker processes whose directory it reads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from mailpipe import db, logs
from mailpipe.errors import MailpipeError
from mailpipe.settings import Settings

from . import multiprocess
from .collectors import AccountCollector, QueueCollector

DEFAULT_PORT = 9191
DEFAULT_HOST = "0.0.0.0"
# The actors' queues. Importing `actors` to ask the broker would load the metric catalogue and
# make this process write metric files of its own; tests/test_metrics.py checks the two agree.
QUEUES = ("fetch", "schedule")

logger = logging.getLogger(__name__)


def build_registry(settings: Settings) -> CollectorRegistry:
    """Worker metrics from the shared directory plus the scrape-time collectors."""
    path = multiprocess.directory()
    if path is None or not path.is_dir():
        raise MailpipeError(
            f"set {multiprocess.DIRECTORY_ENV} to the workers' metrics directory (an existing one)"
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(AccountCollector(db.make_engine(settings.database_url)))
    if not settings.embedded:
        registry.register(
            QueueCollector(settings.broker_url, namespace=settings.redis_namespace, queues=QUEUES)
        )
    return registry


def serve(settings: Settings, port: int, *, host: str = DEFAULT_HOST) -> None:
    """Serve /metrics until the process is stopped."""
    server, thread = start_http_server(port, addr=host, registry=build_registry(settings))
    logger.info("serving /metrics on %s:%d", host, server.server_port)
    thread.join()


def build_parser() -> argparse.ArgumentParser:
    """The command line, apart from `main` so docker-compose.yml's command can be checked."""
    parser = argparse.ArgumentParser(
        prog="python -m metrics.exporter", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--host", default=DEFAULT_HOST)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format, stream=sys.stderr)
        serve(settings, args.port, host=args.host)
    except MailpipeError as error:
        print(f"metrics.exporter: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
