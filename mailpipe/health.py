"""Account health, the circuit breaker and the notifications users act on.

After every attempt the account moves between HEALTHY, DEGRADED and BROKEN; five failures within
an hour open its circuit, which skips runs until a cool-down passes and one half-open probe
decides. Users are told once per transition, never once per attempt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, and_, bindparam, case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import rowcount
from .models import MailAccount, Notification, PipelineJob, utcnow
from .policies import CircuitPolicy
from .providers import PROVIDER_NAMES
from .results import Note
from .retry import RetryPolicy, transient
from .vocabulary import AuthKind, CircuitState, ErrorClass, Gate, Health

# What the owner reads, per cause; {provider} is a display name such as "GMX".
BROKEN_MESSAGES = {
    ErrorClass.INVALID_CREDENTIALS: "{provider}: login failed, please re-enter the password",
    ErrorClass.AUTH_FAILED: "{provider}: the server refused the login, please check the account settings",
    ErrorClass.ACCOUNT_DISABLED: "{provider}: the provider has disabled this account, please check it there",
    ErrorClass.TLS_ERROR: "{provider}: the server's certificate could not be verified; mail stays unfetched until the server or the settings are fixed",
    ErrorClass.ADDRESS_NOT_ALLOWED: "{provider}: mailpipe does not connect to this server (not on "
    "the public internet, or not on an IMAP port), please check the account settings",
}
OAUTH2_BROKEN_MESSAGES = {
    ErrorClass.INVALID_CREDENTIALS: "{provider}: the sign-in with the provider has expired or was withdrawn, "
    "please connect the account again",
}
CIRCUIT_MESSAGE = (
    "{provider}: fetching keeps failing ({error}); mailpipe pauses this account for "
    "{minutes} minutes and then tries again"
)
JOB_FAILED_MESSAGE = "Fetching mail failed: {details}"
RETRIES_EXHAUSTED_MESSAGE = (
    "{provider}: fetching failed after every retry ({error}); the other accounts were fetched, "
    "and this one is tried again at the next fetch"
)

logger = logging.getLogger(__name__)

_ACCOUNTS = cast(Table, MailAccount.__table__)
# healthy, circuit closed, no failures counted: a success changes nothing but the time
_HEALTHY = and_(
    _ACCOUNTS.c.health_status == Health.HEALTHY,
    _ACCOUNTS.c.circuit_state == CircuitState.CLOSED,
    _ACCOUNTS.c.failure_count == 0,
)
# Built once, on the table (no ORM session synchronisation: no account object to update).
_STAYS_HEALTHY = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("account_id"), _HEALTHY)
    .values(health_checked_at=bindparam("now"))
)
# `stays_healthy` for an UPDATE of the account that does more (the run's last one): SET values
# that record the bound `now` on a healthy account only, and what to return to tell whether it
# was healthy (the UPDATE changes none of the columns `_HEALTHY` reads).
TOUCHED: dict[str, ColumnElement[object]] = {
    "health_checked_at": case((_HEALTHY, bindparam("now")), else_=_ACCOUNTS.c.health_checked_at)
}
WAS_HEALTHY = _HEALTHY.label("was_healthy")


@dataclass(frozen=True)
class Transition:
    """What one attempt changed, for metrics and logs."""

    health_before: str
    health_after: str
    circuit_before: str
    circuit_after: str

    def log(self, account_id: int) -> None:
        """One line when health or circuit moved (none when the attempt changed nothing)."""
        if (self.health_before, self.circuit_before) != (self.health_after, self.circuit_after):
            logger.info(
                "account %s: health %s -> %s, circuit %s -> %s",
                account_id,
                self.health_before,
                self.health_after,
                self.circuit_before,
                self.circuit_after,
            )


def circuit_gate(
    session: Session,
    account_id: int,
    *,
    circuit: CircuitPolicy,
    now: datetime | None = None,
    state: str | None = None,
) -> Gate:
    """Whether a run may go ahead: PASS, the single half-open PROBE, or SKIP.

    A probe's claim is timed like the opening of the circuit: a probe that never reports (its
    worker died, or its run had to wait) gives way to a new one after another cool-down, so the
    circuit cannot stay half-open for good. `state` is the circuit state the caller read in
    this transaction (a closed circuit then costs no query).
    """
    now = now or utcnow()
    if state is None:
        state = session.scalar(
            select(MailAccount.circuit_state).where(MailAccount.id == account_id)
        )
    if state is None or state == CircuitState.CLOSED:
        return Gate.PASS
    cooled = now - timedelta(seconds=circuit.cooldown_seconds)
    won = session.execute(
        update(MailAccount)
        .where(
            MailAccount.id == account_id,
            MailAccount.circuit_state.in_((CircuitState.OPEN, CircuitState.HALF_OPEN)),
            MailAccount.circuit_opened_at <= cooled,
        )
        .values(circuit_state=CircuitState.HALF_OPEN, circuit_opened_at=now)
        .execution_options(synchronize_session=False)
    )
    return Gate.PROBE if rowcount(won) == 1 else Gate.SKIP


def record_outcome(
    session: Session,
    account_id: int,
    *,
    error_class: ErrorClass | None,
    retry_policy: RetryPolicy,
    circuit: CircuitPolicy,
    now: datetime | None = None,
) -> Transition:
    """Move health and circuit after one attempt; notify the owner on each transition (only a
    failure breaks an account or opens its circuit)."""
    now = now or utcnow()
    if error_class is None:
        return record_success(session, account_id, now=now)
    _lock(session, account_id)
    account = session.get_one(MailAccount, account_id)
    health_before, circuit_before = account.health_status, account.circuit_state
    account.health_checked_at = now
    account.health_status = retry_policy.health_after(error_class)
    window_start = account.failure_window_start
    if window_start is None or window_start < now - timedelta(seconds=circuit.window_seconds):
        account.failure_window_start = now
        account.failure_count = 1
    else:
        account.failure_count += 1
    if account.circuit_state == CircuitState.HALF_OPEN or (
        account.circuit_state == CircuitState.CLOSED and account.failure_count >= circuit.failures
    ):
        account.circuit_state = CircuitState.OPEN
        account.circuit_opened_at = now
    provider = PROVIDER_NAMES.get(account.provider, account.provider)
    if account.health_status == Health.BROKEN and health_before != Health.BROKEN:
        notify(
            session,
            user_id=account.user_id,
            account_id=account.id,
            kind="account_broken",
            severity="error",
            message=_broken_message(error_class, account.auth_kind).format(provider=provider),
            params={
                "provider": provider,
                "error_class": error_class,
                "auth": account.auth_kind,
            },
            dedupe_key=f"account_broken:{account.id}:{now.isoformat()}",
        )
    if account.circuit_state == CircuitState.OPEN and circuit_before != CircuitState.OPEN:
        minutes = max(1, circuit.cooldown_seconds // 60)
        notify(
            session,
            user_id=account.user_id,
            account_id=account.id,
            kind="circuit_open",
            severity="warning",
            message=CIRCUIT_MESSAGE.format(
                provider=provider,
                error=error_class.replace("_", " "),
                minutes=minutes,
            ),
            params={
                "provider": provider,
                "error_class": error_class,
                "minutes": minutes,
            },
            dedupe_key=f"circuit_open:{account.id}:{now.isoformat()}",
        )
    session.flush()
    return Transition(health_before, account.health_status, circuit_before, account.circuit_state)


def notify_retries_exhausted(session: Session, *, user_id: int, job_id: str) -> int:
    """Tell the owner of a job that partly succeeded which accounts ran out of retries (a
    transient failure, so not BROKEN, and not told otherwise); once per account and job."""
    job = session.get_one(PipelineJob, job_id)
    told = 0
    for error in job.errors or []:
        if not error.get("error_class") or not transient(ErrorClass(error["error_class"])):
            continue
        account = session.get(MailAccount, error["account_id"])
        if account is None:
            continue
        provider = PROVIDER_NAMES.get(account.provider, account.provider)
        told += notify(
            session,
            user_id=user_id,
            account_id=account.id,
            job_id=job_id,
            kind="retries_exhausted",
            severity="warning",
            message=RETRIES_EXHAUSTED_MESSAGE.format(
                provider=provider, error=error["error_class"].replace("_", " ")
            ),
            params={"provider": provider, "error_class": error["error_class"]},
            dedupe_key=f"retries_exhausted:{job_id}:{account.id}",
        )
    return told


def reset(account: MailAccount, *, now: datetime | None = None) -> None:
    """The owner fixed the login: clear BROKEN and the circuit, and let the next run go ahead."""
    now = now or utcnow()
    account.health_status = Health.HEALTHY
    account.health_checked_at = now
    account.last_error_class = None
    account.last_error_message = None
    account.failure_count = 0
    account.failure_window_start = None
    account.circuit_state = CircuitState.CLOSED
    account.circuit_opened_at = None
    account.next_sync_at = now


def _broken_message(error_class: ErrorClass, auth_kind: str) -> str:
    if auth_kind == AuthKind.OAUTH2 and error_class in OAUTH2_BROKEN_MESSAGES:
        return OAUTH2_BROKEN_MESSAGES[error_class]
    return BROKEN_MESSAGES[error_class]


def notify(
    session: Session,
    *,
    user_id: int | None,
    kind: str,
    message: str,
    dedupe_key: str,
    severity: str = "warning",
    account_id: int | None = None,
    job_id: str | None = None,
    params: dict[str, Any] | None = None,
) -> bool:
    """Write a notification unless one with the same dedupe key exists (once per transition).

    `message` is English; `params` lets a page say the same in the reader's language.
    """
    exists = session.scalar(select(Notification.id).where(Notification.dedupe_key == dedupe_key))
    if exists is not None:
        return False
    try:
        with session.begin_nested():
            session.add(
                Notification(
                    user_id=user_id,
                    account_id=account_id,
                    job_id=job_id,
                    kind=kind,
                    severity=severity,
                    message=message,
                    params=params,
                    dedupe_key=dedupe_key,
                )
            )
    except IntegrityError:
        return False
    return True


def notifications(session: Session, user_id: int, *, unread_only: bool = False) -> list[Note]:
    """The user's notifications, newest first."""
    query = select(Notification).where(Notification.user_id == user_id)
    if unread_only:
        query = query.where(Notification.read_at.is_(None))
    return _notes(session, query)


