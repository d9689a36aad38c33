"""Structured events: one log record per job enqueued, started and finished and per account run.

Events go through the standard logging module (logger `mailpipe.events`), their fields passed as
`extra`, so any handler can read them. `configure` makes a process write every record as text
(the default) or, with `MAILPIPE_LOG_FORMAT=json`, as one JSON object per line with the fields at
the top level. Fields are ids, counts, seconds, statuses and error classes: never a secret, mail
text, address, login or folder name (error messages stay in the database, where users read them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

TEXT = "text"
JSON = "json"
LOG_FORMATS = (TEXT, JSON)
LOGGER_NAME = "mailpipe.events"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
EVENT = "event"
# The attributes every LogRecord has; whatever else a record carries came as `extra`.
STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

logger = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC with its offset), level, logger, the
    event's fields (or the message of an ordinary record) and a traceback if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = {k: v for k, v in vars(record).items() if k not in STANDARD_ATTRIBUTES}
        if EVENT not in fields:
            line["message"] = record.getMessage()
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(log_format: str, *, stream: IO[str] | None = None) -> None:
    """Give this process's log handlers the chosen format; with `stream`, a handler on it at
    INFO if the process has none yet.

    Handlers someone else installed (the dramatiq and periodiq CLIs' pipe to their parent)
    are kept: text leaves their format as it is, json gives them the JSON form.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    root = logging.getLogger()
    if stream is not None and not root.handlers:
        added = logging.StreamHandler(stream)
        added.setFormatter(logging.Formatter(TEXT_FORMAT))
        root.addHandler(added)
        root.setLevel(logging.INFO)
    if log_format == JSON:
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())


def emit(event: str, **fields: Any) -> None:
    """Log one event; text handlers show it as `event key=value ...`."""
    if not logger.isEnabledFor(logging.INFO):
        return
    text = " ".join(f"{key}={_text(value)}" for key, value in fields.items() if value is not None)
    logger.info("%s %s", event, text, extra={EVENT: event, **fields})


def job_enqueued(*, job_id: str, user_id: int, job_type: str, accounts: int) -> None:
    """A fetch job was created and its messages sent."""
    emit("job_enqueued", job_id=job_id, user_id=user_id, job_type=str(job_type), accounts=accounts)


def job_started(*, job_id: str, account_id: int) -> None:
    """The job's first run began (the job went from pending to running)."""
    emit("job_started", job_id=job_id, account_id=account_id)


def job_finished(
    *,
    job_id: str,
    user_id: int,
    job_type: str,
    status: str,
    duration_seconds: float | None,
    metrics: Mapping[str, Any],
    emails_fetched: int,
) -> None:
    """The job's last run ended and gave the job its final status."""
    emit(
        "job_finished",
        job_id=job_id,
        user_id=user_id,
        job_type=str(job_type),
        status=str(status),
        duration_seconds=_seconds(duration_seconds),
        accounts=metrics.get("accounts"),
        succeeded=metrics.get("succeeded"),
        failed=metrics.get("failed"),
        skipped=metrics.get("skipped"),
        emails_fetched=emails_fetched,
        phases={name: _seconds(s) for name, s in (metrics.get("phases") or {}).items()},
    )


def account_run(
    *,
    job_id: str,
    account_id: int,
    status: str,
    duration_seconds: float,
    attempt: int | None = None,
    provider: str | None = None,
    phases: Mapping[str, float] | None = None,
    counts: Mapping[str, int] | None = None,
    error_class: str | None = None,
) -> None:
    """One attempt of one account's run ended: succeeded, failed, skipped, sent to a retry
    (`retrying`) or sent again later because the account or its server was busy (`pending`)."""
    emit(
        "account_run",
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        status=str(status),
        provider=provider,
        error_class=None if error_class is None else str(error_class),
        duration_seconds=_seconds(duration_seconds),
        phases={name: _seconds(seconds) for name, seconds in (phases or {}).items()},
        **dict(counts or {}),
    )


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _text(value: object) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{key}:{item}" for key, item in value.items()) or "-"
    return str(value)
