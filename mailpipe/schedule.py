"""Which accounts are due for a background sync; safe when two schedulers run at once."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from . import grants
from .models import AccountRun, KeyGrant, MailAccount, utcnow
from .vocabulary import CircuitState, Health, RunStatus

JITTER = 0.1  # next sync lands within ±10 % of the interval, so accounts spread out
OPEN_RUN = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.RETRYING)


def claim_due_accounts(
    session: Session, *, now: datetime | None = None, rng: random.Random | None = None
) -> dict[int, list[int]]:
    """Claim every due account, by user; each claim moves the account's next sync forward.

    An account is due when enabled, not BROKEN, its circuit not open, its owner holds a live
    background grant, no run of it is queued or running, and its next sync time has come. The
    claim is one conditional UPDATE, so of two schedulers only one wins an account.
    """
    now = now or utcnow()
    rng = rng or random.Random()
    open_run = exists().where(
        AccountRun.account_id == MailAccount.id, AccountRun.status.in_(OPEN_RUN)
    )
    background = select(KeyGrant.user_id).where(
        KeyGrant.purpose == grants.PURPOSE_BACKGROUND, KeyGrant.expires_at > now
    )
    # One statement, and the transaction's first: on SQLite it takes the write lock before
    # anything is read, on PostgreSQL the row locks make a second scheduler see our claim.
    claimed_rows = session.execute(
        update(MailAccount)
        .where(
            MailAccount.enabled.is_(True),
            MailAccount.health_status != Health.BROKEN,
            MailAccount.circuit_state != CircuitState.OPEN,
            MailAccount.user_id.in_(background),
            or_(MailAccount.next_sync_at.is_(None), MailAccount.next_sync_at <= now),
            ~open_run,
        )
        .values(next_sync_at=now + timedelta(days=1))
        .returning(MailAccount.id, MailAccount.user_id, MailAccount.sync_interval_seconds)
    ).all()
    claimed: dict[int, list[int]] = defaultdict(list)
    for account_id, user_id, interval in claimed_rows:
        spread = interval * rng.uniform(1 - JITTER, 1 + JITTER)
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == account_id)
            .values(next_sync_at=now + timedelta(seconds=spread))
        )
        claimed[user_id].append(account_id)
    return dict(claimed)
