"""What the API and the dashboard show of jobs, accounts and notifications, in user words."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailpipe.accounts import account_login
from mailpipe.crypto import DataKey
from mailpipe.errors import DecryptionFailed
from mailpipe.models import AccountRun, MailAccount, Notification, PipelineJob, iso, utcnow
from mailpipe.providers import PROVIDER_NAMES
from mailpipe.results import AccountHealth, JobReport, JobSummary
from mailpipe.vocabulary import JOB_FINAL, RUN_FINAL, JobType

from .i18n import DEFAULT_LANGUAGE, TEXTS, text

USER_JOB_TYPES = (JobType.ACCOUNT, JobType.ALL)
NOTIFICATION_FIELDS = (
    "id",
    "kind",
    "severity",
    "message",
    "params",
    "account_id",
    "job_id",
    "created_at",
    "read_at",
)


def account_labels(
    session: Session, user_id: int, key: DataKey | None, *, lang: str = DEFAULT_LANGUAGE
) -> dict[int, str]:
    """Provider and login of each account, so users with several accounts can tell them apart.

    The login is decrypted with the owner's key for the owner only; without the key (or if it
    does not open) the account is named by provider and number.
    """
    labels = {}
    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user_id)):
        name = provider_name(account.provider, lang)
        login = None
        if key is not None and account.credentials_enc is not None:
            try:
                login = account_login(account, key)
            except (DecryptionFailed, ValueError, TypeError):
                login = None
        labels[account.id] = f"{name} · {login}" if login else f"{name} #{account.id}"
    return labels


def provider_name(provider: str, lang: str) -> str:
    """A provider's name; "other" is said in the reader's language."""
    if provider in PROVIDER_NAMES and provider != "other":
        return PROVIDER_NAMES[provider]
    return text(lang, "provider_other")


def error_text(error_class: str | None, lang: str, *, auth: str | None = None) -> str | None:
    """An error class in words a user can act on (for the way the account logs in, where that
    changes the advice); the core's own message stays technical."""
    if not error_class:
        return None
    for key in (f"error_{error_class}_{auth}", f"error_{error_class}"):
        if key in TEXTS["en"]:
            return text(lang, key)
    return text(lang, "error_unknown")


def status_text(status: str, lang: str) -> str:
    """A job or run status as the page shows it."""
    return text(lang, f"status_{status}")


def job_account_ids(session: Session, job_ids: list[str]) -> dict[str, list[int]]:
    """Which accounts each job covered, for the history's "account or all" column."""
    covered: dict[str, list[int]] = defaultdict(list)
    if job_ids:
        rows = session.execute(
            select(AccountRun.job_id, AccountRun.account_id)
            .where(AccountRun.job_id.in_(job_ids))
            .order_by(AccountRun.account_id)
        )
        for job_id, account_id in rows:
            covered[job_id].append(account_id)
    return covered


def accounts_label(job_type: str, account_ids: list[int], labels: dict[int, str], lang: str) -> str:
    """ "alle" for a fetch of all accounts, else the accounts' names (scheduled and push ones marked)."""
    if job_type == JobType.ALL:
        return text(lang, "all_accounts")
    named = ", ".join(labels.get(a, f"#{a}") for a in account_ids) or "—"
    if job_type == JobType.SCHEDULED:
        return f"{named} ({text(lang, 'automatic')})"
    if job_type == JobType.PUSH:
        return f"{named} ({text(lang, 'pushed')})"
    return named


def job_summary_view(
    job: JobSummary, *, account_ids: list[int], labels: dict[int, str], lang: str
) -> dict:
    """A history row: the core's summary plus accounts, duration and status in words."""
    return {
        **job.to_json(),
        "account_ids": account_ids,
        "accounts_label": accounts_label(job.type, account_ids, labels, lang),
        "duration": job.metrics.get("duration"),
        "status_text": status_text(job.status, lang),
        "reason_text": reason_text(job, lang),
    }


def reason_text(job: JobSummary, lang: str) -> str | None:
    """Why a final job did not fetch every account, when skips or no accounts decided it."""
    if job.reason is None:
        return None
    return text(
        lang,
        f"reason_{job.reason}",
        skipped=job.metrics.get("skipped", 0),
        accounts=job.metrics.get("accounts", 0),
    )


def job_status_view(status: JobReport, *, labels: dict[int, str], lang: str) -> dict:
    """One job with per-account progress, each error said in user words."""
    runs = [
        {
            **run.to_json(),
            "label": labels.get(run.account_id, f"#{run.account_id}"),
            "status_text": status_text(run.status, lang),
            "message": error_text(run.error_class, lang),
        }
        for run in status.accounts
    ]
    account_ids = [run.account_id for run in status.accounts]
    return {
        **job_summary_view(status, account_ids=account_ids, labels=labels, lang=lang),
        "accounts": runs,
        "progress": {
            "done": sum(run.status in RUN_FINAL for run in status.accounts),
            "total": len(runs),
        },
    }


def account_view(health: AccountHealth, *, labels: dict[int, str], lang: str) -> dict:
    """An account card: health, last check and last error in plain words."""
    return {
        **health.to_json(),
        "label": labels.get(health.account_id, f"#{health.account_id}"),
        "health_text": text(lang, f"health_{health.shown_health}"),
        "last_error_text": error_text(health.last_error_class, lang, auth=health.auth),
        "recent_text": text(
            lang,
            "recent_failures" if health.recent_runs > 1 else "recent_failures_one",
            failures=health.recent_failures,
            runs=health.recent_runs,
        )
        if health.recent_runs
        else None,
        "fetch_mode_text": text(lang, "push_active")
        if health.pushed
        else text(lang, "poll_every").format(
            minutes=max(1, round(health.sync_interval_seconds / 60))
        ),
    }


def totals_view(performance: dict, *, lang: str) -> str | None:
    """The 7 days in one line: jobs, mails, success rate and mean duration."""
    if not performance["total_jobs"]:
        return None
    rate = performance["success_rate"]
    duration = performance["avg_duration"]
    return text(
        lang,
        "totals",
        jobs=performance["total_jobs"],
        mails=performance["total_emails"],
        rate="—" if rate is None else f"{rate * 100:.0f}",
        seconds="—" if duration is None else _decimal(duration, lang),
    )


def _decimal(value: float, lang: str) -> str:
    shown = f"{value:.1f}"
    return shown.replace(".", ",") if lang == "de" else shown


def open_user_jobs(session: Session, user_id: int, *, window_seconds: int) -> int:
    """Jobs the user started that are not final yet.

    A job older than its key grant can no longer read anything and will end as skipped, so it
    stops counting after `window_seconds`; a lost job cannot block the user for good.
    """
    since = utcnow() - timedelta(seconds=window_seconds)
    return session.execute(
        select(func.count())
        .select_from(PipelineJob)
        .where(
            PipelineJob.user_id == user_id,
            PipelineJob.type.in_(USER_JOB_TYPES),
            PipelineJob.status.not_in(JOB_FINAL),
            PipelineJob.created_at >= since,
        )
    ).scalar_one()


def notification_view(row: Notification, lang: str) -> dict:
    """A notification as plain JSON values, instants in UTC with their offset, and its text in
    the reader's language."""
    view = {name: getattr(row, name) for name in NOTIFICATION_FIELDS}
    view.update(created_at=iso(row.created_at), read_at=iso(row.read_at))
    view["text"] = notification_text(row, lang)
    return view


def notification_text(row: Notification, lang: str) -> str:
    """Say a notification from its kind and parameters; one without them (an operator alert, a
    row from before parameters were kept) reads as stored."""
    key = f"note_{row.kind}"
    if not row.params or key not in TEXTS["en"]:
        return row.message
    errors = [
        said for name in row.params.get("error_classes", []) if (said := error_text(name, lang))
    ]
    provider = row.params.get("provider", "")
    return text(
        lang,
        key,
        provider=text(lang, "provider_other") if provider == PROVIDER_NAMES["other"] else provider,
        minutes=row.params.get("minutes", ""),
        error=error_text(row.params.get("error_class"), lang, auth=row.params.get("auth")) or "",
        errors=" ".join(errors) or text(lang, "no_account_read"),
    )


def user_notifications(session: Session, user_id: int, *, limit: int, lang: str) -> dict:
    """The user's own notifications, newest first, and how many are unread."""
    rows = session.scalars(
        select(Notification)
        .where(Notification.user_id == user_id)
        .order_by(Notification.created_at.desc(), Notification.id.desc())
        .limit(limit)
    )
    unread = session.scalar(
        select(func.count())
        .select_from(Notification)
        .where(Notification.user_id == user_id, Notification.read_at.is_(None))
    )
    return {"notifications": [notification_view(row, lang) for row in rows], "unread": unread}
