"""Keyed digests: names that Redis or the database key by (hosts, user names, client addresses)
are HMAC-SHA256 under a server secret, so a reader of those stores cannot confirm a guess.

The secret is a file of random bytes (`MAILPIPE_SERVER_SECRET_FILE`); every process of one
installation reads the same file, so one host maps to one slot name in every worker. Unset, it is
`server.secret` in the data directory, made at first start readable by its owner only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import uuid
from pathlib import Path

from .errors import MailpipeError

SERVER_SECRET_FILE_ENV = "MAILPIPE_SERVER_SECRET_FILE"
SERVER_SECRET_FILENAME = "server.secret"
SERVER_SECRET_BYTES = 32
SERVER_SECRET_MODE = 0o600


class ServerSecretError(MailpipeError):
    """The server secret file is missing, unreadable or too short."""


def keyed_digest(secret: bytes, purpose: str, value: str, *, length: int) -> str:
    """A hex digest of `value` under the server secret, separated by purpose (slot, login name)."""
    return hmac.new(secret, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()[:length]


def server_secret(path: Path, *, create: bool) -> bytes:
    """The secret in `path`; with `create` (the data directory's default) made on first use.

    The file is written privately and hard-linked into place, so processes starting together
    all end up with the one secret that won, and none reads a half-written file.
    """
    path = Path(path)
    if create and not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            _generate(path)
    try:
        secret = path.read_bytes()
    except OSError as error:
        raise ServerSecretError(
            f"{SERVER_SECRET_FILE_ENV}: cannot read {path}: {error.strerror}"
        ) from None
    if len(secret) < SERVER_SECRET_BYTES:
        raise ServerSecretError(
            f"{SERVER_SECRET_FILE_ENV}: {path} holds {len(secret)} bytes, "
            f"at least {SERVER_SECRET_BYTES} random bytes are needed"
        )
    return secret


def _generate(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SERVER_SECRET_MODE)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), SERVER_SECRET_MODE)  # the umask only narrows; be explicit
            handle.write(os.urandom(SERVER_SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
