"""What every actor in a worker process shares: the settings, the database, the worker key, the
processors and the per-host connection slots.

A process configures it once before its worker starts: `broker_config` from the environment in
`dramatiq`/`periodiq` processes, `worker.embedded` with the database and key of the process it
runs in. What it makes from the settings (the engine, the key) is made once, on first use.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Iterator

import redis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend, StubBackend
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import db, grants
from mailpipe.accounts import guess_provider
from mailpipe.digests import keyed_digest
from mailpipe.processors import Processor, load_processors
from mailpipe.settings import Settings

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

# A watcher renews the claims of its IDLE connections: each member gets a new lapse time.
RENEW_SLOTS = """
local now = redis.call('time')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('zadd', key, 'XX', now_ms + ttl, ARGV[i + 1])
  if redis.call('pttl', key) < ttl then
    redis.call('pexpire', key, ttl)
  end
end
return 1
"""

# Connections a worker process keeps: one per thread that ever used one at the same time (the
# pool opens no more than that). SQLAlchemy's 5 made 8 threads close and reopen PostgreSQL
# connections all the time: a new backend for about one run in six (bench.scale).
POOL_SIZE = 32
# No `SELECT 1` before each checkout (half of a poll's PostgreSQL transactions, bench.scale): a
# connection the server dropped fails the attempt's first statement, the pool replaces it and
# its elders, and the message comes back as any crash outside the sync does (one retry). Kept
# connections are replaced after half an hour, before idle-timeouts of proxies in between.
POOL_RECYCLE_SECONDS = 1800
logger = logging.getLogger(__name__)
_SETUP = threading.RLock()  # what is made on first use may need another such thing
_state: dict = {}


def configure(
    settings: Settings,
    *,
    sessions: sessionmaker[Session] | None = None,
    private_key: X25519PrivateKey | None = None,
) -> None:
    """Run this process's actors on `settings`; an embedded worker also hands over the database
    and worker key it shares with its process (else they are made from the settings)."""
    with _SETUP:
        _state.clear()
        _state.update(settings=settings, sessions=sessions, private_key=private_key)


def settings() -> Settings:
    """The settings the actors run on (the retry policy, caps, time limits among them)."""
    try:
        return _state["settings"]
    except KeyError:
        raise RuntimeError(
            "the worker runtime is not configured: import broker_config (a worker process) "
            "or start an embedded worker first"
        ) from None


def sessions() -> sessionmaker[Session]:
    """One engine per worker process, made (and the schema migrated) by the first thread only."""
    return _made("sessions", lambda: _open(settings().database_url))


def private_key() -> X25519PrivateKey:
    """The workers' X25519 key: only workers hold it, and it unseals users' key grants."""
    return _made("private_key", lambda: grants.load_private_key(settings().worker_key_path))


def processors() -> dict[str, Processor]:
    """The registered processors (entry points), loaded once per process."""
    return _made("processors", load_processors)


def connection_cap(host: str) -> int:
    """Simultaneous connections allowed to one host: its provider's cap, else the default."""
    current = settings()
    return current.max_connections_by_provider.get(
        guess_provider(host), current.max_connections_per_host
    )


@contextlib.contextmanager
def host_slot(host: str, *, ttl_ms: int | None = None) -> Iterator[bool]:
    """One of the per-host connection slots shared by all workers; yields False when none is free.

    The claim lapses after `ttl_ms` (the fetch passes its time limit plus a margin; by default
    MAILPIPE_HOST_SLOT_TTL_MS), so a worker killed while holding a slot gives it back then. The
    key holds a digest of the host name, never the name, and carries the broker namespace.
    """
    current = settings()
    ttl_ms = ttl_ms or current.host_slot_ttl_ms
    backend = _limiter_backend()
    if not isinstance(backend, RedisBackend):  # the in-process stub: no other process to outlive
        limiter = ConcurrentRateLimiter(
            backend,
            f"{current.redis_namespace}:host-connections:{_host_digest(host)}",
            limit=connection_cap(host),
            ttl=ttl_ms,
        )
        with limiter.acquire(raise_on_failure=False) as acquired:
            yield acquired
        return
    key = _slot_key(host)
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


class IdleSlots:
    """The slots a watcher's IDLE connections hold, in the same sorted sets as the fetches'
    (Redis only): an IDLE connection counts against its host's cap like any other; each claim
    lapses after `ttl_ms` unless renewed, so a killed watcher's slots come back by themselves."""

    def __init__(self, *, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms

    def claim(self, host: str, holder: str) -> bool:
        acquire = _acquire_slot()
        return bool(
            acquire(keys=[_slot_key(host)], args=[connection_cap(host), self.ttl_ms, holder])
        )

    def renew(self, claims: list[tuple[str, str]]) -> None:
        script = _made("renew_slots", lambda: _redis_backend().client.register_script(RENEW_SLOTS))
        for start in range(0, len(claims), 500):  # a few hundred keys per script call
            chunk = claims[start : start + 500]
            script(
                keys=[_slot_key(host) for host, _holder in chunk],
                args=[self.ttl_ms, *(holder for _host, holder in chunk)],
            )

    def release(self, host: str, holder: str) -> None:
        _redis_backend().client.zrem(_slot_key(host), holder)


def _slot_key(host: str) -> str:
    """The sorted set of one host's slots: a digest of its name, never the name, namespaced."""
    return f"{settings().redis_namespace}:host-slots:{_host_digest(host)}"


def _host_digest(host: str) -> str:
    """HMAC of the host name under the server secret: a Redis reader cannot confirm a guessed
    host, and every process sharing the secret names one host's slots alike."""
    return keyed_digest(_slot_secret(), "host-slots", host.lower(), length=16)


def _slot_secret() -> bytes:
    """The server secret on Redis; the in-process stub shares its slots with no other process,
    so a key of its own serves there (and the demo writes no file for it)."""
    current = settings()
    if current.embedded:
        return _made("slot_secret", lambda: secrets.token_bytes(32))
    return _made("slot_secret", current.server_secret)


def _limiter_backend() -> RedisBackend | StubBackend:
    """Where connection caps are counted: Redis in production, in-process for the stub."""
    current = settings()
    return _made(
        "limiter",
        lambda: StubBackend() if current.embedded else RedisBackend(url=current.broker_url),
    )


def _acquire_slot():
    return _made("acquire_slot", lambda: _redis_backend().client.register_script(ACQUIRE_SLOT))


def _redis_backend() -> RedisBackend:
    backend = _limiter_backend()
    if not isinstance(backend, RedisBackend):
        raise TypeError("connection slots in Redis need the Redis broker")
    return backend


def _open(url: str) -> sessionmaker[Session]:
    engine = db.make_engine(
        url, pool_size=POOL_SIZE, pre_ping=False, recycle_seconds=POOL_RECYCLE_SECONDS
    )
    db.migrate(engine)
    return db.session_factory(engine)


def _made(name: str, make):
    """What the settings give, made once per configuration by the first thread that asks."""
    found = _state.get(name)
    if found is not None:
        return found
    with _SETUP:
        if _state.get(name) is None:
            _state[name] = make()
        return _state[name]
