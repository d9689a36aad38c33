"""Keys: a password unwraps the data key; ciphertexts are bound to their table, column and row."""

import os

import pytest

from mailpipe.crypto import (
    LEGACY_WRAP,
    WRAP_VERSION,
    DataKey,
    KdfParams,
    WrappedKey,
    create_user_key,
    unwrap_key,
)
from mailpipe.errors import DecryptionFailed, WrongPassword
from tests.support.keys import legacy_wrap

FAST = 1_000  # PBKDF2 rounds for tests; the default of 600,000 is checked separately


def test_round_trip_through_password():
    # Given a user key created from a password
    wrapped, key = create_user_key("correct horse", user_id=3, iterations=FAST)
    ciphertext = key.encrypt(b"Hallo Welt", table="emails", column="raw", row=7)
    # When the key is unwrapped again from the stored parameters and the same password
    stored = WrappedKey(
        params=KdfParams.from_json(wrapped.params.to_json()), wrapped=wrapped.wrapped
    )
    again, current = unwrap_key(stored, "correct horse", user_id=3)
    # Then it decrypts what the first key encrypted, and the wrap needs no re-wrapping
    assert again.decrypt(ciphertext, table="emails", column="raw", row=7) == b"Hallo Welt"
    assert b"Hallo Welt" not in ciphertext
    assert current is stored


def test_a_wrapped_key_on_another_users_row_does_not_unwrap():
    # Given a data key wrapped for user 1
    wrapped, _key = create_user_key("shared password", user_id=1, iterations=FAST)
    # When it is read as user 2's (the row copied, the password the same), Then it is refused
    with pytest.raises(WrongPassword, match="wrapped for another user"):
        unwrap_key(wrapped, "shared password", user_id=2)


def test_a_legacy_wrap_unwraps_once_and_comes_back_bound_to_its_user():
    # Given a data key wrapped in the form before users.key_wrap (associated data names no user)
    params = KdfParams(salt=os.urandom(16), iterations=FAST)
    key = DataKey.generate()
    legacy = WrappedKey(params=params, wrapped=legacy_wrap(key, "pw", params), version=LEGACY_WRAP)
    # When user 5 unwraps it with the password
    opened, current = unwrap_key(legacy, "pw", user_id=5)
    # Then it is the same key, re-wrapped in the current form under the same KDF parameters,
    # which opens for user 5 only
    assert opened.export() == key.export()
    assert current.version == WRAP_VERSION != LEGACY_WRAP and current.params == params
    assert unwrap_key(current, "pw", user_id=5)[0].export() == key.export()
    with pytest.raises(WrongPassword):
        unwrap_key(current, "pw", user_id=6)


def test_wrong_password_is_a_clear_error():
    wrapped, _key = create_user_key("right", user_id=1, iterations=FAST)
    with pytest.raises(WrongPassword, match="wrong password"):
        unwrap_key(wrapped, "wrong", user_id=1)


def test_tampering_is_detected():
    key = DataKey.generate()
    ciphertext = bytearray(key.encrypt(b"secret mail", table="emails", column="raw", row=1))
    ciphertext[-1] ^= 0x01
    with pytest.raises(DecryptionFailed):
        key.decrypt(bytes(ciphertext), table="emails", column="raw", row=1)


@pytest.mark.parametrize(
    ("table", "column", "row"),
    [("emails", "raw", 2), ("emails", "parsed", 1), ("mail_accounts", "raw", 1)],
    ids=["other-row", "other-column", "other-table"],
)
def test_ciphertext_moved_elsewhere_is_rejected(table, column, row):
    # Given a ciphertext written for emails.raw of row 1
    key = DataKey.generate()
    ciphertext = key.encrypt(b"secret mail", table="emails", column="raw", row=1)
    # When it is read as if it belonged somewhere else, Then decryption fails
    with pytest.raises(DecryptionFailed, match="moved"):
        key.decrypt(ciphertext, table=table, column=column, row=row)


def test_another_users_key_cannot_decrypt():
    ciphertext = DataKey.generate().encrypt(b"x", table="emails", column="raw", row=1)
    with pytest.raises(DecryptionFailed):
        DataKey.generate().decrypt(ciphertext, table="emails", column="raw", row=1)


def test_default_kdf_is_pbkdf2_with_600000_rounds():
    wrapped, _ = create_user_key("pw", user_id=1)
    assert wrapped.params.to_json()["algorithm"] == "pbkdf2-sha256"
    assert wrapped.params.iterations == 600_000
    assert len(wrapped.params.salt) == 16


def test_key_never_shows_in_repr():
    key = DataKey.generate()
    assert key.export().hex() not in repr(key)
    assert "hidden" in repr(key)


def test_content_hash_is_keyed():
    # The same mail under two users' keys gives unrelated digests (no cross-user confirmation).
    a, b = DataKey.generate(), DataKey.generate()
    assert a.content_hash(b"mail") == a.content_hash(b"mail")
    assert a.content_hash(b"mail") != b.content_hash(b"mail")
