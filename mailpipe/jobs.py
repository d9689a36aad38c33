"""Job records: one row per fetch job, one per account in it, finalised exactly once."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, Update, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from . import grants, logs
from .db import rowcount
from .errors import NotFound
from .models import AccountRun, MailAccount, PipelineJob, UtcDateTime, utcnow
from .results import JobReport, JobSummary, RunReport
from .vocabulary import (
    JOB_FINAL,
    RUN_FINAL,
    RUN_OPEN,
    ErrorClass,
    JobReason,
    JobStatus,
    JobType,
    RunStatus,
)

COUNTERS = ("fetched", "saved", "duplicates", "quarantined", "processed")
MAX_TIMEOUT_SECONDS = 3600  # the longest a fetch job may be given (its timeout_seconds)
PURGE_BATCH = 5_000  # jobs deleted per call, so one transaction stays short

# Every account run begins and ends its run row and counts down its job's open runs: those
# UPDATEs are built once, on the tables (Core: no ORM session synchronisation; the runner holds
# no run or job object they change).
_RUNS = cast(Table, AccountRun.__table__)
_JOBS = cast(Table, PipelineJob.__table__)
_NOW = bindparam("now", type_=UtcDateTime())
_OPEN_RUN = update(_RUNS).where(
    _RUNS.c.job_id == bindparam("run_job"),
    _RUNS.c.account_id == bindparam("run_account"),
    _RUNS.c.status.not_in(RUN_FINAL),
)
_BEGIN_RUN = _OPEN_RUN.values(
    status=RunStatus.RUNNING,
    attempt=bindparam("new_attempt"),
    started_at=func.coalesce(_RUNS.c.started_at, _NOW),
)
_START_JOB = (
    update(_JOBS)
    .where(
        _JOBS.c.id == bindparam("job_id"),
        _JOBS.c.status.in_((JobStatus.PENDING, JobStatus.RETRYING)),
    )
    .values(status=JobStatus.RUNNING, started_at=func.coalesce(_JOBS.c.started_at, _NOW))
)
_COUNT_DOWN = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"))
    .values(runs_open=_JOBS.c.runs_open - 1)
    .returning(_JOBS.c.runs_open)
)


def new_job_id() -> str:
    return uuid.uuid4().hex


def create_job(
    session: Session,
    *,
    user_id: int,
    account_ids: Sequence[int],
    type: str,
    options: dict[str, Any],
    grant_id: uuid.UUID | None = None,
    job_id: str | None = None,
) -> PipelineJob:
    """A pending job with one pending run per account (a job without accounts is final at once,
    as there is no run to end it); the caller commits, then sends."""
    job = PipelineJob(
        id=job_id or new_job_id(),
        user_id=user_id,
        type=type,
        status=JobStatus.PENDING,
        options=options,
        grant_id=grant_id,
        errors=[],
        metrics={},
        runs_open=len(account_ids),
    )
    session.add(job)
    session.flush()
    if account_ids:
        session.execute(
            cast(Table, AccountRun.__table__).insert(),  # a Core executemany, not the ORM
            [
                {"job_id": job.id, "account_id": a, "status": RunStatus.PENDING, "attempt": 0}
                for a in account_ids
            ],
        )
    elif finalise_if_done(session, job.id) is not None and grant_id is not None:
        grants.drop_job_grant(session, job.id)  # no run will end this job and drop its key
    return job


def owned_accounts(session: Session, user_id: int, account_id: int | None = None) -> list[int]:
    """The enabled accounts a job may cover; another user's account is "not found"."""
    query = select(MailAccount.id).where(MailAccount.user_id == user_id)
    if account_id is not None:
        found = session.scalar(query.where(MailAccount.id == account_id))
        if found is None:
            raise NotFound(f"account {account_id} not found")
        return [found]
    return list(
        session.scalars(query.where(MailAccount.enabled.is_(True)).order_by(MailAccount.id))
    )


def begin_run(
    session: Session, *, job_id: str, account_id: int, attempt: int, job_status: str | None = None
) -> bool:
    """Mark a run as running; False when it already ended (a redelivered message).

    `job_status`, the job's status as the caller read it, spares the job row an UPDATE (and
    its lock, which every run of the job would queue for) once the job is running.
    """
    now = utcnow()
    result = session.execute(
        _BEGIN_RUN,
        {"run_job": job_id, "run_account": account_id, "new_attempt": attempt, "now": now},
    )
    if rowcount(result) == 0:
        return False
    if job_status in (JobStatus.PENDING, JobStatus.RETRYING, None):
        # the caller read the status it needs: no job object of the session is brought up to date
        moved = session.execute(_START_JOB, {"job_id": job_id, "now": now})
        if rowcount(moved) and job_status == JobStatus.PENDING:
            logs.job_started(job_id=job_id, account_id=account_id)
    return True


