"""What every actor in a worker process shares: the database, the worker key, the processors."""

from __future__ import annotations

import functools
import hashlib
import threading
from contextlib import AbstractContextManager

from dramatiq.rate_limits import ConcurrentRateLimiter
from sqlalchemy.orm import Session, sessionmaker

import broker_config
from mailpipe import config, db, grants
from mailpipe.processors import Processor, load_processors

MAX_CONNECTIONS_PER_HOST = config.int_setting("MAILPIPE_MAX_CONNECTIONS_PER_HOST", 10)
HOST_SLOT_TTL_MS = config.int_setting("MAILPIPE_HOST_SLOT_TTL_MS", 15 * 60 * 1000)


_SETUP = threading.Lock()
_embedded: dict = {}


def embed(*, sessions: sessionmaker[Session], private_key) -> None:
    """Run actors in this process on given sessions and worker key (the demo, unit tests)."""
    _embedded.update(sessions=sessions, private_key=private_key)


@functools.cache
def _sessions() -> sessionmaker[Session]:
    engine = db.make_engine()
    db.migrate(engine)
    return db.session_factory(engine)


def sessions() -> sessionmaker[Session]:
    """One engine per worker process, made (and the schema migrated) by the first thread only."""
    if "sessions" in _embedded:
        return _embedded["sessions"]
    with _SETUP:
        return _sessions()


def private_key():
    """The workers' X25519 key: only workers hold it, and it unseals users' key grants."""
    if "private_key" in _embedded:
        return _embedded["private_key"]
    return _worker_private_key()


@functools.cache
def _worker_private_key():
    return grants.worker_private_key()


@functools.cache
def processors() -> dict[str, Processor]:
    return load_processors()


@functools.cache
def _limiter_backend():
    return broker_config.rate_limiter_backend()


def host_slot(host: str) -> AbstractContextManager[bool]:
    """One of the per-host connection slots shared by all workers; yields False when none is free.

    The key holds a digest of the host name, never the name, and carries the broker namespace.
    """
    digest = hashlib.sha256(host.lower().encode()).hexdigest()[:16]
    limiter = ConcurrentRateLimiter(
        _limiter_backend(),
        f"{broker_config.NAMESPACE}:host-connections:{digest}",
        limit=MAX_CONNECTIONS_PER_HOST,
        ttl=HOST_SLOT_TTL_MS,
    )
    return limiter.acquire(raise_on_failure=False)
