"""Saving mail idempotently: each batch and the folder's high-water mark commit together."""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

import orjson
from sqlalchemy import Table, bindparam, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from . import names
from .crypto import DataKey
from .db import rowcount
from .fetch import FetchedMessage
from .models import Email, FolderState, MailAccount, utcnow
from .parse import ParsedMessage
from .processors import Annotation
from .vocabulary import ParseStatus, ProcessStatus

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

EMAILS = cast(Table, Email.__table__)
FOLDER_STATE = cast(Table, FolderState.__table__)
EMAIL_KEY = ["account_id", "folder_hash", "uidvalidity", "uid"]
STATE_KEY = ["account_id", "folder_hash"]
RECENT = "\\recent"
DELETE_CHUNK = 1000
OUT_OF_BAND_PROTOCOL = 5  # the pickle protocol that hands buffers over uncopied
TOMBSTONE_DAYS = 7  # how long the change feed still says that a message vanished


@dataclass
class FolderPosition:
    """How far a folder is stored: its UIDVALIDITY, the highest UID taken (the high-water mark),
    UIDNEXT and HIGHESTMODSEQ seen, how many messages the server held up to the high-water mark,
    and the backfill still due below it: UIDs above `backfill_floor` up to `backfill_uid`
    (0: none), taken newest first by later runs."""

    uidvalidity: int
    last_uid: int
    uidnext: int
    highestmodseq: int = 0
    messages: int = 0
    backfill_uid: int = 0
    backfill_floor: int = 0
    role: str | None = None  # what the folder is for (vocabulary.FolderRole), when known


@dataclass
class StateChanges:
    """What a flag sync found on the server for the stored part of one folder.

    `flags` holds the current flags of the messages the server listed; `vanished` the UIDs it
    said are gone; `present`, when the server listed every UID up to the high-water mark, that
    set (so whatever is stored and not in it has vanished).
    """

    flags: dict[int, str]
    vanished: set[int]
    present: set[int] | None = None


@dataclass
class ChangeOutcome:
    flags_changed: int = 0
    vanished: int = 0
    vanished_ids: list[uuid.UUID] = field(default_factory=list)  # the rows made tombstones


@dataclass
class WriteOutcome:
    saved: int = 0
    duplicates: int = 0
    processed: int = 0  # stored with every processor's annotation


@dataclass(frozen=True, slots=True)
class Clear:
    """A row's mail in clear, until `BatchWriter.seal` hashes and encrypts it: kept apart from
    the row, so it cannot reach the database unsealed."""

    raw: bytes | memoryview

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        """Through a pipe (pickle protocol 5) the mail crosses uncopied, out of band, and
        arrives as a read-only memoryview."""
        raw = pickle.PickleBuffer(self.raw) if int(protocol) >= OUT_OF_BAND_PROTOCOL else self.raw
        return (Clear, (raw,))


def folder_states(session: Session, account_id: int, key: DataKey) -> dict[str, FolderPosition]:
    """Every folder's stored position for one account, by name, in one query; rows from before
    migration 0013 are converted first (`names.convert_account`, in the caller's transaction:
    a sync commits it before it writes, so its new rows never meet a clear one)."""
    names.convert_account(session, account_id=account_id, key=key)
    rows = session.execute(
        select(
            FolderState.folder,
            FolderState.folder_hash,
            FolderState.folder_enc,
            FolderState.uidvalidity,
            FolderState.last_uid,
            FolderState.uidnext,
            FolderState.highestmodseq,
            FolderState.messages,
            FolderState.backfill_uid,
            FolderState.backfill_floor,
            FolderState.role,
        ).where(FolderState.account_id == account_id)
    )
    return {
        names.state_folder(
            key, account_id=account_id, clear=row[0], hashed=row[1], sealed=row[2]
        ): FolderPosition(*row[3:])
        for row in rows
    }


def flag_text(flags: Sequence[bytes | str]) -> str:
    """Flags as stored: space-separated, without \\Recent (which only says which session saw
    the message first, and would look like a change whenever another session looked)."""
    return " ".join(text for text in map(_text, flags) if text.lower() != RECENT)


