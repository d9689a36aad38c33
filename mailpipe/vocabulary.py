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


class JobReason(StrEnum):
    """Why a final job did not fetch every account, where the runs' statuses alone do not say it.

    A job succeeds only when every account in it was fetched. A job with no account, or whose
    every run was skipped (circuit open, no key grant), fetched nothing: it is failed. A job
    that fetched some accounts and skipped others is a partial failure. Each says why here.
    """

    NO_ACCOUNTS = "no_accounts"
    ALL_SKIPPED = "all_skipped"
    SOME_SKIPPED = "some_skipped"


class DiagnosisStatus(StrEnum):
    """Where a connection check a user asked for stands: waiting for a worker, or its outcome."""

    PENDING = "pending"
    DONE = "done"  # it ran; the report says whether every check passed
    FAILED = "failed"  # it could not run (no key grant, the account's settings do not open)


JOB_FINAL = frozenset({JobStatus.SUCCESS, JobStatus.PARTIAL_FAILURE, JobStatus.FAILED})
RUN_FINAL = frozenset({RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.SKIPPED})
RUN_OPEN = frozenset(RunStatus) - RUN_FINAL


class JobType(StrEnum):
    """Who asked for a job: a user for one account or all of them, the scheduler, or a
    watcher that saw new mail arrive (push)."""

    ACCOUNT = "account"
    ALL = "all"
    SCHEDULED = "scheduled"
    PUSH = "push"


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


class FolderRole(StrEnum):
    """What a folder is for (RFC 6154 SPECIAL-USE, or its common name); `@sent` names it."""

    INBOX = "inbox"
    SENT = "sent"
    DRAFTS = "drafts"
    TRASH = "trash"
    JUNK = "junk"
    ARCHIVE = "archive"
    ALL = "all"
    FLAGGED = "flagged"


class MailChangeKind(StrEnum):
    """What the change feed says happened to a stored message."""

    NEW = "new"
    FLAGS = "flags"  # its flags changed (read, flagged, answered ...), or it moved to a new UID
    VANISHED = "vanished"  # the server no longer holds it in this folder (expunged or moved)
