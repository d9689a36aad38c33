"""Key files: a user's data key unlocked on one machine without a password or its stretching.

A key file holds 32 random bytes (mode 0600, in a 0700 directory outside the database); the
database holds the data key wrapped under them with AES-256-GCM, bound to the user and the
file (`key_files`). A random key needs no stretching, so unlocking costs one AES-GCM decryption
instead of 600,000 PBKDF2 rounds; the database alone unlocks nothing, the file alone holds no
mail, and deleting the row revokes the file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from .crypto import KEY_BYTES, DataKey
from .errors import DecryptionFailed, MailpipeError
from .models import KeyFile, User

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
SUFFIX = ".key"


def issue(session: Session, user: User, key: DataKey, directory: Path) -> Path:
    """Write a new key file for the user's data key and store the key wrapped under it."""
    key_id = secrets.token_hex(16)
    file_key = secrets.token_bytes(KEY_BYTES)
    path = Path(directory) / f"{key_id}{SUFFIX}"
    try:
        Path(directory).mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except OSError as error:
        raise MailpipeError(
            f"cannot write a key file in {directory} ({error.strerror}): set "
            "MAILPIPE_OWNER_KEY_DIR to a directory of yours"
        ) from None
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), KEY_FILE_MODE)  # the umask only narrows; be explicit
        handle.write(file_key)
    wrapped = _wrap(file_key, key_id, user.id, key.export())
    session.add(KeyFile(key_id=key_id, user_id=user.id, wrapped_dek=wrapped))
    session.flush()
    return path


def unlock(session: Session, user: User, directory: Path) -> DataKey | None:
    """The user's data key from a key file of theirs in `directory`, or None if there is none."""
    for key_id, wrapped in session.execute(
        select(KeyFile.key_id, KeyFile.wrapped_dek).where(KeyFile.user_id == user.id)
    ):
        path = Path(directory) / f"{key_id}{SUFFIX}"
        file_key = _read(path)
        if file_key is None:
            continue
        try:
            return DataKey(_unwrap(file_key, key_id, user.id, wrapped))
        except DecryptionFailed:
            raise MailpipeError(f"key file {path} does not unlock user {user.name!r}") from None
    return None


def _read(path: Path) -> bytes | None:
    """The file's key; None if it is missing. A key others may read is refused, as ssh does."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(KEY_BYTES + 1)
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MailpipeError(f"key file {path} is open to others: chmod 600 it")
    if len(data) != KEY_BYTES:
        raise MailpipeError(f"key file {path} is not a mailpipe key file")
    return data


def _wrap(file_key: bytes, key_id: str, user_id: int, plain: bytes) -> bytes:
    return DataKey(file_key).encrypt(
        plain, table="key_files", column="wrapped_dek", row=f"{user_id}/{key_id}"
    )


def _unwrap(file_key: bytes, key_id: str, user_id: int, wrapped: bytes) -> bytes:
    return DataKey(file_key).decrypt(
        wrapped, table="key_files", column="wrapped_dek", row=f"{user_id}/{key_id}"
    )
