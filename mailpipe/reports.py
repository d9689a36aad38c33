"""What users see of their accounts: health and performance, computed from the job records."""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import grants
from .models import AccountRun, MailAccount, PipelineJob, utcnow
from .observer import PHASES
from .results import AccountHealth, Performance, Summary, TrendDay
from .vocabulary import ErrorClass, Health, RunStatus

TREND_DAYS = 7
RUN_SAMPLE = 500


def account_health(
    session: Session, user_id: int, *, now: datetime | None = None
) -> list[AccountHealth]:
    """Each account's health, last check and last error in plain words.

    Without a live background grant the scheduler cannot read the user's accounts: they show
    LOCKED, which is not an error.
    """
    now = now or utcnow()
    background = user_id in grants.users_with_background_grant(session, now=now)
    accounts = session.scalars(
        select(MailAccount).where(MailAccount.user_id == user_id).order_by(MailAccount.id)
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
            folders=list(account.folders),
            sync_interval_seconds=account.sync_interval_seconds,
            push_enabled=account.push_enabled,
            pushed=account.push_enabled
            and account.watch_owner is not None
            and account.watch_until is not None
            and account.watch_until > now,
        )
        for account in accounts
    ]


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
        select(PipelineJob.created_at, PipelineJob.metrics, PipelineJob.emails_fetched)
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
        trend[date] = {"date": date, "jobs": 0, "emails": 0, "durations": []}
    for created_at, metrics, emails in jobs:
        entry = trend.get(created_at.date().isoformat())
        if entry is None:
            continue
        entry["jobs"] += 1
        entry["emails"] += emails or 0
        if metrics and metrics.get("duration") is not None:
            entry["durations"].append(metrics["duration"])
    return Performance(
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
