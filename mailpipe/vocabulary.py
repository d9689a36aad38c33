"""Every word mailpipe stores or shows for a state: one enum per vocabulary, nowhere else.

Each enum is a `StrEnum`: its members are the strings stored in the database, sent in JSON and
used as metric label values, so a member compares equal to its stored text.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a fetch job stands; the last three are final."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    PARTIAL_FAILURE = "partial_failure"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in JOB_FINAL


class RunStatus(StrEnum):
    """Where one account's part of a job stands; the last three are final."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def final(self) -> bool:
        return self in RUN_FINAL


JOB_FINAL = frozenset({JobStatus.SUCCESS, JobStatus.PARTIAL_FAILURE, JobStatus.FAILED})
RUN_FINAL = frozenset({RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.SKIPPED})
RUN_OPEN = frozenset(RunStatus) - RUN_FINAL


class JobType(StrEnum):
    """Who asked for a job: a user for one account or all of them, or the scheduler."""

    ACCOUNT = "account"
    ALL = "all"
    SCHEDULED = "scheduled"


class Health(StrEnum):
    """An account's health; LOCKED is shown, never stored (no live key grant to read it)."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    BROKEN = "BROKEN"
    LOCKED = "LOCKED"


class CircuitState(StrEnum):
    """An account's circuit breaker: closed lets runs through, open skips them, half-open lets
    one probe decide."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Gate(StrEnum):
    """What the circuit says of one run: go ahead, go ahead as the single probe, or skip."""

    PASS = "pass"
    PROBE = "probe"
    SKIP = "skip"


class ErrorClass(StrEnum):
    """Why a run did not succeed: a failure's class, or why it was skipped (not a failure)."""

    TIMEOUT = "timeout"
    CONNECTION_RESET = "connection_reset"
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"
    AUTH_FAILED = "auth_failed"
    INVALID_CREDENTIALS = "invalid_credentials"
    ACCOUNT_DISABLED = "account_disabled"
    TLS_ERROR = "tls_error"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"  # not public, or not an IMAP port
    UNKNOWN = "unknown"
    # skips: the run did not go ahead, which is not a failure
    LOCKED = "locked"
    CIRCUIT_OPEN = "circuit_open"

    @property
    def skip(self) -> bool:
        return self in SKIPS


SKIPS = frozenset({ErrorClass.LOCKED, ErrorClass.CIRCUIT_OPEN})
FAILURES = tuple(error_class for error_class in ErrorClass if error_class not in SKIPS)


class AuthKind(StrEnum):
    """How an account logs in (not secret): a refused login needs different advice for each."""

    PASSWORD = "password"
    OAUTH2 = "oauth2"


class RefreshOutcome(StrEnum):
    """How one OAuth2 token refresh ended (a metric label, never a user's word)."""

    SUCCESS = "success"
    REFUSED = "refused"  # invalid_grant: the user must connect the account again
    UNAVAILABLE = "unavailable"  # the token endpoint was down: retried
    FAILED = "failed"  # the endpoint refused the client itself


class ParseStatus(StrEnum):
    """Whether a stored message parsed, or is kept raw in quarantine."""

    PARSED = "parsed"
    QUARANTINED = "quarantined"


class ProcessStatus(StrEnum):
    """Whether the processors have seen a stored message, or must see it again."""

    PENDING = "pending"
    DONE = "done"
    RETRY = "retry"
