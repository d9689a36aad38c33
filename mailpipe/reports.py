"""What users see of their accounts: health and performance, computed from the job records."""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import grants
from .accounts import account_folders
from .crypto import DataKey
from .errors import DecryptionFailed
from .models import AccountRun, Email, FolderState, MailAccount, PipelineJob, utcnow
from .observer import PHASES
from .results import AccountHealth, Performance, Summary, TrendDay
from .vocabulary import JOB_FINAL, ErrorClass, Health, JobStatus, RunStatus

TREND_DAYS = 7
RUN_SAMPLE = 500
RECENT_RUNS = 5  # "N failures in the last 5 attempts" per account


def account_health(
    session: Session, user_id: int, *, key: DataKey | None = None, now: datetime | None = None
) -> list[AccountHealth]:
    """Each account's health, last check and last error in plain words; with the owner's key,
    the folders each syncs (encrypted: without it, `folders` is None).

    Without a live background grant the scheduler cannot read the user's accounts: they show
    LOCKED, which is not an error.
    """
    now = now or utcnow()
    background = user_id in grants.users_with_background_grant(session, now=now)
    accounts = session.scalars(
        select(MailAccount).where(MailAccount.user_id == user_id).order_by(MailAccount.id)
    ).all()
    owned = [account.id for account in accounts]
    folders = {
        account_id: (bool(pending), int(held or 0))
        for account_id, pending, held in session.execute(
            select(
                FolderState.account_id,
                func.max(FolderState.backfill_uid),
                func.sum(FolderState.messages),
            )
            .where(FolderState.account_id.in_(owned))
            .group_by(FolderState.account_id)
        )
    }
    stored = dict(
        session.execute(
            select(Email.account_id, func.count())
            .where(Email.account_id.in_(owned), Email.vanished_at.is_(None))
            .group_by(Email.account_id)
        ).all()
    )
    return [
        AccountHealth(
            account_id=account.id,
            provider=account.provider,
            auth=account.auth_kind,
            enabled=account.enabled,
            health=Health(account.health_status),
            shown_health=Health(account.health_status) if background else Health.LOCKED,
            locked=not background,
            circuit=account.circuit_state,
            health_checked_at=account.health_checked_at,
            last_fetch_at=account.last_fetch_at,
            last_success_at=account.last_success_at,
            last_error_class=ErrorClass(account.last_error_class)
            if account.last_error_class
            else None,
            last_error=account.last_error_message,
            folders=_folders(account, key),
            sync_interval_seconds=account.sync_interval_seconds,
            recent_runs=len(recent := _recent_outcomes(session, account.id)),
            recent_failures=recent.count(RunStatus.FAILED),
            backfill_pending=folders.get(account.id, (False, 0))[0],
            stored_mail=stored.get(account.id, 0),
            server_mail=folders.get(account.id, (False, 0))[1],
            push_enabled=account.push_enabled,
            pushed=account.push_enabled
            and account.watch_owner is not None
            and account.watch_until is not None
            and account.watch_until > now,
        )
        for account in accounts
    ]


def _folders(account: MailAccount, key: DataKey | None) -> list[str] | None:
    """The folders an account syncs, or None without its owner's key or when its sealed list
    does not open (one bad row does not take the report down)."""
    if key is None:
        return None
    try:
        return account_folders(account, key)
    except DecryptionFailed:
        return None


def _recent_outcomes(session: Session, account_id: int) -> list[str]:
    """The statuses of the account's last runs that went ahead (skips are not attempts)."""
    return list(
        session.scalars(
            select(AccountRun.status)
            .where(
                AccountRun.account_id == account_id,
                AccountRun.status.in_((RunStatus.SUCCESS, RunStatus.FAILED)),
            )
            .order_by(AccountRun.finished_at.desc())
            .limit(RECENT_RUNS)
        )
    )


def performance(session: Session, user_id: int, *, now: datetime | None = None) -> Performance:
    """Per-phase p50/p95, run and job durations, throughput and a 7-day trend for one user."""
    now = now or utcnow()
    since = now - timedelta(days=TREND_DAYS)
    runs = session.execute(
        select(
            AccountRun.status,
            AccountRun.phases,
            AccountRun.duration,
            AccountRun.fetched,
            AccountRun.finished_at,
        )
        .join(PipelineJob, PipelineJob.id == AccountRun.job_id)
        .where(PipelineJob.user_id == user_id, AccountRun.finished_at >= since)
        .order_by(AccountRun.finished_at.desc())
        .limit(RUN_SAMPLE)
    ).all()
    jobs = session.execute(
        select(
            PipelineJob.created_at,
            PipelineJob.metrics,
            PipelineJob.emails_fetched,
            PipelineJob.status,
        )
        .where(PipelineJob.user_id == user_id, PipelineJob.created_at >= since)
        .order_by(PipelineJob.created_at)
    ).all()
    phase_samples: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for phase, seconds in (run.phases or {}).items():
            phase_samples[phase].append(seconds)
    durations = [run.duration for run in runs if run.duration is not None]
    fetched = sum(run.fetched for run in runs if run.status == RunStatus.SUCCESS)
    busy = sum(run.duration or 0 for run in runs if run.status == RunStatus.SUCCESS)
    trend: dict[str, dict[str, Any]] = {}
    for day in range(TREND_DAYS - 1, -1, -1):
        date = (now - timedelta(days=day)).date().isoformat()
        trend[date] = {"date": date, "jobs": 0, "succeeded": 0, "emails": 0, "durations": []}
    for created_at, metrics, emails, status in jobs:
        entry = trend.get(created_at.date().isoformat())
        if entry is None:
            continue
        entry["jobs"] += 1
        entry["succeeded"] += status == JobStatus.SUCCESS
        entry["emails"] += emails or 0
        if metrics and metrics.get("duration") is not None:
            entry["durations"].append(metrics["duration"])
    finished = [job for job in jobs if job.status in JOB_FINAL]
    total_emails = sum(job.emails_fetched or 0 for job in jobs)
    job_durations = [
        job.metrics["duration"]
        for job in finished
        if job.metrics and job.metrics.get("duration") is not None
    ]
    return Performance(
        total_jobs=len(jobs),
        total_emails=total_emails,
        avg_duration=round(statistics.fmean(job_durations), 3) if job_durations else None,
        avg_emails_per_job=round(total_emails / len(jobs), 2) if jobs else None,
        success_rate=round(
            sum(job.status == JobStatus.SUCCESS for job in finished) / len(finished), 4
        )
        if finished
        else None,
        runs=len(runs),
        failed_runs=sum(run.status == RunStatus.FAILED for run in runs),
        phases={
            phase: summary
            for phase in PHASES
            if (summary := _summary(phase_samples.get(phase, []))) is not None
        },
        account_run_duration=_summary(durations),
        emails_per_second=round(fetched / busy, 2) if busy else None,
        trend=[
            TrendDay(
                date=entry["date"],
                jobs=entry["jobs"],
                succeeded=entry["succeeded"],
                emails=entry["emails"],
                avg_duration=round(statistics.fmean(entry["durations"]), 3)
                if entry["durations"]
                else None,
            )
            for entry in trend.values()
        ],
    )


def _summary(samples: list[float]) -> Summary | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return Summary(
        count=len(ordered),
        p50=round(_quantile(ordered, 0.5), 4),
        p95=round(_quantile(ordered, 0.95), 4),
        mean=round(statistics.fmean(ordered), 4),
    )


def _quantile(ordered: list[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]
