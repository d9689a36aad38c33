"""The retry policy: which error classes come back, how often, after what backoff, and which
ones break the account. The actor, the Retries middleware, the runner and account health all
read this one object."""

from __future__ import annotations

from dataclasses import dataclass

from .vocabulary import ErrorClass, Health

TRANSIENT = frozenset(
    {
        ErrorClass.TIMEOUT,
        ErrorClass.CONNECTION_RESET,
        ErrorClass.TEMPORARILY_UNAVAILABLE,
        ErrorClass.UNKNOWN,
    }
)
RETRIED_ONCE = frozenset({ErrorClass.UNKNOWN})  # an unknown error may be a bug: one more try
BREAKING = frozenset(
    {
        ErrorClass.AUTH_FAILED,
        ErrorClass.INVALID_CREDENTIALS,
        ErrorClass.ACCOUNT_DISABLED,
        ErrorClass.TLS_ERROR,
        ErrorClass.ADDRESS_NOT_ALLOWED,
    }
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Transient classes are retried up to `max_retries` times (an unknown error once), with
    backoff min_backoff_ms * 2^n * U(1, 2) capped at max_backoff_ms; breaking classes are never
    retried and make the account BROKEN; skips are neither failures nor retried."""

    max_retries: int = 3
    min_backoff_ms: int = 1_000
    max_backoff_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("MAILPIPE_MAX_RETRIES must be 0 or more")
        if not 0 < self.min_backoff_ms <= self.max_backoff_ms:
            raise ValueError(
                "MAILPIPE_MIN_BACKOFF_MS must be above 0 and at most MAILPIPE_MAX_BACKOFF_MS"
            )

    def retries(self, error_class: ErrorClass) -> int:
        """How many times a failure of this class is tried again."""
        if error_class in RETRIED_ONCE:
            return min(1, self.max_retries)
        if error_class in TRANSIENT:
            return self.max_retries
        return 0

    def should_retry(self, error_class: ErrorClass, *, attempt: int) -> bool:
        """Whether attempt number `attempt` (1 for the first) that failed so is tried again."""
        return attempt <= self.retries(error_class)

    def retry_crash(self, retries: int) -> bool:
        """Whether a message that crashed outside the sync (after `retries` retries) comes back."""
        return retries < self.max_retries

    def health_after(self, error_class: ErrorClass | None) -> Health:
        """The account's health after an attempt that failed with this class (None: success)."""
        if error_class is None:
            return Health.HEALTHY
        return Health.BROKEN if error_class in BREAKING else Health.DEGRADED


def transient(error_class: ErrorClass) -> bool:
    """Whether a failure of this class may go away by itself."""
    return error_class in TRANSIENT