def apply_state_changes(
    session: Session,
    *,
    account_id: int,
    folder_hash: bytes,
    uidvalidity: int,
    changes: StateChanges,
) -> ChangeOutcome:
    """Update stored flags that differ and mark vanished mail (a tombstone until the account's
    sync ends), in the caller's transaction, which also advances the folder's position.

    Rows are found by the folder's unique key; tombstones are skipped here rather than in SQL,
    where `vanished_at IS NULL` would lead SQLite's planner to the account's vanished index.
    """
    outcome = ChangeOutcome()
    query = select(Email.id, Email.uid, Email.flags, Email.vanished_at).where(
        Email.account_id == account_id,
        Email.folder_hash == folder_hash,
        Email.uidvalidity == uidvalidity,
    )
    if changes.present is None:
        wanted = sorted(set(changes.flags) | changes.vanished)
        if not wanted:
            return outcome
        query = query.where(Email.uid.in_(wanted))
    updates: list[dict[str, Any]] = []
    for row_id, uid, stored, vanished_at in session.execute(query):
        if vanished_at is not None:
            continue
        if uid in changes.vanished or (changes.present is not None and uid not in changes.present):
            outcome.vanished_ids.append(row_id)
            continue
        current = changes.flags.get(uid)
        if current is not None and set(current.split()) != set(stored.split()):
            updates.append({"row_id": row_id, "new_flags": current})
    if not updates and not outcome.vanished_ids:
        return outcome
    seq = next_seq(session, account_id)
    if updates:
        session.execute(
            update(EMAILS)
            .where(EMAILS.c.id == bindparam("row_id"))
            .values(flags=bindparam("new_flags"), seq=seq)
            .execution_options(synchronize_session=False),
            updates,
        )
        outcome.flags_changed = len(updates)
    for chunk in _chunks(outcome.vanished_ids):
        session.execute(
            update(Email)
            .where(Email.id.in_(chunk))
            .values(vanished_at=utcnow(), seq=seq)
            .execution_options(synchronize_session=False)
        )
    outcome.vanished = len(outcome.vanished_ids)
    return outcome


def _chunks(ids: list[uuid.UUID]) -> Iterator[list[uuid.UUID]]:
    for start in range(0, len(ids), DELETE_CHUNK):
        yield ids[start : start + DELETE_CHUNK]


def next_seq(session: Session, account_id: int) -> int:
    """The account's next change number, taken in the transaction that makes the change (one
    sync per account at a time, so its changes commit in the order of their numbers)."""
    return session.execute(
        update(MailAccount)
        .where(MailAccount.id == account_id)
        .values(mail_seq=MailAccount.mail_seq + 1)
        .returning(MailAccount.mail_seq)
    ).scalar_one()


