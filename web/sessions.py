"""Server-side sessions: the user's data key is never in a cookie, a disk or a database.

`SessionStore` keeps sessions in this process's memory (the cookie holds a random id): the key
is gone when the process ends. It serves one process (threads are fine), as on the embedded
broker. `SealedSessionStore` serves several web processes on the Redis broker: Redis keeps each
session with its data key sealed under a secret only the cookie carries. `session_store`
picks the one the settings call for.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailpipe.crypto import DataKey
from mailpipe.settings import Settings

DEFAULT_IDLE_SECONDS = 30 * 60
DEFAULT_MAX_SECONDS = 12 * 60 * 60
PURGE_SECONDS = 60  # an idle session's key leaves memory at most this long after it expired
TOKEN_BYTES = 32
SECRET_BYTES = 32  # the cookie's half of a shared session: it alone unseals the data key
NONCE_BYTES = 12
SEAL_INFO = b"mailpipe web session"


@dataclass
class ServerSession:
    """One login: who, their data key, the CSRF token of this session, and when it ends."""

    id: str
    user_id: int
    user_name: str
    key: DataKey = field(repr=False)
    csrf_token: str = field(repr=False)
    created: float
    last_seen: float


class SessionStore:
    """Sessions by random id, ended after idle time or a maximum age, whichever comes first."""

    def __init__(
        self,
        *,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()

    def create(self, *, user_id: int, user_name: str, key: DataKey) -> ServerSession:
        """A fresh id at every login, so an id planted before login is worth nothing after it."""
        now = self._clock()
        session = ServerSession(
            id=secrets.token_urlsafe(TOKEN_BYTES),
            user_id=user_id,
            user_name=user_name,
            key=key,
            csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
            created=now,
            last_seen=now,
        )
        with self._lock:
            self._purge(now)
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> ServerSession | None:
        """The live session for this id (its idle time starts again), or None."""
        if not session_id:
            return None
        now = self._clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[session_id]
                return None
            session.last_seen = now
            return session

    def end(self, session_id: str) -> ServerSession | None:
        """Forget the session and with it the data key; returns what was ended."""
        with self._lock:
            return self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def purge(self) -> int:
        """Forget every expired session (and its data key) now; returns how many."""
        with self._lock:
            before = len(self._sessions)
            self._purge(self._clock())
            return before - len(self._sessions)

    def purge_every(self, seconds: float = PURGE_SECONDS) -> threading.Thread:
        """Purge on a timer, so an idle session's key does not wait in memory for the next
        login; the thread ends with the store."""
        store = weakref.ref(self)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(seconds):
                alive = store()
                if alive is None:
                    return
                alive.purge()
                del alive

        thread = threading.Thread(target=loop, name="mailpipe-session-purge", daemon=True)
        thread.start()
        weakref.finalize(self, stop.set)
        return thread

    def _expired(self, session: ServerSession, now: float) -> bool:
        return (
            now - session.last_seen > self.idle_seconds or now - session.created > self.max_seconds
        )

    def _purge(self, now: float) -> None:
        for session_id in [s.id for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[session_id]


class SealedSessionStore:
    """Sessions every web process shares through Redis, with no usable key in Redis.

    At login a random secret is made that only the cookie carries (`<id>.<secret>`); Redis
    holds the session's record with the data key sealed (AES-256-GCM) under a key derived from
    that secret, bound to the id and the user. Any web process opens it with the cookie; Redis
    alone opens nothing, and a cookie whose record is gone opens nothing either. Redis expires
    a record after the idle time; the maximum age is checked on every read.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self._clock = clock

    def create(self, *, user_id: int, user_name: str, key: DataKey) -> ServerSession:
        """A fresh id and secret at every login; the cookie value is the session's `id`."""
        now = self._clock()
        record_id, secret = secrets.token_urlsafe(TOKEN_BYTES), secrets.token_bytes(SECRET_BYTES)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = _sealer(secret).encrypt(nonce, key.export(), _bound(record_id, user_id))
        record = {
            "user_id": user_id,
            "user_name": user_name,
            "csrf_token": secrets.token_urlsafe(TOKEN_BYTES),
            "created": now,
            "last_seen": now,
            "sealed": base64.b64encode(nonce + sealed).decode(),
        }
        self._write(record_id, record, now)
        return _session(f"{record_id}.{_encode(secret)}", record, key)

    def get(self, session_id: str | None) -> ServerSession | None:
        """The live session this cookie opens (its idle time starts again), or None."""
        record_id, secret = _parse(session_id)
        if record_id is None or secret is None:
            return None
        raw = self.client.get(self._key(record_id))
        if raw is None:
            return None
        record = json.loads(raw)
        now = self._clock()
        if now - record["created"] > self.max_seconds or now - record["last_seen"] > (
            self.idle_seconds
        ):
            self.client.delete(self._key(record_id))
            return None
        sealed = base64.b64decode(record["sealed"])
        try:
            plain = _sealer(secret).decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _bound(record_id, record["user_id"])
            )
        except InvalidTag:  # a forged or altered cookie, or a record moved to another id
            return None
        record["last_seen"] = now
        self._write(record_id, record, now)
        return _session(f"{record_id}.{_encode(secret)}", record, DataKey(plain))

    def end(self, session_id: str) -> None:
        """Forget the session: without its record the cookie's secret opens nothing."""
        record_id, _secret = _parse(session_id)
        if record_id is not None:
            self.client.delete(self._key(record_id))

    def _write(self, record_id: str, record: dict[str, Any], now: float) -> None:
        left = min(self.idle_seconds, record["created"] + self.max_seconds - now)
        self.client.set(self._key(record_id), json.dumps(record), px=max(1, int(left * 1000)))

    def _key(self, record_id: str) -> str:
        return f"{self.namespace}:web-session:{record_id}"


def _sealer(secret: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_INFO).derive(secret)
    return AESGCM(derived)


def _bound(record_id: str, user_id: int) -> bytes:
    return f"web-session|{record_id}|{user_id}".encode()


def _encode(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).decode().rstrip("=")


def _parse(session_id: str | None) -> tuple[str | None, bytes | None]:
    """(record id, secret) of a cookie value, or Nones for anything else."""
    record_id, _, encoded = (session_id or "").partition(".")
    try:
        secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (ValueError, binascii.Error):
        return None, None
    if not record_id or len(secret) != SECRET_BYTES:
        return None, None
    return record_id, secret


def _session(session_id: str, record: dict[str, Any], key: DataKey) -> ServerSession:
    return ServerSession(
        id=session_id,
        user_id=record["user_id"],
        user_name=record["user_name"],
        key=key,
        csrf_token=record["csrf_token"],
        created=record["created"],
        last_seen=record["last_seen"],
    )


def session_store(settings: Settings) -> SessionStore | SealedSessionStore:
    """In memory (purged on a timer) on the embedded broker, which serves one process; shared
    through Redis, sealed, when several web processes may serve one user."""
    if settings.embedded:
        store = SessionStore(
            idle_seconds=settings.session_idle_seconds, max_seconds=settings.session_max_seconds
        )
        store.purge_every()
        return store
    return SealedSessionStore(
        redis.Redis.from_url(settings.broker_url),
        settings.redis_namespace,
        idle_seconds=settings.session_idle_seconds,
        max_seconds=settings.session_max_seconds,
    )
