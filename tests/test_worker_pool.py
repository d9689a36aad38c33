"""A worker process keeps its PostgreSQL connections: busy threads open no new backends."""

from __future__ import annotations

import threading
from dataclasses import replace

from sqlalchemy import text

import broker_config
from worker import runtime

THREADS = 8  # `mailpipe worker`'s default
ROUNDS = 3


def test_worker_threads_reuse_their_postgresql_connections(pg_url: str) -> None:
    """Given a worker runtime on PostgreSQL, when 8 threads each hold a connection at the same
    moment, give them back, and do that again three times (busy, then waiting on IMAP), then no
    more backends served them than there are threads: no connection was closed on its return
    and opened again as a new backend at the next busy moment."""
    runtime.configure(replace(broker_config.SETTINGS, database_url=pg_url))
    sessions = runtime.sessions()
    backends: set[int] = set()
    together = threading.Barrier(THREADS)

    def work() -> None:
        for _ in range(ROUNDS):
            with sessions() as session:
                backends.add(session.scalar(text("SELECT pg_backend_pid()")))
                together.wait()  # every thread holds its connection now
            together.wait()  # every connection is back in the pool

    try:
        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 1 <= len(backends) <= THREADS
    finally:
        engine = sessions.kw["bind"]
        engine.dispose()
        runtime.configure(broker_config.SETTINGS)
