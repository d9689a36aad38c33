"""What every actor in a worker process shares: the database, the worker key, the processors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator

import redis
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend
from sqlalchemy.orm import Session, sessionmaker

import broker_config
from mailpipe import config, db, grants
from mailpipe.accounts import PROVIDER_NAMES, guess_provider
from mailpipe.processors import Processor, load_processors

MAX_CONNECTIONS_PER_HOST = config.int_setting("MAILPIPE_MAX_CONNECTIONS_PER_HOST", 10)
HOST_SLOT_TTL_MS = config.int_setting("MAILPIPE_HOST_SLOT_TTL_MS", 15 * 60 * 1000)
# Each holder is a member of a sorted set scored by when its claim lapses, so the slot of a
# SIGKILLed worker frees itself when its own claim ends. (ConcurrentRateLimiter keeps one counter
# whose TTL every acquire and release renews: a crashed holder's count never expired while the
# host stayed busy, and ten crashes blocked the host for good.)
ACQUIRE_SLOT = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now_ms)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('zadd', KEYS[1], now_ms + ttl, ARGV[3])
if redis.call('pttl', KEYS[1]) < ttl then
  redis.call('pexpire', KEYS[1], ttl)
end
return 1
"""

logger = logging.getLogger(__name__)


def provider_caps(value: str) -> dict[str, int]:
    """Parse `gmail=40,outlook=20`: connection caps for the hosts of some providers."""
    caps = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        provider, _, number = item.partition("=")
        provider = provider.strip().lower()
        if provider not in PROVIDER_NAMES:
            raise ValueError(
                f"MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER: unknown provider {provider!r} "
                f"(known: {', '.join(sorted(PROVIDER_NAMES))})"
            )
        try:
            caps[provider] = int(number)
        except ValueError:
            raise ValueError(
                f"MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER: {item!r} needs a number, like gmail=40"
            ) from None
    return caps


MAX_CONNECTIONS_BY_PROVIDER = provider_caps(
    os.environ.get("MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER", "")
)


def connection_cap(host: str) -> int:
    """Simultaneous connections allowed to one host: its provider's cap, else the default."""
    return MAX_CONNECTIONS_BY_PROVIDER.get(guess_provider(host), MAX_CONNECTIONS_PER_HOST)


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


@contextlib.contextmanager
def host_slot(host: str, *, ttl_ms: int = HOST_SLOT_TTL_MS) -> Iterator[bool]:
    """One of the per-host connection slots shared by all workers; yields False when none is free.

    The claim lapses after `ttl_ms` (the fetch passes its time limit plus a margin), so a worker
    killed while holding a slot gives it back then. The key holds a digest of the host name,
    never the name, and carries the broker namespace.
    """
    digest = hashlib.sha256(host.lower().encode()).hexdigest()[:16]
    backend = _limiter_backend()
    if not isinstance(backend, RedisBackend):  # the in-process stub: no other process to outlive
        limiter = ConcurrentRateLimiter(
            backend,
            f"{broker_config.NAMESPACE}:host-connections:{digest}",
            limit=connection_cap(host),
            ttl=ttl_ms,
        )
        with limiter.acquire(raise_on_failure=False) as acquired:
            yield acquired
        return
    key = f"{broker_config.NAMESPACE}:host-slots:{digest}"
    holder = secrets.token_hex(8)
    acquired = bool(_acquire_slot()(keys=[key], args=[connection_cap(host), ttl_ms, holder]))
    try:
        yield acquired
    finally:
        if acquired:
            try:
                backend.client.zrem(key, holder)
            except redis.RedisError as error:  # the claim lapses by itself: keep the sync's result
                logger.warning(
                    "connection slot not released (%s); it lapses in %d ms", error, ttl_ms
                )


@functools.cache
def _acquire_slot():
    return _limiter_backend().client.register_script(ACQUIRE_SLOT)
