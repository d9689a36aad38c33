"""The metric objects of docs/design.md "Metrics", and the fixed vocabularies of their labels.

Every label value passes through `bounded`, so a caller can never put a user, account, address or
folder name into a series (privacy, and a bounded number of series whatever the input).
"""

from __future__ import annotations

from collections.abc import Container

from prometheus_client import Counter, Gauge, Histogram

from mailpipe import observer, parse, providers, retry
from mailpipe.vocabulary import (
    FAILURES,
    JOB_FINAL,
    RUN_FINAL,
    ErrorClass,
    JobType,
    RefreshOutcome,
)

OTHER = "other"
PROVIDERS = providers.PROVIDERS  # includes "other", the fallback
PHASES = (*observer.PHASES, OTHER)  # "other": an error outside any timed phase
RUN_OUTCOMES = (*RUN_FINAL, OTHER)
JOB_TYPES = (JobType.ACCOUNT, JobType.ALL, JobType.SCHEDULED, JobType.PUSH, OTHER)
JOB_STATUSES = (*JOB_FINAL, OTHER)
ERROR_CLASSES = FAILURES  # includes "unknown", the fallback; skips are not errors
PARSE_ERROR = "parse_error"
QUARANTINE_REASONS = tuple(
    dict.fromkeys([*parse.QUARANTINE_REASONS.values(), "not_a_message", PARSE_ERROR])
)
AUTH_ERROR_CLASSES = (ErrorClass.AUTH_FAILED, ErrorClass.INVALID_CREDENTIALS)
LOGIN_OUTCOMES = ("success", "failed", "throttled")

# Bucket bounds include the alert thresholds (2 s and 5 s connect, 10 s and 30 s account run),
# so histogram_quantile is exact at the lines that page someone.
PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

PHASE_DURATION = Histogram(
    "mailpipe_phase_duration_seconds",
    "Wall time of one timed block of a phase of an account sync (phases may repeat per run).",
    ["phase", "provider"],
    buckets=PHASE_BUCKETS,
)
ACCOUNT_RUN_DURATION = Histogram(
    "mailpipe_account_run_duration_seconds",
    "Wall time of the attempt that ended an account run, by its outcome.",
    ["provider", "outcome"],
    buckets=RUN_BUCKETS,
)
JOB_DURATION = Histogram(
    "mailpipe_job_duration_seconds",
    "Time from enqueue to the final status of a fetch job.",
    ["type", "status"],
    buckets=RUN_BUCKETS,
)
JOBS = Counter("mailpipe_jobs_total", "Fetch jobs that reached a final status.", ["type", "status"])
ACCOUNT_RUNS = Counter(
    "mailpipe_account_runs_total", "Account runs that ended, by outcome.", ["provider", "outcome"]
)
EMAILS_FETCHED = Counter(
    "mailpipe_emails_fetched_total", "Messages fetched from IMAP servers.", ["provider"]
)
EMAILS_SAVED = Counter("mailpipe_emails_saved_total", "Messages stored (new, not duplicates).")
EMAILS_QUARANTINED = Counter(
    "mailpipe_emails_quarantined_total",
    "Messages stored raw because they did not parse.",
    ["reason"],
)
FETCHED_BYTES = Counter(
    "mailpipe_fetched_bytes_total",
    "Bytes of message bodies fetched from IMAP servers.",
    ["provider"],
)
FLAG_UPDATES = Counter(
    "mailpipe_flag_updates_total",
    "Stored messages whose flags were updated from the server (read, flagged, answered...).",
    ["provider"],
)
VANISHED = Counter(
    "mailpipe_vanished_total",
    "Stored messages removed because the server no longer holds them (expunged or moved).",
    ["provider"],
)
ERRORS = Counter(
    "mailpipe_errors_total",
    "Failed account-run attempts, by error class and the phase they failed in.",
    ["error_class", "phase", "provider"],
)
TOKEN_REFRESHES = Counter(
    "mailpipe_oauth2_token_refreshes_total",
    "OAuth2 access-token refreshes at the provider's token endpoint, by how they ended.",
    ["provider", "outcome"],
)
REFRESH_OUTCOMES = tuple(RefreshOutcome)
RETRIES = Counter(
    "mailpipe_retries_total", "Account-run attempts sent back for a retry.", ["error_class"]
)
LOGINS = Counter(
    "mailpipe_web_logins_total",
    "Web logins by outcome: success, failed (wrong name or password) or throttled (answered 429 "
    "before the password was checked).",
    ["outcome"],
)
# The phases of the seed's per-mail targets (fetch of 50 mails; parse plus save), counted only
# in runs that fetched mail, so that no-change polls (an EXAMINE each, timed as fetch) do not
# count as time spent on mail.
MAIL_PHASES = ("fetch", "parse", "save")
MAIL_PHASE_SECONDS = Counter(
    "mailpipe_mail_phase_seconds_total",
    "Seconds of the fetch, parse and save phases in account runs that fetched mail.",
    ["phase", "provider"],
)

IDLE_CONNECTIONS = Gauge(
    "mailpipe_idle_connections",
    "IMAP IDLE connections the watchers hold now.",
    ["provider"],
    multiprocess_mode="livesum",
)
PUSH_RUNS = Counter(
    "mailpipe_push_runs_total",
    "Fetch runs a watcher enqueued because the server reported new mail.",
    ["provider"],
)
PUSH_LATENCY = Histogram(
    "mailpipe_push_latency_seconds",
    "From the watcher seeing the server report new mail to that mail stored by a push run.",
    ["provider"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
IDLE_RECONNECTS = Counter(
    "mailpipe_idle_reconnects_total",
    "IDLE connections lost, or not opened, and tried again, by error class.",
    ["error_class"],
)


def bounded(value: str | None, allowed: Container[str], *, fallback: str = OTHER) -> str:
    """The value when it belongs to the fixed vocabulary, else the fallback: no free text in labels."""
    return value if value is not None and value in allowed else fallback


def initialise() -> None:
    """Create the counters' known series at zero, so rate() and increase() see their first event.

    Only small label products are created here; histograms appear with their first observation.
    """
    for provider in PROVIDERS:
        EMAILS_FETCHED.labels(provider)
        FETCHED_BYTES.labels(provider)
        FLAG_UPDATES.labels(provider)
        VANISHED.labels(provider)
        for outcome in RUN_FINAL:
            ACCOUNT_RUNS.labels(provider, outcome)
        for error_class in AUTH_ERROR_CLASSES:  # what the auth-failure alert counts
            ERRORS.labels(error_class, "connect", provider)
        for phase in MAIL_PHASES:
            MAIL_PHASE_SECONDS.labels(phase, provider)
        for refresh in REFRESH_OUTCOMES:
            TOKEN_REFRESHES.labels(provider, refresh)
    for job_type in JOB_TYPES[:-1]:
        for status in JOB_FINAL:
            JOBS.labels(job_type, status)
    for error_class in retry.TRANSIENT:
        RETRIES.labels(error_class)
    for reason in QUARANTINE_REASONS:
        EMAILS_QUARANTINED.labels(reason)
    for login_outcome in LOGIN_OUTCOMES:
        LOGINS.labels(login_outcome)
    for provider in PROVIDERS:
        IDLE_CONNECTIONS.labels(provider)
        PUSH_RUNS.labels(provider)
        PUSH_LATENCY.labels(provider)
    for error_class in ERROR_CLASSES:
        IDLE_RECONNECTS.labels(error_class)


initialise()
