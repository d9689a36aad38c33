"""Keys: a password unwraps the data key; ciphertexts are bound to their table, column and row."""

import pytest

from mailpipe.crypto import DataKey, KdfParams, WrappedKey, create_user_key, unwrap_key
from mailpipe.errors import DecryptionFailed, WrongPassword

FAST = 1_000  # PBKDF2 rounds for tests; the default of 600,000 is checked separately


def test_round_trip_through_password():
    # Given a user key created from a password
    wrapped, key = create_user_key("correct horse", iterations=FAST)
    ciphertext = key.encrypt(b"Hallo Welt", table="emails", column="raw", row=7)
    # When the key is unwrapped again from the stored parameters and the same password
    stored = WrappedKey(
        params=KdfParams.from_json(wrapped.params.to_json()), wrapped=wrapped.wrapped
    )
    again = unwrap_key(stored, "correct horse")
    # Then it decrypts what the first key encrypted
    assert again.decrypt(ciphertext, table="emails", column="raw", row=7) == b"Hallo Welt"
    assert b"Hallo Welt" not in ciphertext


def test_wrong_password_is_a_clear_error():
    wrapped, _key = create_user_key("right", iterations=FAST)
    with pytest.raises(WrongPassword, match="wrong password"):
        unwrap_key(wrapped, "wrong")


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
    wrapped, _ = create_user_key("pw")
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