def mark_retrying(
    session: Session, *, job_id: str, account_id: int, error_class: str, message: str
) -> None:
    """A transient failure that Dramatiq will retry: the user sees "retrying", not "failed"."""
    session.execute(
        update(AccountRun)
        .where(AccountRun.job_id == job_id, AccountRun.account_id == account_id)
        .values(status=RunStatus.RETRYING, error_class=error_class, error_message=message)
    )
    session.execute(
        update(PipelineJob)
        .where(PipelineJob.id == job_id, PipelineJob.status.not_in(JOB_FINAL))
        .values(status=JobStatus.RETRYING, retry_count=PipelineJob.retry_count + 1)
    )


def reopen_run(session: Session, *, job_id: str, account_id: int) -> None:
    """Put a run back to pending when it must wait (its mail server is at its connection cap)."""
    session.execute(
        update(AccountRun)
        .where(
            AccountRun.job_id == job_id,
            AccountRun.account_id == account_id,
            AccountRun.status == RunStatus.RUNNING,
        )
        .values(status=RunStatus.PENDING)
    )


@dataclass(frozen=True)
class FinishedJob:
    """Returned to whoever ended the job's last run: they finalised it."""

    job_id: str
    user_id: int
    status: str
    grant_id: uuid.UUID | None
    type: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)  # as stored on the job
    emails_fetched: int = 0


def finish_run(
    session: Session,
    *,
    job_id: str,
    account_id: int,
    status: str,
    counts: Mapping[str, int] | None = None,
    phases: dict[str, float] | None = None,
    profile: dict[str, Any] | None = None,
    duration: float | None = None,
    error_class: str | None = None,
    message: str | None = None,
) -> FinishedJob | None:
    """End one run and, if it was the job's last, finalise the job (exactly once).

    The run's UPDATE ends it only once; the job's count of open runs then goes down in an
    atomic UPDATE (which holds the job row until commit), so of two runs ending together
    exactly one sees it reach zero. Nothing reads the job's other runs until then: ending a
    run costs the same for a job of ten accounts as for one of ten thousand.
    """
    if status not in RUN_FINAL:
        raise ValueError(f"{status!r} is not a final run status")
    values: dict[str, object] = {
        "status": status,
        "finished_at": utcnow(),
        "error_class": error_class,
        "error_message": message,
    }
    if counts:
        values.update({name: counts.get(name, 0) for name in COUNTERS})
    if phases is not None:
        values["phases"] = phases
    if profile is not None:
        values["profile"] = profile
    if duration is not None:
        values["duration"] = duration
    ended = session.execute(
        _end_run(tuple(values)),
        {"run_job": job_id, "run_account": account_id}
        | {f"new_{name}": value for name, value in values.items()},
    )
    if rowcount(ended) == 0:
        return None
    left = session.scalar(_COUNT_DOWN, {"job_id": job_id})
    return finalise_if_done(session, job_id) if left is not None and left <= 0 else None


@functools.cache
def _end_run(columns: tuple[str, ...]) -> Update:
    """The UPDATE that ends an open run, setting `columns` (a run ends with one of a few sets)."""
    return _OPEN_RUN.values({name: bindparam(f"new_{name}") for name in columns})


