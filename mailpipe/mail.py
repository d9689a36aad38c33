"""Reading a user's stored mail with the user's key: the mail a host app shows.

Every read is the owner's: mail of another user's account is "not found", as a missing message
is. Lists come newest first (by INTERNALDATE, then UID), a page at a time; a page's last item
gives the next page's start. A change feed (new, flags changed, vanished since a cursor) is not
here yet: tombstones of vanished mail last only until the end of the sync that found them.
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
from .results import MailItem, MailMessage, MailPage
from .vocabulary import ParseStatus

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
SEEN = "\\seen"
FLAGGED = "\\flagged"


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
        query = query.where(Email.folder == folder)
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
    items = [_item(email, _fields(email, key)) for email in rows[:limit]]
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
    item = _item(email, fields)
    return MailMessage(
        **{name: getattr(item, name) for name in item.__dataclass_fields__},
        flags=email.flags.split(),
        fields=fields,
        annotations=annotations,
    )


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


def _item(email: Email, fields: dict[str, Any]) -> MailItem:
    flags = {flag.lower() for flag in email.flags.split()}
    senders = fields.get("from") or []
    sender = ""
    if senders:
        first = senders[0]
        sender = f"{first['name']} <{first['address']}>" if first.get("name") else first["address"]
    return MailItem(
        id=str(email.id),
        account_id=email.account_id,
        folder=email.folder,
        uid=email.uid,
        sender=sender,
        subject=fields.get("subject") or "",
        date=email.internal_date or email.sent_date,
        read=SEEN in flags,
        flagged=FLAGGED in flags,
        quarantined=email.status == ParseStatus.QUARANTINED,
    )
