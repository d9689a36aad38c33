"""At most one sync of an account at a time, and at most one watcher of it, across every
worker and machine."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import cast

from sqlalchemy import ColumnElement, Table, and_, bindparam, case, or_, select, update
from sqlalchemy.orm import Session

from . import grants
from .db import rowcount
from .models import KeyGrant, MailAccount, utcnow
from .vocabulary import CircuitState, Health

# Every account run takes and gives back a lease: its two UPDATEs are built once, on the table
# (Core: no ORM session synchronisation; no lease holder reads the lease from an account object).
_ACCOUNTS = cast(Table, MailAccount.__table__)
_ACQUIRE = (
    update(_ACCOUNTS)
    .where(
        _ACCOUNTS.c.id == bindparam("account_id"),
        or_(
            _ACCOUNTS.c.lease_until.is_(None),
            _ACCOUNTS.c.lease_until < bindparam("now"),
            _ACCOUNTS.c.lease_owner == bindparam("owner"),
        ),
    )
    .values(lease_owner=bindparam("owner"), lease_until=bindparam("until"))
)
_OURS = _ACCOUNTS.c.lease_owner == bindparam("owner")
_RELEASE = (
    update(_ACCOUNTS)
    .where(_ACCOUNTS.c.id == bindparam("account_id"), _OURS)
    .values(lease_owner=None, lease_until=None)
)
# `release` as SET values, for an UPDATE of the account that does more (the run's last one):
# the lease goes back when the bound `owner` holds it, and stays as it is otherwise.
RELEASED: dict[str, ColumnElement[object]] = {
    "lease_owner": case((_OURS, None), else_=_ACCOUNTS.c.lease_owner),
    "lease_until": case((_OURS, None), else_=_ACCOUNTS.c.lease_until),
}


def acquire(session: Session, account_id: int, *, owner: str, seconds: float) -> bool:
    """Take the account's lease unless someone else holds an unexpired one.

    The lease outlives the job's time limit, so it cannot lapse while a sync still runs.
    """
    now = utcnow()
    taken = session.execute(
        _ACQUIRE,
        {
            "account_id": account_id,
            "now": now,
            "owner": owner,
            "until": now + timedelta(seconds=seconds),
        },
    )
    return rowcount(taken) == 1


def release(session: Session, account_id: int, *, owner: str) -> None:
    """Give the lease back, but only our own."""
    session.execute(_RELEASE, {"account_id": account_id, "owner": owner})


def watchable() -> ColumnElement[bool]:
    """Accounts a watcher may hold an IDLE connection for: enabled, push on, not BROKEN, circuit
    not open, and an owner with a live background grant (whose end ends the watching)."""
    background = select(KeyGrant.user_id).where(
        KeyGrant.purpose == grants.PURPOSE_BACKGROUND, KeyGrant.expires_at > utcnow()
    )
    return and_(
        MailAccount.enabled.is_(True),
        MailAccount.push_enabled.is_(True),
        MailAccount.health_status != Health.BROKEN,
        MailAccount.circuit_state != CircuitState.OPEN,
        MailAccount.user_id.in_(background),
    )


def claim_watches(session: Session, *, owner: str, seconds: float, limit: int) -> set[int]:
    """Renew this watcher's leases on accounts it may still watch, take free or lapsed ones up
    to `limit` in all, and give back the rest; returns the accounts it holds now.

    Each step is one conditional UPDATE, so of two watchers only one gets an account, and one
    that stopped renewing (killed) loses its accounts once its leases lapse.
    """
    now = utcnow()
    until = now + timedelta(seconds=seconds)
    mine = MailAccount.watch_owner == owner
    session.execute(
        update(MailAccount).where(mine, ~watchable()).values(watch_owner=None, watch_until=None)
    )
    held = set(
        session.scalars(
            update(MailAccount)
            .where(mine, watchable())
            .values(watch_until=until)
            .returning(MailAccount.id)
        )
    )
    room = limit - len(held)
    if room > 0:
        free = or_(MailAccount.watch_owner.is_(None), MailAccount.watch_until < now)
        candidates = (
            select(MailAccount.id).where(free, watchable()).order_by(MailAccount.id).limit(room)
        )
        held |= set(
            session.scalars(
                update(MailAccount)
                .where(MailAccount.id.in_(candidates), free)
                .values(watch_owner=owner, watch_until=until)
                .returning(MailAccount.id)
            )
        )
    return held


def release_watches(
    session: Session, *, owner: str, account_ids: Iterable[int] | None = None
) -> None:
    """Give back this watcher's leases (all of them, or those named), so another may take them."""
    conditions = [MailAccount.watch_owner == owner]
    if account_ids is not None:
        conditions.append(MailAccount.id.in_(list(account_ids)))
    session.execute(
        update(MailAccount).where(*conditions).values(watch_owner=None, watch_until=None)
    )
