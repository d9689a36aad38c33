"""Key grants: a user's data key sealed to the workers' X25519 key, for one job or background sync.

Job messages never carry a key. The web side, which holds only the workers' *public* key, seals
the user's data key with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
AES-256-GCM) and stores the result as a `KeyGrant` row with an expiry. Only workers hold the
private key and can unseal it. The HPKE `info` names the grant's id, user, purpose and expiry,
so a sealed key copied into another row, or given a longer expiry, no longer opens.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from sqlalchemy import (
    ColumnElement,
    delete,
    select,
)
from sqlalchemy.orm import Session

from .crypto import KEY_BYTES, DataKey
from .db import rowcount
from .errors import DecryptionFailed, MailpipeError, NotFound
from .models import KeyGrant, utcnow
from .settings import WORKER_KEY_FILE_ENV, WORKER_PUBLIC_KEY_ENV, X25519_KEY_BYTES

WORKER_KEY_MODE = 0o600

PURPOSE_JOB = "job"
PURPOSE_BACKGROUND = "background"
PURPOSES = (PURPOSE_JOB, PURPOSE_BACKGROUND)

SEAL_VERSION = b"\x01"
SEAL_INFO_PREFIX = "mailpipe grant v1"
SEAL_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
SEALED_BYTES = len(SEAL_VERSION) + X25519_KEY_BYTES + KEY_BYTES + 16  # version, enc, key, tag

MISSING_GRANT = "key grant missing or expired: the user must log in again"


class WorkerKeyError(MailpipeError):
    """The workers' key pair is missing or unreadable, so no grant can be sealed or opened."""


# -- worker key pair ---------------------------------------------------------------------


def public_key_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key: what web hosts need to seal grants, and nothing more."""
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def generate_worker_key(path: Path) -> bytes:
    """Write a new private key readable by its owner only; refuse to replace an existing one.

    Replacing the key would silently orphan every live grant, so an existing file is an error.
    The key is written to a private temporary file and hard-linked into place, so a concurrent
    reader never sees a half-written key and two racing generators cannot both win.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"worker key file {path} exists: refusing to overwrite it")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = X25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, WORKER_KEY_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), WORKER_KEY_MODE)  # the umask only narrows; be explicit
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise FileExistsError(
                f"worker key file {path} exists: refusing to overwrite it"
            ) from None
    finally:
        temporary.unlink(missing_ok=True)
    return public_key_bytes(private)


