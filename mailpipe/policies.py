"""The circuit breaker's and the watchers' policies as plain values: Settings carries them to
the parts that act on them, and loads without the database or IMAP."""

from __future__ import annotations

from dataclasses import dataclass

RENEW_SECONDS = 600.0  # IDLE is ended and started again this often: a liveness check, < 29 min


@dataclass(frozen=True, kw_only=True)
class CircuitPolicy:
    """When an account's circuit opens (failures within a window) and how long it stays open."""

    failures: int = 5
    window_seconds: int = 3600
    cooldown_seconds: int = 600

    def __post_init__(self) -> None:
        for variable, value in (
            ("MAILPIPE_CIRCUIT_FAILURES", self.failures),
            ("MAILPIPE_CIRCUIT_WINDOW_SECONDS", self.window_seconds),
            ("MAILPIPE_CIRCUIT_COOLDOWN_SECONDS", self.cooldown_seconds),
        ):
            if value < 1:
                raise ValueError(f"{variable} must be at least 1, not {value}")


@dataclass(frozen=True, kw_only=True)
class WatchPolicy:
    """How a watcher holds its accounts; `Settings.watch` carries the configured one."""

    lease_seconds: float = 45.0  # a dead watcher's accounts are taken over after this
    capacity: int = 5_000  # accounts one watcher process holds at most
    renew_seconds: float = RENEW_SECONDS  # IDLE renewed (and the server checked) this often
    connect_threads: int = 8  # logins and EXAMINEs at once
    # after a failure that is not transient (a refused login), the account is tried again this
    # much later, with its settings as stored then: its owner may have set a new password
    retry_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not self.lease_seconds > 0:
            raise ValueError("MAILPIPE_WATCH_LEASE_SECONDS must be above 0")
        if self.capacity < 1:
            raise ValueError("MAILPIPE_WATCH_CAPACITY must be at least 1")
        if not 0 < self.renew_seconds < 29 * 60:
            raise ValueError("MAILPIPE_IDLE_RENEW_SECONDS must be above 0 and below 1740")
        if self.connect_threads < 1:
            raise ValueError("MAILPIPE_WATCH_CONNECT_THREADS must be at least 1")
        if not self.retry_seconds > 0:
            raise ValueError("MAILPIPE_WATCH_RETRY_SECONDS must be above 0")
