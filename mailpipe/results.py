"""What the core hands to web code, the command line and host apps: typed, never bare dicts.

Each result is a frozen dataclass; `to_json()` gives its JSON form (instants as ISO 8601 with
their offset, vocabulary members as their stored strings). web/openapi.py builds the API's
schemas from these classes, so a field is declared once.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from .vocabulary import (
    DiagnosisStatus,
    ErrorClass,
    Health,
    JobReason,
    JobStatus,
    JobType,
    MailChangeKind,
    RunStatus,
)


@dataclasses.dataclass(frozen=True)
class Result:
    """A result's JSON form, the same for every kind of result."""

    def to_json(self) -> dict[str, Any]:
        return {field.name: _json(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _json(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunReport(Result):
    """One account's part of a job: status, attempt, phase timings, counts and error."""

    account_id: int
    provider: str
    status: RunStatus
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None
    phases: dict[str, float]
    fetched: int
    saved: int
    duplicates: int
    quarantined: int
    processed: int
    error_class: ErrorClass | None
    error: str | None  # the technical cause: one line, no secret


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSummary(Result):
    """A job as its history lists it: status, times and counts."""

    job_id: str
    type: JobType
    status: JobStatus
    final: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    emails_fetched: int
    emails_processed: int
    retry_count: int
    reason: JobReason | None  # why a final job did not fetch every account (vocabulary.JobReason)
    errors: list[dict[str, Any]]  # per failed account: account_id, error_class, message
    metrics: dict[str, Any]  # duration, accounts, succeeded, failed, skipped, phases, reason
    options: dict[str, Any]  # max_mails, timeout_seconds


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobReport(JobSummary):
    """One job with the progress of every account in it."""

    accounts: list[RunReport]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AccountHealth(Result):
    """One account's health, last check and last error, without host, login or secret."""

    account_id: int
    provider: str
    auth: str
    enabled: bool
    health: Health
    shown_health: Health  # LOCKED while no background grant lets workers read the account
    locked: bool
    circuit: str
    health_checked_at: datetime | None
    last_fetch_at: datetime | None
    last_success_at: datetime | None
    last_error_class: ErrorClass | None
    last_error: str | None
    folders: list[str] | None  # None when read without the owner's key (they are encrypted)
    sync_interval_seconds: int
    recent_runs: int  # the account's last (at most RECENT_RUNS) runs that went ahead
    recent_failures: int  # how many of those failed
    # newest first under a cap: older mail still being fetched by later runs, and how far
    # that is (messages stored, and the messages the server held when last synced)
    backfill_pending: bool
    stored_mail: int
    server_mail: int
    push_enabled: bool  # the owner wants push for this account
    pushed: bool  # a watcher holds an IDLE connection for it now


@dataclasses.dataclass(frozen=True, kw_only=True)
class Note(Result):
    """A notification as its owner reads it: English words (`message`), never a secret."""

    id: int
    kind: str
    severity: str
    message: str
    account_id: int | None
    job_id: str | None
    created_at: datetime
    read: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary(Result):
    """Quantiles of a sample of durations, in seconds."""

    count: int
    p50: float
    p95: float
    mean: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrendDay(Result):
    """One day of a user's jobs."""

    date: str
    jobs: int
    succeeded: int  # jobs that fetched every account
    emails: int
    avg_duration: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Performance(Result):
    """A user's recent runs: per-phase and run quantiles, throughput, the 7 days' totals and
    their trend per day."""

    total_jobs: int  # jobs of the last 7 days
    total_emails: int  # mails those jobs fetched
    avg_duration: float | None  # seconds per finished job
    avg_emails_per_job: float | None
    success_rate: float | None  # share of finished jobs that fetched every account, 0 to 1
    runs: int
    failed_runs: int
    phases: dict[str, Summary]
    account_run_duration: Summary | None
    emails_per_second: float | None
    trend: list[TrendDay]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailItem(Result):
    """One stored message as a list shows it: sender, subject, date and read state."""

    id: str
    account_id: int
    folder: str
    uid: int
    sender: str  # the first From address, as "Name <address>" or the address alone
    subject: str
    date: datetime | None  # when the server received it (INTERNALDATE), else its Date header
    read: bool
    flagged: bool
    quarantined: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailPage(Result):
    """Newest first; `next_before` is the `before` of the next (older) page, None at the end."""

    mail: list[MailItem]
    next_before: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailMessage(MailItem):
    """One message with its parsed fields and what processors said of it."""

    flags: list[str]
    fields: dict[str, Any]  # subject, from, to, cc, date, text, attachments, ... (see parse.py)
    annotations: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MailChange(Result):
    """One change in the feed; `mail` is the message as it is now (None once it vanished)."""

    kind: MailChangeKind
    mail_id: str
    account_id: int
    seq: int  # the account's change number
    mail: MailItem | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChangePage(Result):
    """Changes oldest first; pass `cursor` to the next call; `more` when the page was full."""

    changes: list[MailChange]
    cursor: str
    more: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiagnosisRequest(Result):
    """A connection check as its owner reads it: pending, not run (`error` says why), or done
    with its report (the diagnostics suite's JSON, decrypted)."""

    id: str
    account_id: int
    status: DiagnosisStatus
    ok: bool | None
    error_class: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    report: dict[str, Any] | None