def load_private_key(path: Path) -> X25519PrivateKey:
    """Read the workers' private key from a PEM (PKCS#8) file or a raw 32-byte file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WorkerKeyError(
            f"worker key file {path} is missing: set {WORKER_KEY_FILE_ENV} on worker hosts"
        ) from None
    if len(data) == X25519_KEY_BYTES:
        return X25519PrivateKey.from_private_bytes(data)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise WorkerKeyError(
            f"worker key file {path} is not an X25519 private key (PEM or 32 raw bytes)"
        ) from None
    if not isinstance(private, X25519PrivateKey):
        raise WorkerKeyError(f"worker key file {path} holds a key of another type than X25519")
    return private


def worker_public_key(key_file: Path, *, configured: bytes | None = None) -> bytes:
    """The key grants are sealed to: the `configured` public key (a web host's
    `MAILPIPE_WORKER_PUBLIC_KEY`), else the public half of the key file.

    Never creates the key file: a web host that silently made its own key pair would seal grants
    no worker can open.
    """
    if configured is not None:
        return configured
    return public_key_bytes(load_private_key(key_file))


def ensure_worker_key(key_file: Path, *, configured: bytes | None = None) -> bytes:
    """Create the key file on first use (embedded demo, web and worker in one place).

    Returns the public key, and refuses a `configured` public key that does not belong to the
    key file, since grants sealed to it would never open.
    """
    path = Path(key_file)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            generate_worker_key(path)
    public = public_key_bytes(load_private_key(path))
    if configured is not None and configured != public:
        raise WorkerKeyError(f"{WORKER_PUBLIC_KEY_ENV} does not match the worker key file {path}")
    return public


def encode_public_key(public_key: bytes) -> str:
    """The value to put in `MAILPIPE_WORKER_PUBLIC_KEY` on web hosts."""
    return base64.b64encode(public_key).decode()


# -- sealing -----------------------------------------------------------------------------


def _seal_info(
    *, grant_id: uuid.UUID | str, user_id: int, purpose: str, expires_at: datetime
) -> bytes:
    """The HPKE context: the grant's id, owner, purpose and expiry, canonical to the microsecond."""
    if purpose not in PURPOSES:
        raise ValueError(f"grant purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    if expires_at.utcoffset() is None:
        raise ValueError(f"the grant's expiry {expires_at!r} has no offset: which instant is it?")
    grant = uuid.UUID(str(grant_id))
    expiry = expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{SEAL_INFO_PREFIX}|{grant}|{int(user_id)}|{purpose}|{expiry}".encode()


def seal_key(
    key: DataKey,
    public_key: bytes,
    *,
    grant_id: uuid.UUID | str,
    user_id: int,
    purpose: str,
    expires_at: datetime,
) -> bytes:
    """Seal the data key so that only the workers can open it, and only for this grant."""
    info = _seal_info(grant_id=grant_id, user_id=user_id, purpose=purpose, expires_at=expires_at)
    try:
        recipient = X25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise WorkerKeyError("the worker public key is not a raw 32-byte X25519 key") from None
    return SEAL_VERSION + SEAL_SUITE.encrypt(key.export(), recipient, info=info)


def unseal_key(
    sealed: bytes,
    private_key: X25519PrivateKey,
    *,
    grant_id: uuid.UUID | str,
    user_id: int,
    purpose: str,
    expires_at: datetime,
) -> DataKey:
    """Open a sealed data key, or fail if it was damaged, moved, extended or sealed to another key."""
    info = _seal_info(grant_id=grant_id, user_id=user_id, purpose=purpose, expires_at=expires_at)
    sealed = bytes(sealed)
    if sealed[:1] != SEAL_VERSION or len(sealed) != SEALED_BYTES:
        raise DecryptionFailed(f"key grant {grant_id}: unknown sealed key format")
    try:
        raw = SEAL_SUITE.decrypt(sealed[1:], private_key, info=info)
    except InvalidTag:
        raise DecryptionFailed(
            f"key grant {grant_id}: sealed key is damaged, moved to another grant "
            "or sealed to another worker key"
        ) from None
    return DataKey(raw)


# -- grants in the database --------------------------------------------------------------


def _new_grant(
    session: Session,
    *,
    user_id: int,
    purpose: str,
    job_id: str | None,
    key: DataKey,
    public_key: bytes,
    ttl_seconds: float,
) -> KeyGrant:
    """Seal and store one grant; the id is chosen first because the seal is bound to it."""
    if ttl_seconds <= 0:
        raise ValueError("a key grant needs a positive time to live")
    grant_id = uuid.uuid4()
    expires_at = utcnow() + timedelta(seconds=ttl_seconds)
    sealed = seal_key(
        key,
        public_key,
        grant_id=grant_id,
        user_id=user_id,
        purpose=purpose,
        expires_at=expires_at,
    )
    grant = KeyGrant(
        id=grant_id,
        user_id=user_id,
        purpose=purpose,
        job_id=job_id,
        sealed=sealed,
        expires_at=expires_at,
    )
    session.add(grant)
    session.flush()
    return grant


def grant_for_job(
    session: Session,
    *,
    user_id: int,
    job_id: str,
    key: DataKey,
    public_key: bytes,
    ttl_seconds: float,
) -> KeyGrant:
    """Let the workers read a user's data for one job; the message carries only the grant id."""
    return _new_grant(
        session,
        user_id=user_id,
        purpose=PURPOSE_JOB,
        job_id=job_id,
        key=key,
        public_key=public_key,
        ttl_seconds=ttl_seconds,
    )


def grant_background(
    session: Session,
    *,
    user_id: int,
    key: DataKey,
    public_key: bytes,
    ttl_seconds: float,
) -> KeyGrant:
    """Let the scheduler sync a logged-out user; a new login replaces the previous grant."""
    revoke_background(session, user_id)
    return _new_grant(
        session,
        user_id=user_id,
        purpose=PURPOSE_BACKGROUND,
        job_id=None,
        key=key,
        public_key=public_key,
        ttl_seconds=ttl_seconds,
    )


def _delete(session: Session, *conditions: ColumnElement[bool]) -> int:
    """Delete matching grants; "fetch" also evicts them from the session, whatever their tz."""
    result = session.execute(
        delete(KeyGrant).where(*conditions).execution_options(synchronize_session="fetch")
    )
    return rowcount(result)


def revoke_background(session: Session, user_id: int) -> int:
    """Logout: background sync stops for this user; returns how many grants were deleted."""
    return _delete(session, KeyGrant.user_id == user_id, KeyGrant.purpose == PURPOSE_BACKGROUND)


def drop_job_grant(session: Session, job_id: str) -> int:
    """A job has ended, so its grant must not outlive it; returns how many were deleted."""
    return _delete(session, KeyGrant.job_id == job_id, KeyGrant.purpose == PURPOSE_JOB)


def _as_uuid(grant_id: uuid.UUID | str | None) -> uuid.UUID | None:
    """Grant ids arrive as text in job messages; a missing or malformed one is simply not found."""
    if grant_id is None or isinstance(grant_id, uuid.UUID):
        return grant_id
    try:
        return uuid.UUID(str(grant_id))
    except ValueError:
        return None


def live_grant(
    session: Session, grant_id: uuid.UUID | str | None, *, now: datetime | None = None
) -> KeyGrant | None:
    """The grant if it exists and has not expired; an expired row is as good as gone."""
    key = _as_uuid(grant_id)
    if key is None:
        return None
    grant = session.get(KeyGrant, key)
    if grant is None or grant.expires_at <= (now or utcnow()):
        return None
    return grant


def unlock_grant(
    session: Session,
    grant_id: uuid.UUID | str | None,
    private_key: X25519PrivateKey,
    *,
    now: datetime | None = None,
) -> DataKey:
    """The data key for a worker's job, or a clear error that the user must log in again."""
    grant = live_grant(session, grant_id, now=now)
    if grant is None:
        raise NotFound(MISSING_GRANT)
    return unseal_key(
        grant.sealed,
        private_key,
        grant_id=grant.id,
        user_id=grant.user_id,
        purpose=grant.purpose,
        expires_at=grant.expires_at,
    )


def background_grant(
    session: Session, user_id: int, *, now: datetime | None = None
) -> KeyGrant | None:
    """The user's live background grant, which scheduled jobs use instead of a job grant."""
    return session.scalar(
        select(KeyGrant).where(
            KeyGrant.user_id == user_id,
            KeyGrant.purpose == PURPOSE_BACKGROUND,
            KeyGrant.expires_at > (now or utcnow()),
        )
    )


def users_with_background_grant(session: Session, *, now: datetime | None = None) -> set[int]:
    """Whom the scheduler may sync; everyone else's accounts show LOCKED."""
    rows = session.scalars(
        select(KeyGrant.user_id)
        .where(
            KeyGrant.purpose == PURPOSE_BACKGROUND,
            KeyGrant.expires_at > (now or utcnow()),
        )
        .distinct()
    )
    return set(rows)


def purge_expired(session: Session, *, now: datetime | None = None) -> int:
    """Delete grants past their expiry, so no sealed key lingers longer than it is useful."""
    return _delete(session, KeyGrant.expires_at <= (now or utcnow()))