def operator_alerts(session: Session, *, limit: int) -> list[Note]:
    """The alerts Alertmanager delivered (they belong to no user), newest first: what
    `mailpipe alerts` shows operators."""
    return _notes(session, select(Notification).where(Notification.user_id.is_(None)).limit(limit))


def _notes(session: Session, query: Select[Notification]) -> list[Note]:
    rows = session.scalars(query.order_by(Notification.created_at.desc(), Notification.id.desc()))
    return [
        Note(
            id=row.id,
            kind=row.kind,
            severity=row.severity,
            message=row.message,
            account_id=row.account_id,
            job_id=row.job_id,
            created_at=row.created_at,
            read=row.read_at is not None,
        )
        for row in rows
    ]


def mark_read(session: Session, user_id: int, notification_id: int | None = None) -> int:
    """Mark one (or every) notification of the user as read; others' stay untouched."""
    query = update(Notification).where(
        Notification.user_id == user_id, Notification.read_at.is_(None)
    )
    if notification_id is not None:
        query = query.where(Notification.id == notification_id)
    return rowcount(session.execute(query.values(read_at=utcnow())))


def record_success(
    session: Session, account_id: int, *, now: datetime, touched: bool | None = None
) -> Transition:
    """A successful attempt: healthy, circuit closed, failures forgotten (one UPDATE when the
    account was healthy already). The runner's last transaction makes it, so a job seen final
    already shows its accounts' health; `touched` says the caller's UPDATE made `TOUCHED`'s
    change already (and whether the account was healthy, `WAS_HEALTHY`)."""
    if touched is None:
        touched = stays_healthy(session, account_id, now=now)
    if touched:
        return Transition(Health.HEALTHY, Health.HEALTHY, CircuitState.CLOSED, CircuitState.CLOSED)
    _lock(session, account_id)
    account = session.get_one(MailAccount, account_id)
    health_before, circuit_before = account.health_status, account.circuit_state
    account.health_checked_at = now
    account.health_status = Health.HEALTHY
    account.failure_count = 0
    account.failure_window_start = None
    account.circuit_state = CircuitState.CLOSED
    account.circuit_opened_at = None
    session.flush()
    return Transition(health_before, account.health_status, circuit_before, account.circuit_state)


def stays_healthy(session: Session, account_id: int, *, now: datetime) -> bool:
    """A success on an account that was healthy changes nothing but the time: one UPDATE (the
    runner's last transaction makes it; False: `record_outcome` moves health and circuit)."""
    touched = session.execute(_STAYS_HEALTHY, {"account_id": account_id, "now": now})
    return rowcount(touched) == 1


def _lock(session: Session, account_id: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            select(MailAccount.id).where(MailAccount.id == account_id).with_for_update()
        )
