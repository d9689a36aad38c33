"""The process phase: plug-in processors (entry-point group `mailpipe.processors`) on new mail.

A processor is a callable taking a `Mail` and returning a JSON-able annotation (or None). A
processor that raises marks that mail for reprocessing; it never loses the mail or fails the
fetch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from .crypto import DataKey
from .models import PARSED, PROCESS_DONE, PROCESS_PENDING, PROCESS_RETRY, Email

ENTRY_POINT_GROUP = "mailpipe.processors"
REPROCESS_LIMIT = 200
PROCESS_CHUNK = 100  # mails decrypted and updated per transaction
NEWSLETTER_SENDERS = ("newsletter", "news", "noreply", "no-reply", "info", "marketing")
NEWSLETTER_WORDS = ("abmelden", "unsubscribe", "newsletter abbestellen", "austragen")

logger = logging.getLogger(__name__)

Processor = Callable[["Mail"], object]


@dataclass(frozen=True)
class Mail:
    """What a processor sees: the parsed fields of one stored message."""

    id: object
    account_id: int
    folder: str
    fields: dict


@dataclass
class ProcessOutcome:
    processed: int = 0
    failed: int = 0


def load_processors() -> dict[str, Processor]:
    """Every installed processor, by entry-point name."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _process(row, account_id: int, key: DataKey, processors, outcome: ProcessOutcome) -> dict:
    """Run every processor on one mail; the row change that records what they said."""
    email_id, folder, parsed_enc = row
    fields = json.loads(key.decrypt(parsed_enc, table="emails", column="parsed", row=email_id))
    mail = Mail(id=email_id, account_id=account_id, folder=folder, fields=fields)
    annotations, failed = {}, []
    for name, processor in processors.items():
        try:
            annotations[name] = processor(mail)
        except Exception as error:  # a broken plug-in must not cost the mail
            failed.append(name)
            logger.warning("processor %s failed: %s", name, type(error).__name__)
    if failed:
        outcome.failed += 1
    else:
        outcome.processed += 1
    return {
        "id": email_id,
        "process_status": PROCESS_RETRY if failed else PROCESS_DONE,
        "annotations_enc": key.encrypt(
            json.dumps(annotations).encode(), table="emails", column="annotations", row=email_id
        ),
    }


def newsletter(mail: Mail) -> dict:
    """Built-in example: flag newsletters so the assistant can file them away."""
    senders = [a.get("address", "").lower() for a in mail.fields.get("from", [])]
    local_parts = [address.partition("@")[0] for address in senders]
    text = (mail.fields.get("text") or "").lower()
    by_sender = any(part in NEWSLETTER_SENDERS for part in local_parts)
    by_text = any(word in text for word in NEWSLETTER_WORDS)
    return {"newsletter": by_sender or by_text}


def process_new_mail(
    sessions: sessionmaker[Session],
    *,
    account_id: int,
    key: DataKey,
    email_ids: Iterable,
    processors: Mapping[str, Processor],
) -> ProcessOutcome:
    """Run the processors on new mail and on mail left pending or marked for reprocessing."""
    outcome = ProcessOutcome()
    if not processors:
        return outcome
    with sessions() as session:
        backlog = session.scalars(
            select(Email.id)
            .where(
                Email.account_id == account_id,
                Email.process_status.in_((PROCESS_PENDING, PROCESS_RETRY)),
                Email.status == PARSED,
            )
            .limit(REPROCESS_LIMIT)
        ).all()
    wanted = list(dict.fromkeys([*email_ids, *backlog]))
    for start in range(0, len(wanted), PROCESS_CHUNK):
        with sessions.begin() as session:
            rows = session.execute(
                select(Email.id, Email.folder, Email.parsed_enc).where(
                    Email.id.in_(wanted[start : start + PROCESS_CHUNK]), Email.status == PARSED
                )
            ).all()
            changes = [_process(row, account_id, key, processors, outcome) for row in rows]
            if changes:
                session.execute(update(Email), changes)
    return outcome
