"""Login throttling: too many failed logins for a user name, or from a client address, within a
window are answered 429 before any key derivation, in every web process alike.

Each failure is one entry with its time; an attempt is refused while its user name has
`PER_NAME` failures within the last `WINDOW_SECONDS` (or its address `PER_ADDRESS`), until the
oldest of them leaves the window (the Retry-After). The entries live in Redis when the broker is
Redis and in the database otherwise, so all web processes see them; they are keyed by an HMAC
under the server secret (`mailpipe.digests`), never by the user name or address itself, so a
reader of Redis or the database cannot confirm a guessed name either.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import redis
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from mailpipe.digests import keyed_digest
from mailpipe.models import LoginFailure
from mailpipe.settings import Settings

logger = logging.getLogger(__name__)
PER_NAME = 10
PER_ADDRESS = 50
WINDOW_SECONDS = 15 * 60


class FailureStore(Protocol):
    """Failed logins by subject digest, shared by all web processes."""

    def recent(self, subject: str, *, since: float) -> tuple[int, float | None]:
        """How many failures since `since` (epoch seconds), and when the oldest of them was."""
        ...

    def add(self, subject: str, *, at: float, since: float) -> None:
        """Record a failure at `at`; entries before `since` may be dropped."""
        ...

    def clear(self, subject: str) -> None:
        """Forget a subject's failures (after a successful login)."""
        ...


@dataclass(frozen=True)
class RedisFailures:
    """A sorted set per subject, scored by the failure's time, expiring with the window."""

    client: redis.Redis
    namespace: str
    window_seconds: float = WINDOW_SECONDS

    def _key(self, subject: str) -> str:
        return f"{self.namespace}:login-failures:{subject}"

    def recent(self, subject: str, *, since: float) -> tuple[int, float | None]:
        key = self._key(subject)
        pipe = self.client.pipeline()
        pipe.zremrangebyscore(key, "-inf", since)
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        try:
            _, count, oldest = pipe.execute()
        except redis.RedisError as error:  # logins go on while Redis is away; it is logged
            logger.error("login throttle unavailable (%s): not throttling", error)
            return 0, None
        return int(count), (float(oldest[0][1]) if oldest else None)

    def add(self, subject: str, *, at: float, since: float) -> None:
        key = self._key(subject)
        pipe = self.client.pipeline()
        pipe.zadd(key, {secrets.token_hex(8): at})
        pipe.zremrangebyscore(key, "-inf", since)
        pipe.expire(key, math.ceil(self.window_seconds))
        try:
            pipe.execute()
        except redis.RedisError as error:
            logger.error("login failure not recorded (%s)", error)

    def clear(self, subject: str) -> None:
        try:
            self.client.delete(self._key(subject))
        except redis.RedisError as error:
            logger.error("login failures not cleared (%s)", error)


@dataclass(frozen=True)
class DatabaseFailures:
    """Rows of `login_failures`, for web processes without Redis."""

    sessions: sessionmaker[Session]

    def recent(self, subject: str, *, since: float) -> tuple[int, float | None]:
        with self.sessions() as session:
            count, oldest = session.execute(
                select(func.count(), func.min(LoginFailure.failed_at)).where(
                    LoginFailure.subject == subject, LoginFailure.failed_at > _instant(since)
                )
            ).one()
        return int(count), (oldest.timestamp() if oldest is not None else None)

    def add(self, subject: str, *, at: float, since: float) -> None:
        with self.sessions.begin() as session:
            session.execute(
                delete(LoginFailure).where(
                    LoginFailure.subject == subject, LoginFailure.failed_at <= _instant(since)
                )
            )
            session.add(LoginFailure(subject=subject, failed_at=_instant(at)))

    def clear(self, subject: str) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.subject == subject))


@dataclass(frozen=True)
class LoginThrottle:
    """Whether a login may go ahead, and the record of those that failed."""

    store: FailureStore
    secret: bytes = field(repr=False)  # the server secret the subjects' digests are keyed with
    per_name: int = PER_NAME
    per_address: int = PER_ADDRESS
    window_seconds: float = WINDOW_SECONDS
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def retry_after(self, *, name: str, address: str) -> int | None:
        """Seconds until this name and address may try again, or None when they may now."""
        now = self.clock()
        since = now - self.window_seconds
        waits = []
        for subject, limit in self._subjects(name, address):
            count, oldest = self.store.recent(subject, since=since)
            if count >= limit:
                first = oldest if oldest is not None else now
                waits.append(max(1, math.ceil(first + self.window_seconds - now)))
        return max(waits) if waits else None

    def failed(self, *, name: str, address: str) -> None:
        now = self.clock()
        for subject, _limit in self._subjects(name, address):
            self.store.add(subject, at=now, since=now - self.window_seconds)

    def succeeded(self, *, name: str) -> None:
        """A right password ends the name's count (not the address's: one's own account must
        not reset what guesses at others' cost)."""
        self.store.clear(self.name_digest(name))

    def name_digest(self, name: str) -> str:
        """A user name's digest (as typed, case and outer spaces aside): what logs and keys show."""
        return self._digest("name", name.strip().casefold())

    def _digest(self, kind: str, value: str) -> str:
        return keyed_digest(self.secret, f"login|{kind}", value, length=32)

    def _subjects(self, name: str, address: str) -> list[tuple[str, int]]:
        return [
            (self.name_digest(name), self.per_name),
            (self._digest("address", address), self.per_address),
        ]


def login_throttle(settings: Settings, sessions: sessionmaker[Session]) -> LoginThrottle:
    """Redis when the broker is Redis (every web process shares it), else the database."""
    secret = settings.server_secret()
    if settings.embedded:
        return LoginThrottle(DatabaseFailures(sessions), secret)
    client = redis.Redis.from_url(settings.broker_url)
    return LoginThrottle(RedisFailures(client, settings.redis_namespace), secret)


def _instant(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
