"""The process phase: plug-in processors (entry-point group `mailpipe.processors`) on new mail.

A processor is a callable taking a `Mail` and returning a JSON-able annotation (or None). New
mail is processed as each batch is stored: the annotations go into the database with the mail,
in the same transaction, so no mail is read back, decrypted again or updated row by row. A
processor that raises (or returns what JSON cannot hold) marks that mail for reprocessing; it
never loses the mail or fails the fetch. Mail left pending or marked for reprocessing is taken
up again after a later sync (`process_backlog`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.orm import Session, sessionmaker

from .crypto import DataKey
from .models import Email
from .names import EMAILS, open_folder
from .vocabulary import ParseStatus, ProcessStatus

ENTRY_POINT_GROUP = "mailpipe.processors"
REPROCESS_LIMIT = 200
PROCESS_CHUNK = 100  # mails decrypted and updated per transaction
# Every account run with processors looks for mail left pending, so this is built once.
_BACKLOG = (
    select(EMAILS.c.id)
    .where(
        EMAILS.c.account_id == bindparam("account_id"),
        EMAILS.c.process_status.in_((ProcessStatus.PENDING, ProcessStatus.RETRY)),
        EMAILS.c.status == ParseStatus.PARSED,
        EMAILS.c.fetched_at < bindparam("stored_before"),
        EMAILS.c.vanished_at.is_(None),
    )
    .limit(REPROCESS_LIMIT)
)
NEWSLETTER_SENDERS = ("newsletter", "news", "noreply", "no-reply", "info", "marketing")
NEWSLETTER_WORDS = ("abmelden", "unsubscribe", "newsletter abbestellen", "austragen")

logger = logging.getLogger(__name__)

Processor = Callable[["Mail"], object]


@dataclass(frozen=True)
class Mail:
    """What a processor sees: the parsed fields of one message (read-only)."""

    id: object
    account_id: int
    folder: str
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Annotation:
    """What the processors said of one mail, as stored JSON, and whether all of them managed."""

    status: str
    document: bytes


@dataclass
class ProcessOutcome:
    processed: int = 0
    failed: int = 0


def load_processors() -> dict[str, Processor]:
    """Every installed processor, by entry-point name."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def annotate(mail: Mail, processors: Mapping[str, Processor]) -> Annotation:
    """Run every processor on one mail; a processor that fails is named in the log only."""
    annotations: dict[str, object] = {}
    failed: list[str] = []
    for name, processor in processors.items():
        try:
            value = processor(mail)
            json.dumps(value)
        except Exception as error:  # a broken plug-in must not cost the mail
            failed.append(name)
            logger.warning("processor %s failed: %s", name, type(error).__name__)
        else:
            annotations[name] = value
    return Annotation(
        ProcessStatus.RETRY if failed else ProcessStatus.DONE, json.dumps(annotations).encode()
    )


def annotate_batch(
    processors: Mapping[str, Processor],
    *,
    account_id: int,
    folder: str,
    ids: Sequence[uuid.UUID],
    fields: Sequence[dict[str, Any] | None],
) -> list[Annotation | None]:
    """Annotations for a batch about to be stored; None where a mail was quarantined."""
    return [
        None
        if document is None
        else annotate(Mail(email_id, account_id, folder, MappingProxyType(document)), processors)
        for email_id, document in zip(ids, fields, strict=True)
    ]


def _reprocess(
    row: Row[uuid.UUID, str | None, bytes | None, bytes | None],
    account_id: int,
    key: DataKey,
    processors: Mapping[str, Processor],
    outcome: ProcessOutcome,
) -> dict[str, Any]:
    """Run every processor on one stored mail again; the row change that records the result."""
    email_id, clear, sealed, parsed_enc = row
    assert parsed_enc is not None  # stored with every parsed mail (store.BatchWriter)
    folder = open_folder(key, row_id=email_id, clear=clear, sealed=sealed)
    fields = json.loads(key.decrypt(parsed_enc, table="emails", column="parsed", row=email_id))
    annotation = annotate(Mail(email_id, account_id, folder, MappingProxyType(fields)), processors)
    if annotation.status == ProcessStatus.DONE:
        outcome.processed += 1
    else:
        outcome.failed += 1
    return {
        "id": email_id,
        "process_status": annotation.status,
        "annotations_enc": key.encrypt(
            annotation.document, table="emails", column="annotations", row=email_id
        ),
    }


def newsletter(mail: Mail) -> dict[str, bool]:
    """Built-in example: flag newsletters so the assistant can file them away."""
    senders = [a.get("address", "").lower() for a in mail.fields.get("from", [])]
    local_parts = [address.partition("@")[0] for address in senders]
    text = (mail.fields.get("text") or "").lower()
    by_sender = any(part in NEWSLETTER_SENDERS for part in local_parts)
    by_text = any(word in text for word in NEWSLETTER_WORDS)
    return {"newsletter": by_sender or by_text}


def process_backlog(
    sessions: sessionmaker[Session],
    *,
    account_id: int,
    key: DataKey,
    processors: Mapping[str, Processor],
    stored_before: datetime,
) -> ProcessOutcome:
    """Run the processors on mail stored before `stored_before` (not by this run, whose new
    mail they have just seen) that was left pending or marked for reprocessing."""
    outcome = ProcessOutcome()
    if not processors:
        return outcome
    with sessions() as session:
        # every run makes this one read: autocommit spares it a transaction's BEGIN and ROLLBACK
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        wanted = session.scalars(
            _BACKLOG, {"account_id": account_id, "stored_before": stored_before}
        ).all()
    for start in range(0, len(wanted), PROCESS_CHUNK):
        with sessions.begin() as session:
            rows = session.execute(
                select(Email.id, Email.folder, Email.folder_enc, Email.parsed_enc).where(
                    Email.id.in_(wanted[start : start + PROCESS_CHUNK])
                )
            ).all()
            changes = [_reprocess(row, account_id, key, processors, outcome) for row in rows]
            if changes:
                session.execute(update(Email), changes)
    return outcome
