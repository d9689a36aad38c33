"""Key files: the one-shot owner is unlocked by a 0600 file, never by the database alone."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from sqlalchemy import select

from mailpipe import db
from mailpipe.accounts import KEY_FILE_ONLY, create_user, unlock_owner, unlock_user
from mailpipe.errors import MailpipeError, WrongPassword
from mailpipe.models import KeyFile, User

SECRET = b"the mail only the owner may read"


@pytest.fixture
def sessions(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate(engine)
    yield db.session_factory(engine)
    engine.dispose()


def encrypted(key) -> bytes:
    return key.encrypt(SECRET, table="emails", column="raw", row=1)


def test_a_new_owner_has_no_password_to_guess_and_a_private_key_file(sessions, tmp_path):
    # Given an empty database, when the one-shot owner is first asked for
    keys = tmp_path / "keys"
    with sessions.begin() as session:
        _, key = unlock_owner(session, "operator", "imap-pw", key_dir=keys)
        sealed = encrypted(key)
    # Then the database holds no password wrap (nothing to guess offline) ...
    with sessions() as session:
        stored = session.scalar(select(User).where(User.name == "operator"))
        assert stored.kdf == {"algorithm": KEY_FILE_ONLY} and stored.wrapped_dek == b""
        assert session.scalar(select(KeyFile.user_id)) == stored.id
        # ... a password does not unlock it, the right one no more than any
        with pytest.raises(WrongPassword):
            unlock_user(session, "operator", "imap-pw")
    # ... and the key file is readable by its owner alone, in a private directory
    [path] = keys.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    # When it is asked for again, with any password at all
    with sessions.begin() as session:
        _, again = unlock_owner(session, "operator", "not the password", key_dir=keys)
    # Then the key file alone unlocked the same data key
    assert again.decrypt(sealed, table="emails", column="raw", row=1) == SECRET


def test_a_key_directory_that_cannot_be_written_is_one_clear_error_and_no_owner(sessions, tmp_path):
    # Given a key directory below a plain file (it cannot be made)
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    # When the one-shot owner is first asked for, Then the error names the setting to change
    with (
        pytest.raises(MailpipeError, match=r"cannot write a key file.*MAILPIPE_OWNER_KEY_DIR"),
        sessions.begin() as session,
    ):
        unlock_owner(session, "operator", "imap-pw", key_dir=blocker / "keys")
    # And no owner was left behind that nothing could unlock
    with sessions() as session:
        assert session.scalar(select(User).where(User.name == "operator")) is None


def test_without_its_key_file_the_database_unlocks_nothing(sessions, tmp_path):
    # Given an owner whose key file is not where the command looks (a copy of the database)
    with sessions.begin() as session:
        unlock_owner(session, "operator", "pw", key_dir=tmp_path / "keys")
    # When it is asked for with the key directory of another machine
    # Then one clear error names the user and the key directory, and no key file is made there
    with sessions.begin() as session, pytest.raises(MailpipeError, match=r"'operator'.*key file"):
        unlock_owner(session, "operator", "pw", key_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_an_owner_with_a_password_is_unlocked_by_it_once_then_by_a_key_file(sessions, tmp_path):
    # Given an owner from before key files: a password-wrapped data key (PBKDF2)
    with sessions.begin() as session:
        _, key = create_user(session, "operator", "pw", iterations=1_000)
        sealed = encrypted(key)
    keys = tmp_path / "keys"
    # When a wrong password is given before any key file exists, then it is refused
    with sessions.begin() as session, pytest.raises(WrongPassword):
        unlock_owner(session, "operator", "wrong", key_dir=keys)
    # When the right password is given once
    with sessions.begin() as session:
        unlock_owner(session, "operator", "pw", key_dir=keys)
    # Then later runs are unlocked by the key file made then, whatever password they give
    with sessions.begin() as session:
        _, again = unlock_owner(session, "operator", "wrong", key_dir=keys)
    assert again.decrypt(sealed, table="emails", column="raw", row=1) == SECRET
    # And the password still unlocks the user, as the web app's login does
    with sessions() as session:
        _, by_password = unlock_user(session, "operator", "pw")
    assert by_password.decrypt(sealed, table="emails", column="raw", row=1) == SECRET


def test_a_key_file_others_may_read_is_refused(sessions, tmp_path):
    # Given an owner whose key file was made readable by the group
    keys = tmp_path / "keys"
    with sessions.begin() as session:
        unlock_owner(session, "operator", "pw", key_dir=keys)
    [path] = keys.iterdir()
    os.chmod(path, 0o640)
    # When the owner is asked for, then the file is refused in one line saying what to do
    with sessions.begin() as session, pytest.raises(MailpipeError, match="chmod 600"):
        unlock_owner(session, "operator", "pw", key_dir=keys)


def test_a_key_file_of_another_owner_does_not_unlock_this_one(sessions, tmp_path):
    # Given two owners, each with a key file
    keys = tmp_path / "keys"
    with sessions.begin() as session:
        unlock_owner(session, "anna", "pw", key_dir=keys)
        ben, _ = unlock_owner(session, "ben", "pw", key_dir=keys)
    # When anna's stored wrap is moved to ben's key file row (someone with the database alone)
    with sessions.begin() as session:
        rows = {row.user_id: row for row in session.scalars(select(KeyFile))}
        anna_row = next(row for user_id, row in rows.items() if user_id != ben.id)
        rows[ben.id].wrapped_dek = anna_row.wrapped_dek
    # Then ben's key file does not open it: the wrap is bound to its user and file
    with sessions.begin() as session, pytest.raises(MailpipeError, match="does not unlock"):
        unlock_owner(session, "ben", "pw", key_dir=keys)


def test_other_commands_unlock_the_owner_by_its_key_file_without_asking(sessions, tmp_path):
    # Given the one-shot owner of a database, with its key file (and no password at all)
    keys = tmp_path / "keys"
    with sessions.begin() as session:
        unlock_owner(session, "operator", "pw", key_dir=keys)
    # When an account is added for it with no password given and no terminal to ask one
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "account",
            "add",
            "--user",
            "operator",
            "--host",
            "127.0.0.1",
            "--login",
            "someone",
            "--secret-env",
            "IMAP_SECRET",
            "--security",
            "none",
            "--no-check",
        ],
        env={
            **os.environ,
            "IMAP_SECRET": "s",
            "MAILPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'k.db'}",
            "MAILPIPE_OWNER_KEY_DIR": str(keys),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then the key file unlocked it, and the account is stored under its key
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("account 1 added")
