"""The worker inside another process: `mailpipe fetch --wait`, `mailpipe web` and the demo run
their own jobs this way on the embedded (stub) broker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dramatiq
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import grants
from mailpipe.settings import Settings

from . import runtime

# A few accounts at once beside the process's own work; the embedded database is SQLite, which
# takes one writer at a time, so more threads would mostly wait.
EMBEDDED_WORKER_THREADS = 4


@contextlib.contextmanager
def embedded_worker(
    settings: Settings, *, sessions: sessionmaker[Session], broker: dramatiq.Broker
) -> Iterator[dramatiq.Worker]:
    """Run this process's jobs while the block runs: make the worker key if it is missing, hand
    the runtime the settings, database and key, and run a worker on `broker` until the end."""
    grants.ensure_worker_key(settings.worker_key_path, configured=settings.worker_public_key)
    import actors  # noqa: F401  (declares the actors on Dramatiq's global broker)

    if broker is not dramatiq.get_broker():
        raise RuntimeError("the embedded worker needs the actors' broker: get it from use_broker")
    runtime.configure(
        settings,
        sessions=sessions,
        private_key=grants.load_private_key(settings.worker_key_path),
    )
    worker = dramatiq.Worker(broker, worker_threads=EMBEDDED_WORKER_THREADS)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
