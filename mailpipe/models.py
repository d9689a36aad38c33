"""The tables: who owns which accounts, what each folder has given us, and the mail itself."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .vocabulary import (
    AuthKind,
    CircuitState,
    DiagnosisStatus,
    Health,
    JobStatus,
    ProcessStatus,
    RunStatus,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class UtcDateTime(TypeDecorator[datetime]):
    """An instant in UTC with its offset, written and read the same on SQLite (which keeps no
    offset) and PostgreSQL; a time without an offset names no instant and is refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"{value!r} has no offset: say which instant it is (e.g. UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:  # SQLite: stored in UTC above, handed back without offset
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def iso(moment: datetime | None) -> str | None:
    """An instant as it leaves the core: ISO 8601 with its offset (+00:00), or None."""
    return moment.isoformat() if moment is not None else None


class User(Base):
    """A person whose data key only their password unlocks."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kdf: Mapped[dict[str, Any]] = mapped_column(JSON)
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary)
    # the wrap's form (crypto.LEGACY_WRAP, USER_WRAP): rows from before 0014 are re-wrapped at login
    key_wrap: Mapped[int] = mapped_column(Integer, server_default="1")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class MailAccount(Base):
    """One IMAP account; host, login and secret are encrypted under the owner's data key."""

    __tablename__ = "mail_accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(20), default="other")
    credentials_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # how the account logs in (not secret): a refused login needs different advice for each
    auth_kind: Mapped[str] = mapped_column(
        String(20), default=AuthKind.PASSWORD, server_default=AuthKind.PASSWORD.value
    )
    # the folders the owner asked to sync, encrypted (accounts.account_folders); `folders`
    # holds them in clear only in rows from before 0016, until the owner's key converts them
    folders: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    folders_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    health_status: Mapped[str] = mapped_column(String(20), default=Health.HEALTHY)
    health_checked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_fetch_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_success_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error_class: Mapped[str | None] = mapped_column(String(40))
    last_error_message: Mapped[str | None] = mapped_column(String(500))
    sync_interval_seconds: Mapped[int] = mapped_column(Integer, default=300, server_default="300")
    # the account's window ("sync since"): mail the server received earlier is never fetched
    sync_since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    next_sync_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # push: whether a watcher keeps an IDLE connection (off: polled only), and which one does
    push_enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    watch_owner: Mapped[str | None] = mapped_column(String(64))
    watch_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    circuit_state: Mapped[str] = mapped_column(
        String(20), default=CircuitState.CLOSED, server_default=CircuitState.CLOSED.value
    )
    circuit_opened_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    failure_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failure_window_start: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the number of the account's last change to its stored mail (the change feed's clock)
    mail_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class FolderState(Base):
    """Where incremental sync of one folder stands: UIDVALIDITY, highest UID stored, UIDNEXT,
    HIGHESTMODSEQ, how many messages the server held up to that UID, and the backfill still due
    below it (newest first: UIDs above `backfill_floor` up to `backfill_uid`)."""

    __tablename__ = "folder_state"
    __table_args__ = (
        UniqueConstraint("account_id", "folder_hash", name="uq_folder_state_folder_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("mail_accounts.id", ondelete="CASCADE"))
    # the folder's name as a keyed hash (lookups) and encrypted (reading), see mailpipe.names;
    # `folder` holds it in clear only in rows from before 0013, until the owner's key converts them
    folder: Mapped[str | None] = mapped_column(String(1000))
    folder_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    folder_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=0)
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    messages: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    backfill_uid: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    backfill_floor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # vocabulary.FolderRole, when known: one of a few fixed words, not secret
    role: Mapped[str | None] = mapped_column(String(20))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Email(Base):
    """One stored message; raw bytes and parsed fields are encrypted, bound to this row's id."""

    __tablename__ = "emails"
    __table_args__ = (
        UniqueConstraint(
            "account_id", "folder_hash", "uidvalidity", "uid", name="uq_emails_folder_uid"
        ),
        Index("ix_emails_content_hash", "account_id", "content_hash"),
        Index("ix_emails_message_id_hash", "account_id", "message_id_hash"),
        Index("ix_emails_account_seq", "account_id", "seq"),
        Index("ix_emails_account_vanished", "account_id", "vanished_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    account_id: Mapped[int] = mapped_column(ForeignKey("mail_accounts.id", ondelete="CASCADE"))
    # folder name and Message-ID as keyed hashes (finding, uniqueness, duplicates) and encrypted
    # (reading), see mailpipe.names; `folder` and `message_id` hold them in clear only in rows
    # from before 0013, until the owner's key converts them
    folder: Mapped[str | None] = mapped_column(String(1000))
    folder_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    folder_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(String(1000))
    message_id_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    message_id_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    internal_date: Mapped[datetime | None] = mapped_column(UtcDateTime())
    sent_date: Mapped[datetime | None] = mapped_column(UtcDateTime())
    flags: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    raw_enc: Mapped[bytes] = mapped_column(LargeBinary)
    parsed_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(20))
    quarantine_reason: Mapped[str | None] = mapped_column(String(200))
    process_status: Mapped[str] = mapped_column(
        String(20), default=ProcessStatus.PENDING, server_default=ProcessStatus.PENDING.value
    )
    annotations_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    fetched_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # set when the server no longer holds the message here (a tombstone only the change feed
    # reads): its content and annotations are kept until the end of the account's sync, so mail
    # moved to another folder keeps its processing results, then dropped; the row goes after
    # store.TOMBSTONE_DAYS
    vanished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the account's change numbers (MailAccount.mail_seq) when the row was stored and when it
    # last changed (stored, flags, re-keyed, vanished): what the change feed reads
    created_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class PipelineJob(Base):
    """One fetch requested by a user or the scheduler, from enqueue to a final status."""

    __tablename__ = "pipeline_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.PENDING)
    grant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), index=True)
    emails_fetched: Mapped[int] = mapped_column(Integer, default=0)
    emails_processed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    # runs not yet ended; the run that takes it to 0 finalises the job
    runs_open: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AccountRun(Base):
    """One account's part of a job: every attempt, its phases, counts and error class."""

    __tablename__ = "account_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "account_id", name="uq_account_runs_job_account"),
        Index("ix_account_runs_account_status", "account_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("pipeline_jobs.id", ondelete="CASCADE"))
    account_id: Mapped[int] = mapped_column(ForeignKey("mail_accounts.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), default=RunStatus.PENDING)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    phases: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    profile: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fetched: Mapped[int] = mapped_column(Integer, default=0)
    saved: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    quarantined: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    duration: Mapped[float | None] = mapped_column(Float)
    error_class: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(String(500))


class Notification(Base):
    """An in-app message for a user (or, without a user, for operators), in words to act on."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_user_read", "user_id", "read_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE")
    )
    job_id: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(40))
    severity: Mapped[str] = mapped_column(String(20), default="warning")
    message: Mapped[str] = mapped_column(String(1000))  # in English, as operators and logs read it
    # what the kind needs to be said in another language (provider, error classes, minutes)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    read_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class KeyFile(Base):
    """A user's data key wrapped under a random key kept in a 0600 file on one machine, so
    one-shot commands there unlock it without a password; the database alone unlocks nothing."""

    __tablename__ = "key_files"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the file's name
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class KeyGrant(Base):
    """A user's data key sealed to the workers' public key, usable until `expires_at`."""

    __tablename__ = "key_grants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    def __repr__(self) -> str:
        return (
            f"KeyGrant(id={self.id}, user_id={self.user_id}, purpose={self.purpose!r}, "
            f"job_id={self.job_id!r}, expires_at={self.expires_at}, "
            f"sealed=<{len(self.sealed or b'')} bytes>)"
        )


class DiagnosticsResult(Base):
    """One requested diagnosis of an account: pending, then its report sealed to the owner."""

    __tablename__ = "diagnostics_results"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("mail_accounts.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(20), default=DiagnosisStatus.PENDING)
    ok: Mapped[bool | None] = mapped_column(Boolean)
    error_class: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(String(500))
    grant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    report_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class LoginFailure(Base):
    """One failed web login, by a digest of the user name or the client address (never either
    in clear), kept for the throttle's window when the web processes share no Redis."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_subject_failed_at", "subject", "failed_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(64))
    failed_at: Mapped[datetime] = mapped_column(UtcDateTime())
