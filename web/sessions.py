"""Server-side sessions: the user's data key stays in this process; the cookie holds a random id.

The store lives in memory, so the key is gone when the process ends and never touches a disk,
a cookie or a database. It serves one process (threads are fine); a host app with several
processes keeps the key in its own server-side session and mounts only the blueprint.
"""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from mailpipe.crypto import DataKey

DEFAULT_IDLE_SECONDS = 30 * 60
DEFAULT_MAX_SECONDS = 12 * 60 * 60
PURGE_SECONDS = 60  # an idle session's key leaves memory at most this long after it expired
TOKEN_BYTES = 32


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
    notice: str | None = None


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
