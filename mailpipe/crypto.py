"""Per-user keys: a password unwraps a random data key that encrypts credentials and mail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import DecryptionFailed, WrongPassword

KDF_ALGORITHM = "pbkdf2-sha256"
KDF_ITERATIONS = 600_000
KEY_BYTES = 32
NONCE_BYTES = 12
SALT_BYTES = 16
FORMAT_VERSION = b"\x01"
LEGACY_WRAP = 1  # the data key's associated data named no user: a copy opened on any row
USER_WRAP = 2  # the associated data names the user's row (finding 9 of issue 15)
WRAP_VERSION = USER_WRAP  # what every wrap writes; older forms are re-wrapped at unlock
LEGACY_WRAP_AAD = b"mailpipe/v1|users|wrapped_dek"
LOOKUP_INFO = "mailpipe/v1|lookup|{purpose}"  # HKDF info of each keyed lookup hash


@dataclass(frozen=True)
class KdfParams:
    """How a user's password becomes their key-encryption key; stored beside the wrapped key."""

    salt: bytes
    iterations: int = KDF_ITERATIONS
    algorithm: str = KDF_ALGORITHM

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "iterations": self.iterations,
            "salt": base64.b64encode(self.salt).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KdfParams:
        return cls(
            salt=base64.b64decode(data["salt"]),
            iterations=int(data["iterations"]),
            algorithm=data["algorithm"],
        )


def derive_kek(password: str, params: KdfParams) -> bytes:
    """Stretch a password so that guessing it offline costs 600,000 HMAC rounds per try."""
    if params.algorithm != KDF_ALGORITHM:
        raise ValueError(f"unsupported key derivation {params.algorithm!r}")
    return hashlib.pbkdf2_hmac("sha256", password.encode(), params.salt, params.iterations)


def associated_data(table: str, column: str, row: object) -> bytes:
    """Bind a ciphertext to its place, so it cannot be moved to another row or column."""
    return f"mailpipe/v1|{table}|{column}|{row}".encode()


class DataKey:
    """A user's 256-bit data key: AES-256-GCM with associated data naming table, column and row."""

    __slots__ = ("_aead", "_hash_key", "_key", "_lookup_keys")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a data key has 32 bytes")
        self._key = key
        self._aead = AESGCM(key)
        self._hash_key = hmac.new(key, b"mailpipe/v1|content-hash", hashlib.sha256).digest()
        self._lookup_keys: dict[str, bytes] = {}

    @classmethod
    def generate(cls) -> DataKey:
        return cls(AESGCM.generate_key(bit_length=256))

    def encrypt(
        self, plaintext: bytes | memoryview, *, table: str, column: str, row: object
    ) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        aad = associated_data(table, column, row)
        return FORMAT_VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, ciphertext: bytes, *, table: str, column: str, row: object) -> bytes:
        if ciphertext[:1] != FORMAT_VERSION:
            raise DecryptionFailed(f"{table}.{column}: unknown ciphertext format")
        nonce = ciphertext[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, ciphertext[1 + NONCE_BYTES :], associated_data(table, column, row)
            )
        except InvalidTag:
            raise DecryptionFailed(
                f"{table}.{column} of row {row}: ciphertext is damaged, moved or under another key"
            ) from None

    def content_hash(self, data: bytes | memoryview) -> bytes:
        """A keyed digest for finding the same message again without revealing its content."""
        return hmac.digest(self._hash_key, data, "sha256")

    def lookup_hash(self, data: bytes, *, purpose: str) -> bytes:
        """HMAC-SHA256 under a key HKDF derives from this one per purpose: equal values find
        each other, while a database reader can neither compute nor confirm one."""
        lookup_key = self._lookup_keys.get(purpose)
        if lookup_key is None:
            lookup_key = HKDF(
                algorithm=hashes.SHA256(),
                length=KEY_BYTES,
                salt=None,
                info=LOOKUP_INFO.format(purpose=purpose).encode(),
            ).derive(self._key)
            self._lookup_keys[purpose] = lookup_key
        return hmac.digest(lookup_key, data, "sha256")

    def export(self) -> bytes:
        """The raw key, only for wrapping or sealing it; never store the result in the clear."""
        return self._key

    def __repr__(self) -> str:
        return "DataKey(<hidden>)"


def wrap_aad(user_id: int) -> bytes:
    """Bind a wrapped data key to its user's row and purpose, so a copy on another row fails."""
    return f"mailpipe/key-wrap/v{USER_WRAP}|users|wrapped_dek|{user_id}".encode()


@dataclass(frozen=True)
class WrappedKey:
    """What the database holds for a user: KDF parameters, the data key under the KEK, and the
    form of the wrap (`users.key_wrap`)."""

    params: KdfParams
    wrapped: bytes
    version: int = WRAP_VERSION


def create_user_key(
    password: str, *, user_id: int, iterations: int = KDF_ITERATIONS
) -> tuple[WrappedKey, DataKey]:
    """Make a fresh data key for a new user, wrapped under a key derived from the password."""
    params = KdfParams(salt=os.urandom(SALT_BYTES), iterations=iterations)
    dek = DataKey.generate()
    return wrap_key(dek, password, params, user_id=user_id), dek


def wrap_key(dek: DataKey, password: str, params: KdfParams, *, user_id: int) -> WrappedKey:
    """Wrap the data key under a password, bound to the user's row."""
    return _wrap(AESGCM(derive_kek(password, params)), dek, params, user_id=user_id)


def unwrap_key(wrapped: WrappedKey, password: str, *, user_id: int) -> tuple[DataKey, WrappedKey]:
    """Unlock a user's data key, or say plainly that the password is wrong; with it the wrap in
    the current form (the same one when it is current, else re-wrapped under the same KEK)."""
    if wrapped.version not in (LEGACY_WRAP, USER_WRAP):
        raise DecryptionFailed(
            f"users.wrapped_dek of row {user_id}: unknown wrap {wrapped.version}"
        )
    kek = AESGCM(derive_kek(password, wrapped.params))
    aad = LEGACY_WRAP_AAD if wrapped.version == LEGACY_WRAP else wrap_aad(user_id)
    blob = wrapped.wrapped
    try:
        key = DataKey(kek.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], aad))
    except InvalidTag:
        raise WrongPassword(
            "wrong password: it does not unlock this user's data key "
            "(or the key stored for this user was wrapped for another user)"
        ) from None
    if wrapped.version == WRAP_VERSION:
        return key, wrapped
    return key, _wrap(kek, key, wrapped.params, user_id=user_id)


def _wrap(kek: AESGCM, dek: DataKey, params: KdfParams, *, user_id: int) -> WrappedKey:
    nonce = os.urandom(NONCE_BYTES)
    wrapped = FORMAT_VERSION + nonce + kek.encrypt(nonce, dek.export(), wrap_aad(user_id))
    return WrappedKey(params=params, wrapped=wrapped, version=WRAP_VERSION)
