"""Saving mail idempotently: each batch and the folder's high-water mark commit together."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from sqlalchemy import Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from .crypto import DataKey
from .db import rowcount
from .fetch import FetchedMessage
from .models import Email, FolderState, utcnow
from .parse import ParsedMessage
from .processors import Annotation
from .vocabulary import ParseStatus, ProcessStatus

EMAILS = cast(Table, Email.__table__)
FOLDER_STATE = cast(Table, FolderState.__table__)
EMAIL_KEY = ["account_id", "folder", "uidvalidity", "uid"]


@dataclass
class FolderPosition:
    """How far a folder is stored: its UIDVALIDITY, the highest UID taken, and UIDNEXT seen."""

    uidvalidity: int
    last_uid: int
    uidnext: int


@dataclass
class WriteOutcome:
    saved: int = 0
    duplicates: int = 0
    processed: int = 0  # stored with every processor's annotation


def folder_states(session: Session, account_id: int) -> dict[str, FolderPosition]:
    """Every folder's stored position for one account, in one query."""
    rows = session.execute(
        select(
            FolderState.folder, FolderState.uidvalidity, FolderState.last_uid, FolderState.uidnext
        ).where(FolderState.account_id == account_id)
    )
    return {
        folder: FolderPosition(uidvalidity=v, last_uid=last, uidnext=nxt)
        for folder, v, last, nxt in rows
    }


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """INSERT that supports ON CONFLICT on both SQLite and PostgreSQL."""
    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(table)


class BatchWriter:
    """Writes the batches of one folder for one account, each in its own transaction."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        account_id: int,
        key: DataKey,
        folder: str,
        dedupe_by_content: bool = False,
    ) -> None:
        self.sessions = sessions
        self.account_id = account_id
        self.key = key
        self.folder = folder
        self.dedupe_by_content = dedupe_by_content

    def write(
        self,
        position: FolderPosition,
        messages: Sequence[FetchedMessage],
        parsed: Sequence[ParsedMessage],
        *,
        ids: Sequence[uuid.UUID],
        annotations: Sequence[Annotation | None] | None = None,
    ) -> WriteOutcome:
        """Store a batch under the row ids given, with what processors said of it, and advance
        the high-water mark in one transaction."""
        annotations = annotations or [None] * len(messages)
        rows = [
            self._row(position.uidvalidity, *item)
            for item in zip(ids, messages, parsed, annotations, strict=True)
        ]
        outcome = WriteOutcome()
        with self.sessions.begin() as session:
            if self.dedupe_by_content and rows:
                rows = self._rekey_known_content(session, rows, outcome)
            if rows:
                # executemany without RETURNING: one short statement the driver prepares once,
                # not one long multi-row statement to build and parse per batch
                statement = (
                    dialect_insert(session, EMAILS)
                    .on_conflict_do_nothing(index_elements=EMAIL_KEY)
                    .execution_options(preserve_rowcount=True)
                )
                outcome.saved = rowcount(session.execute(statement, rows))
                outcome.duplicates += len(rows) - outcome.saved
                outcome.processed = self._processed(session, rows, outcome)
            self._save_position(session, position)
        return outcome

    def finish(self, position: FolderPosition) -> None:
        """Record the folder's final position for this run (UIDNEXT included when complete)."""
        with self.sessions.begin() as session:
            self._save_position(session, position)

    def _row(
        self,
        uidvalidity: int,
        row_id: uuid.UUID,
        message: FetchedMessage,
        parsed: ParsedMessage,
        annotation: Annotation | None,
    ) -> dict[str, Any]:
        raw = message.body
        document: dict[str, Any] | None
        if parsed.quarantined:
            document = {"quarantine_reason": parsed.quarantine_reason, "detail": parsed.detail}
        else:
            document = parsed.fields
        return {
            "id": row_id,
            "account_id": self.account_id,
            "folder": self.folder,
            "uidvalidity": uidvalidity,
            "uid": message.uid,
            "message_id": parsed.message_id,
            "internal_date": message.internal_date,
            "sent_date": parsed.sent_date,
            "flags": " ".join(_text(flag) for flag in message.flags),
            "size": len(raw),
            "content_hash": self.key.content_hash(raw),
            "raw_enc": self.key.encrypt(raw, table="emails", column="raw", row=row_id),
            "parsed_enc": self.key.encrypt(
                orjson.dumps(document),
                table="emails",
                column="parsed",
                row=row_id,
            ),
            "status": ParseStatus.QUARANTINED if parsed.quarantined else ParseStatus.PARSED,
            "quarantine_reason": parsed.quarantine_reason,
            "process_status": annotation.status if annotation else ProcessStatus.PENDING,
            "annotations_enc": self.key.encrypt(
                annotation.document, table="emails", column="annotations", row=row_id
            )
            if annotation
            else None,
            "fetched_at": utcnow(),
        }

    @staticmethod
    def _processed(session: Session, rows: list[dict[str, Any]], outcome: WriteOutcome) -> int:
        """How many of the stored rows every processor handled (duplicates were not stored)."""
        if not outcome.duplicates:
            return sum(row["process_status"] == ProcessStatus.DONE for row in rows)
        return session.execute(
            select(func.count()).where(
                Email.id.in_([row["id"] for row in rows]),
                Email.process_status == ProcessStatus.DONE,
            )
        ).scalar_one()

    def _rekey_known_content(
        self, session: Session, rows: list[dict[str, Any]], outcome: WriteOutcome
    ) -> list[dict[str, Any]]:
        """After a UIDVALIDITY change, move mail we already hold to its new UID, not copy it."""
        existing = dict(
            session.execute(
                select(Email.content_hash, Email.id).where(
                    Email.account_id == self.account_id,
                    Email.folder == self.folder,
                    Email.uidvalidity != rows[0]["uidvalidity"],
                    Email.content_hash.in_([row["content_hash"] for row in rows]),
                )
            ).all()
        )
        fresh = []
        for row in rows:
            email_id = existing.pop(row["content_hash"], None)
            if email_id is None:
                fresh.append(row)
                continue
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(uidvalidity=row["uidvalidity"], uid=row["uid"], flags=row["flags"])
            )
            outcome.duplicates += 1
        return fresh

    def _save_position(self, session: Session, position: FolderPosition) -> None:
        values = {
            "account_id": self.account_id,
            "folder": self.folder,
            "uidvalidity": position.uidvalidity,
            "last_uid": position.last_uid,
            "uidnext": position.uidnext,
            "updated_at": utcnow(),
        }
        statement = dialect_insert(session, FOLDER_STATE).values(values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["account_id", "folder"],
                set_={
                    k: statement.excluded[k] for k in values if k not in ("account_id", "folder")
                },
            )
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