def finalise_if_done(session: Session, job_id: str) -> FinishedJob | None:
    """Set the job's final status once no run is left open; None if runs remain or done already."""
    runs = session.execute(
        select(
            AccountRun.account_id,
            AccountRun.status,
            AccountRun.error_class,
            AccountRun.error_message,
            AccountRun.fetched,
            AccountRun.processed,
            AccountRun.duration,
            AccountRun.phases,
        ).where(AccountRun.job_id == job_id)
    ).all()
    if any(run.status not in RUN_FINAL for run in runs):
        return None
    statuses = [run.status for run in runs]
    status, reason = final_status(statuses)
    job = session.get_one(PipelineJob, job_id)
    finished_at = utcnow()
    started = job.started_at or job.created_at
    phases: dict[str, float] = {}
    for run in runs:
        for phase, seconds in (run.phases or {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    emails_fetched = sum(run.fetched for run in runs)
    metrics = {
        "duration": round((finished_at - started).total_seconds(), 3),
        "accounts": len(runs),
        "succeeded": statuses.count(RunStatus.SUCCESS),
        "failed": statuses.count(RunStatus.FAILED),
        "skipped": statuses.count(RunStatus.SKIPPED),
        "phases": phases,
        "reason": reason,
    }
    done = session.execute(
        update(PipelineJob)
        .where(PipelineJob.id == job_id, PipelineJob.status.not_in(JOB_FINAL))
        .values(
            status=status,
            finished_at=finished_at,
            emails_fetched=emails_fetched,
            emails_processed=sum(run.processed for run in runs),
            errors=[
                {
                    "account_id": run.account_id,
                    "error_class": run.error_class,
                    "message": run.error_message,
                }
                for run in runs
                if run.status == RunStatus.FAILED
            ],
            metrics=metrics,
        )
    )
    if rowcount(done) == 0:
        return None
    return FinishedJob(
        job_id=job_id,
        user_id=job.user_id,
        status=status,
        grant_id=job.grant_id,
        type=job.type,
        metrics=metrics,
        emails_fetched=emails_fetched,
    )


def lost_runs(
    session: Session, *, created_before: datetime, limit: int = PURGE_BATCH
) -> list[tuple[str, int]]:
    """(job id, account id) of runs still open in jobs created before `created_before`: no
    message will run them any more (Redis lost it, or a restored database holds runs whose
    messages were used up after the dump)."""
    # Unfinished jobs first (finished_at is indexed, and few jobs are open), then their runs by
    # the (job, account) unique index: no scan of the whole run history every tick.
    rows = session.execute(
        select(AccountRun.job_id, AccountRun.account_id)
        .join(PipelineJob, PipelineJob.id == AccountRun.job_id)
        .where(
            PipelineJob.finished_at.is_(None),
            PipelineJob.created_at < created_before,
            AccountRun.status.in_(RUN_OPEN),
        )
        .limit(limit)
    ).all()
    return [(job_id, account_id) for job_id, account_id in rows]


def purge_finished(session: Session, *, before: datetime, limit: int = PURGE_BATCH) -> int:
    """Delete jobs that ended before `before`, their account runs with them; open jobs stay."""
    old = select(PipelineJob.id).where(PipelineJob.finished_at < before).limit(limit)
    deleted = session.execute(
        delete(PipelineJob)
        .where(PipelineJob.id.in_(old.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return rowcount(deleted)


def final_status(statuses: Sequence[str]) -> tuple[JobStatus, JobReason | None]:
    """Success only when every account was fetched; failed when none was (no account, or every
    run failed or was skipped); otherwise a partial failure. The reason says when skips decided."""
    succeeded = statuses.count(RunStatus.SUCCESS)
    skipped = statuses.count(RunStatus.SKIPPED)
    if not statuses:
        return JobStatus.FAILED, JobReason.NO_ACCOUNTS
    if succeeded == len(statuses):
        return JobStatus.SUCCESS, None
    if skipped == len(statuses):
        return JobStatus.FAILED, JobReason.ALL_SKIPPED
    reason = JobReason.SOME_SKIPPED if skipped else None
    return (JobStatus.PARTIAL_FAILURE if succeeded else JobStatus.FAILED), reason


def get_job(session: Session, job_id: str, user_id: int) -> PipelineJob:
    """The job if it is this user's; anyone else's job is "not found", as is a missing one."""
    job = session.get(PipelineJob, job_id)
    if job is None or job.user_id != user_id:
        raise NotFound(f"job {job_id} not found")
    return job


def job_status(session: Session, job_id: str, user_id: int) -> JobReport:
    """Status, counts and per-account progress, without secrets or mail content."""
    job = get_job(session, job_id, user_id)
    runs = session.scalars(
        select(AccountRun).where(AccountRun.job_id == job_id).order_by(AccountRun.account_id)
    ).all()
    providers = dict(
        session.execute(
            select(MailAccount.id, MailAccount.provider).where(
                MailAccount.id.in_([run.account_id for run in runs])
            )
        ).all()
    )
    return JobReport(
        **_summary_fields(job),
        accounts=[
            RunReport(
                account_id=run.account_id,
                provider=providers.get(run.account_id, "other"),
                status=RunStatus(run.status),
                attempt=run.attempt,
                started_at=run.started_at,
                finished_at=run.finished_at,
                duration=run.duration,
                phases=run.phases or {},
                fetched=run.fetched,
                saved=run.saved,
                duplicates=run.duplicates,
                quarantined=run.quarantined,
                processed=run.processed,
                error_class=ErrorClass(run.error_class) if run.error_class else None,
                error=run.error_message,
            )
            for run in runs
        ],
    )


def _summary_fields(job: PipelineJob) -> dict[str, Any]:
    status = JobStatus(job.status)
    reason = (job.metrics or {}).get("reason")
    return {
        "job_id": job.id,
        "type": JobType(job.type),
        "status": status,
        "final": status.final,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "emails_fetched": job.emails_fetched,
        "emails_processed": job.emails_processed,
        "retry_count": job.retry_count,
        "reason": JobReason(reason) if reason else None,
        "errors": job.errors or [],
        "metrics": job.metrics or {},
        "options": job.options or {},
    }


def list_jobs(session: Session, user_id: int, limit: int = 20) -> list[JobSummary]:
    """The user's most recent jobs, newest first."""
    jobs = session.scalars(
        select(PipelineJob)
        .where(PipelineJob.user_id == user_id)
        .order_by(PipelineJob.created_at.desc(), PipelineJob.id)
        .limit(limit)
    )
    return [JobSummary(**_summary_fields(job)) for job in jobs]


def open_runs(session: Session, account_id: int) -> int:
    """How many runs of the account are queued or under way (for the scheduler)."""
    return session.execute(
        select(func.count())
        .select_from(AccountRun)
        .where(
            AccountRun.account_id == account_id,
            AccountRun.status.in_((RunStatus.PENDING, RunStatus.RUNNING, RunStatus.RETRYING)),
        )
    ).scalar_one()
