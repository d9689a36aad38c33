"""At most one sync of an account at a time, across every worker and machine."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from .db import rowcount
from .models import MailAccount, utcnow


def acquire(session: Session, account_id: int, *, owner: str, seconds: float) -> bool:
    """Take the account's lease unless someone else holds an unexpired one.

    The lease outlives the job's time limit, so it cannot lapse while a sync still runs.
    """
    now = utcnow()
    taken = session.execute(
        update(MailAccount)
        .where(
            MailAccount.id == account_id,
            or_(
                MailAccount.lease_until.is_(None),
                MailAccount.lease_until < now,
                MailAccount.lease_owner == owner,
            ),
        )
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=seconds))
    )
    return rowcount(taken) == 1


def release(session: Session, account_id: int, *, owner: str) -> None:
    """Give the lease back, but only our own."""
    session.execute(
        update(MailAccount)
        .where(MailAccount.id == account_id, MailAccount.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )
