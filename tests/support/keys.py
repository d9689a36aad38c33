"""Data keys wrapped as rows from before migration 0014 hold them (no user in the AAD)."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailpipe.crypto import (
    FORMAT_VERSION,
    LEGACY_WRAP_AAD,
    NONCE_BYTES,
    DataKey,
    KdfParams,
    derive_kek,
)


def legacy_wrap(key: DataKey, password: str, params: KdfParams) -> bytes:
    """The data key wrapped as before users.key_wrap: bound to no user."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(derive_kek(password, params)).encrypt(nonce, key.export(), LEGACY_WRAP_AAD)
    return FORMAT_VERSION + nonce + sealed
