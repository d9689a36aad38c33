"""Reading a user's stored mail with the user's key: the mail a host app shows.

Every read is the owner's: mail of another user's account is "not found", as a missing message
is. Lists come newest first (by INTERNALDATE, then UID), a page at a time; a page's last item
gives the next page's start. The change feed says what is new, changed or vanished since a
cursor, for a reader that keeps its own copy.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from .crypto import DataKey
from .errors import NotFound
from .models import Email, MailAccount
from .names import email_folder, in_folder
from .results import ChangePage, MailChange, MailItem, MailMessage, MailPage
from .vocabulary import MailChangeKind, ParseStatus

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
SEEN = "\\seen"
FLAGGED = "\\flagged"
NO_ROW = uuid.UUID(int=0)  # before every row of a change number


def list_mail(
    session: Session,
    *,
    user_id: int,
    key: DataKey,
    account_id: int | None = None,
    folder: str | None = None,
    since: datetime | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
) -> MailPage:
    """The user's mail, newest first: of one account and folder when named, received at or
    after `since`, older than the page cursor `before` (from the previous page's next_before)."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    when = func.coalesce(Email.internal_date, Email.sent_date, Email.fetched_at)
    query = (
        select(Email)
        .join(MailAccount, MailAccount.id == Email.account_id)
        .where(MailAccount.user_id == user_id, Email.vanished_at.is_(None))
    )
    if account_id is not None:
        query = query.where(Email.account_id == account_id)
    if folder is not None:
        query = query.where(in_folder(key, folder))
    if since is not None:
        query = query.where(when >= since)
    if before is not None:
        last = _owned(session, before, user_id=user_id)
        moment = last.internal_date or last.sent_date or last.fetched_at
        query = query.where(
            or_(
                when < moment,
                and_(
                    when == moment,
                    or_(Email.uid < last.uid, and_(Email.uid == last.uid, Email.id < last.id)),
                ),
            )
        )
    order = (when.desc(), Email.uid.desc(), Email.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    items = [_item(email, _fields(email, key), key) for email in rows[:limit]]
    return MailPage(mail=items, next_before=items[-1].id if len(rows) > limit else None)


def read_mail(session: Session, *, user_id: int, key: DataKey, mail_id: str) -> MailMessage:
    """One message of the user's with its parsed fields and annotations."""
    email = _owned(session, mail_id, user_id=user_id)
    fields = _fields(email, key)
    annotations = None
    if email.annotations_enc is not None:
        annotations = orjson.loads(
            key.decrypt(email.annotations_enc, table="emails", column="annotations", row=email.id)
        )
    item = _item(email, fields, key)
    return MailMessage(
        **{name: getattr(item, name) for name in item.__dataclass_fields__},
        flags=email.flags.split(),
        fields=fields,
        annotations=annotations,
    )


def mail_changes(
    session: Session,
    *,
    user_id: int,
    key: DataKey,
    cursor: str | None = None,
    limit: int = PAGE_SIZE,
) -> ChangePage:
    """What changed in the user's stored mail since `cursor` (None: since the beginning): new
    messages, flag changes and vanished ones, oldest change first, account by account.

    Each account numbers its changes (MailAccount.mail_seq), and its one sync at a time commits
    them in order, so a reader paging while a sync runs misses nothing and sees nothing twice.
    Tombstones of vanished mail are kept store.TOMBSTONE_DAYS: read the feed more often than
    that. A cursor that does not parse raises ValueError.
    """
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    seen = _parse_cursor(cursor)
    accounts = session.scalars(
        select(MailAccount.id).where(MailAccount.user_id == user_id).order_by(MailAccount.id)
    ).all()
    changes: list[MailChange] = []
    for account_id in accounts:
        if len(changes) >= limit:
            break
        seq, last = seen.get(account_id, (0, NO_ROW))
        rows = session.scalars(
            select(Email)
            .where(
                Email.account_id == account_id,
                or_(Email.seq > seq, and_(Email.seq == seq, Email.id > last)),
            )
            .order_by(Email.seq, Email.id)
            .limit(limit - len(changes))
        ).all()
        for email in rows:
            known = email.created_seq < seq or (email.created_seq == seq and email.id <= last)
            if email.vanished_at is not None:
                kind, item = MailChangeKind.VANISHED, None
            else:
                kind = MailChangeKind.FLAGS if known else MailChangeKind.NEW
                item = _item(email, _fields(email, key), key)
            changes.append(
                MailChange(
                    kind=kind,
                    mail_id=str(email.id),
                    account_id=account_id,
                    seq=email.seq,
                    mail=item,
                )
            )
        if rows:
            seen[account_id] = (rows[-1].seq, rows[-1].id)
    return ChangePage(changes=changes, cursor=_format_cursor(seen), more=len(changes) >= limit)


def _parse_cursor(cursor: str | None) -> dict[int, tuple[int, uuid.UUID]]:
    """`account.seq.row` per account, comma-separated; the row is the last one read."""
    seen: dict[int, tuple[int, uuid.UUID]] = {}
    for part in (cursor or "").split(","):
        if not part:
            continue
        try:
            account, seq, row = part.split(".")
            seen[int(account)] = (int(seq), uuid.UUID(hex=row))
        except ValueError:
            raise ValueError("not a cursor this feed gave") from None
    return seen


def _format_cursor(seen: dict[int, tuple[int, uuid.UUID]]) -> str:
    return ",".join(f"{account}.{seq}.{row.hex}" for account, (seq, row) in sorted(seen.items()))


def _owned(session: Session, mail_id: str, *, user_id: int) -> Email:
    try:
        row_id = uuid.UUID(mail_id)
    except ValueError:
        raise NotFound(f"mail {mail_id!r} not found") from None
    email = session.scalar(
        select(Email)
        .join(MailAccount, MailAccount.id == Email.account_id)
        .where(Email.id == row_id, MailAccount.user_id == user_id, Email.vanished_at.is_(None))
    )
    if email is None:
        raise NotFound(f"mail {mail_id} not found")
    return email


def _fields(email: Email, key: DataKey) -> dict[str, Any]:
    if email.parsed_enc is None:
        return {}
    document = orjson.loads(
        key.decrypt(email.parsed_enc, table="emails", column="parsed", row=email.id)
    )
    return document if isinstance(document, dict) else {}


def _item(email: Email, fields: dict[str, Any], key: DataKey) -> MailItem:
    flags = {flag.lower() for flag in email.flags.split()}
    senders = fields.get("from") or []
    sender = ""
    if senders:
        first = senders[0]
        sender = f"{first['name']} <{first['address']}>" if first.get("name") else first["address"]
    return MailItem(
        id=str(email.id),
        account_id=email.account_id,
        folder=email_folder(key, email),
        uid=email.uid,
        sender=sender,
        subject=fields.get("subject") or "",
        date=email.internal_date or email.sent_date,
        read=SEEN in flags,
        flagged=FLAGGED in flags,
        quarantined=email.status == ParseStatus.QUARANTINED,
    )