def purge_vanished(
    sessions: sessionmaker[Session], *, account_id: int, ids: Sequence[uuid.UUID]
) -> None:
    """Once an account's sync has seen every folder (so a moved message has found its
    processing results), drop the content and annotations of the mail that vanished in it, and
    the account's tombstones older than TOMBSTONE_DAYS, which change feed readers have had time
    to see."""
    with sessions.begin() as session:
        for chunk in _chunks(list(ids)):
            session.execute(
                update(Email)
                .where(Email.id.in_(chunk))
                .values(raw_enc=b"", parsed_enc=None, annotations_enc=None)
                .execution_options(synchronize_session=False)
            )
        session.execute(
            delete(Email)
            .where(
                Email.account_id == account_id,
                Email.vanished_at < utcnow() - timedelta(days=TOMBSTONE_DAYS),
            )
            .execution_options(synchronize_session=False)
        )


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """INSERT that supports ON CONFLICT on both SQLite and PostgreSQL (each dialect's module
    loaded when its database is used: PostgreSQL's costs a SQLite command's start ~0.1 s)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


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
        self.folder_hash = names.folder_hash(key, folder)
        self.dedupe_by_content = dedupe_by_content
        self._state_name = names.state_columns(key, account_id=account_id, folder=folder)

    def rows(
        self,
        uidvalidity: int,
        messages: Sequence[FetchedMessage],
        parsed: Sequence[ParsedMessage],
        *,
        ids: Sequence[uuid.UUID],
        annotations: Sequence[Annotation | None] | None = None,
    ) -> tuple[list[dict[str, Any]], list[Clear]]:
        """A batch's rows, sealed but for their mail, and the mail in clear: `seal` hashes and
        encrypts it, the two passes over every byte (in this process, or in a store process
        on the other core)."""
        annotations = annotations or [None] * len(messages)
        rows = [
            self._row(uidvalidity, *item)
            for item in zip(ids, messages, parsed, annotations, strict=True)
        ]
        return rows, [Clear(message.body) for message in messages]

    def seal(self, rows: list[dict[str, Any]], clear: Sequence[Clear]) -> list[dict[str, Any]]:
        """The rows with their mail's keyed hash and ciphertext (bound to each row)."""
        for row, mail in zip(rows, clear, strict=True):
            row["content_hash"] = self.key.content_hash(mail.raw)
            row["raw_enc"] = self.key.encrypt(mail.raw, table="emails", column="raw", row=row["id"])
        return rows

    def write(self, position: FolderPosition, rows: list[dict[str, Any]]) -> WriteOutcome:
        """Store a batch's rows, with what processors said of them, and advance the high-water
        mark in one transaction."""
        outcome = WriteOutcome()
        with self.sessions.begin() as session:
            if rows:
                seq = next_seq(session, self.account_id)
                for row in rows:
                    row["seq"] = row["created_seq"] = seq
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

    def known_annotations(self, hashes: Sequence[bytes]) -> dict[bytes, Annotation]:
        """What processors said of mail with this content already held in any of the account's
        folders (a move, or the same mail twice), opened for storing with a new row."""
        with self.sessions() as session:
            rows = session.execute(
                select(Email.content_hash, Email.id, Email.annotations_enc).where(
                    Email.account_id == self.account_id,
                    Email.content_hash.in_(list(set(hashes))),
                    Email.process_status == ProcessStatus.DONE,
                    Email.annotations_enc.is_not(None),
                )
            ).all()
        known: dict[bytes, Annotation] = {}
        for content_hash, row_id, sealed in rows:
            assert sealed is not None  # asked for above
            document = self.key.decrypt(sealed, table="emails", column="annotations", row=row_id)
            known[content_hash] = Annotation(status=ProcessStatus.DONE, document=document)
        return known

    def finish(self, position: FolderPosition) -> None:
        """Record the folder's final position for this run (UIDNEXT included when complete)."""
        with self.sessions.begin() as session:
            self._save_position(session, position)

    def apply(
        self, position: FolderPosition, changes: StateChanges, *, stored: FolderPosition
    ) -> ChangeOutcome:
        """Flag changes and vanished mail, and the position with its HIGHESTMODSEQ, together
        (nothing is written when nothing changed and the position is the one `stored`)."""
        with self.sessions.begin() as session:
            outcome = apply_state_changes(
                session,
                account_id=self.account_id,
                folder_hash=self.folder_hash,
                uidvalidity=position.uidvalidity,
                changes=changes,
            )
            if outcome.flags_changed or outcome.vanished or position != stored:
                self._save_position(session, position)
        return outcome

    def _row(
        self,
        uidvalidity: int,
        row_id: uuid.UUID,
        message: FetchedMessage,
        parsed: ParsedMessage,
        annotation: Annotation | None,
    ) -> dict[str, Any]:
        document: dict[str, Any] | None
        if parsed.quarantined:
            document = {"quarantine_reason": parsed.quarantine_reason, "detail": parsed.detail}
        else:
            document = parsed.fields
        return {
            "id": row_id,
            "account_id": self.account_id,
            "uidvalidity": uidvalidity,
            "uid": message.uid,
            **names.email_columns(
                self.key,
                row_id=row_id,
                folder=self.folder,
                message_id=parsed.message_id,
                hashed=self.folder_hash,
            ),
            "internal_date": message.internal_date,
            "sent_date": parsed.sent_date,
            "flags": flag_text(message.flags),
            "size": len(message.body),
            "parsed_enc": self.key.encrypt(
                orjson.dumps(document), table="emails", column="parsed", row=row_id
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
        existing = {
            content_hash: email_id
            for content_hash, email_id, vanished_at in session.execute(
                select(Email.content_hash, Email.id, Email.vanished_at).where(
                    Email.account_id == self.account_id,
                    Email.folder_hash == self.folder_hash,
                    Email.uidvalidity != rows[0]["uidvalidity"],
                    Email.content_hash.in_([row["content_hash"] for row in rows]),
                )
            )
            if vanished_at is None
        }
        fresh = []
        for row in rows:
            email_id = existing.pop(row["content_hash"], None)
            if email_id is None:
                fresh.append(row)
                continue
            session.execute(
                update(Email)
                .where(Email.id == email_id)
                .values(
                    uidvalidity=row["uidvalidity"],
                    uid=row["uid"],
                    flags=row["flags"],
                    seq=row["seq"],
                )
            )
            outcome.duplicates += 1
        return fresh

    def _save_position(self, session: Session, position: FolderPosition) -> None:
        values = {
            **self._state_name,
            "uidvalidity": position.uidvalidity,
            "last_uid": position.last_uid,
            "uidnext": position.uidnext,
            "highestmodseq": position.highestmodseq,
            "messages": position.messages,
            "backfill_uid": position.backfill_uid,
            "backfill_floor": position.backfill_floor,
            "role": position.role,
            "updated_at": utcnow(),
        }
        statement = dialect_insert(session, FOLDER_STATE).values(
            account_id=self.account_id, **values
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=STATE_KEY,
                set_={k: statement.excluded[k] for k in values if k not in self._state_name},
            )
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
