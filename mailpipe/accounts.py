"""Users and their IMAP accounts: created and unlocked with the user's password."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import keyfiles
from .addresses import AddressPolicy
from .crypto import (
    KDF_ITERATIONS,
    SALT_BYTES,
    WRAP_VERSION,
    DataKey,
    KdfParams,
    WrappedKey,
    create_user_key,
    derive_kek,
    unwrap_key,
)
from .errors import MailpipeError, NotFound, WrongPassword
from .imap import ImapSettings
from .models import MailAccount, User
from .providers import PROVIDER_HOSTS
from .vocabulary import AuthKind


@dataclass(frozen=True)
class Preset:
    """A provider's IMAP server, so users pick a name instead of typing host, port and security."""

    id: str
    name: str
    host: str
    port: int
    security: str
    provider: str = "other"
    oauth2: str | None = None  # the OAuth2 provider this host wants instead of a password


PRESETS = (
    Preset("gmx", "GMX", "imap.gmx.net", 993, "tls", "gmx"),
    Preset("webde", "WEB.DE", "imap.web.de", 993, "tls"),
    Preset("t-online", "T-Online", "secureimap.t-online.de", 993, "tls"),
    Preset("gmail", "Gmail", "imap.gmail.com", 993, "tls", "gmail", "google"),
    Preset(
        "outlook",
        "Outlook / Office 365",
        "outlook.office365.com",
        993,
        "tls",
        "outlook",
        "microsoft",
    ),
    Preset("icloud", "iCloud", "imap.mail.me.com", 993, "tls", "icloud"),
    Preset("yahoo", "Yahoo", "imap.mail.yahoo.com", 993, "tls", "yahoo"),
    Preset("posteo", "Posteo", "posteo.de", 993, "tls"),
    Preset("mailbox-org", "mailbox.org", "imap.mailbox.org", 993, "tls"),
)
CREDENTIAL_FIELDS = (
    "host",
    "port",
    "username",
    "password",
    "access_token",
    "security",
    "auth",
    "ca_file",
)
DEFAULT_FOLDERS = ("INBOX",)  # what an account syncs unless its owner names other folders
KEY_FILE_ONLY = "key-file"  # users.kdf of a user with no password: only key files unlock them
OAUTH2_GRANT = "oauth2"  # the credentials' key holding an OAuth2 grant (see mailpipe.oauth2)


def guess_provider(host: str) -> str:
    """One of a fixed set, so it can label metrics without naming anyone."""
    host = host.lower().rstrip(".")
    for provider, domains in PROVIDER_HOSTS.items():
        if any(host == d or host.endswith("." + d) for d in domains):
            return provider
    return "other"


def create_user(
    session: Session, name: str, password: str, *, iterations: int = KDF_ITERATIONS
) -> tuple[User, DataKey]:
    """A new user with a fresh data key only their password unlocks."""
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise MailpipeError(f"user {name!r} exists already")
    user = User(name=name, kdf={}, wrapped_dek=b"")
    session.add(user)
    session.flush()  # the wrap is bound to the row's id
    wrapped, key = create_user_key(password, user_id=user.id, iterations=iterations)
    _store_wrap(user, wrapped)
    session.flush()
    return user, key


def unlock_user(session: Session, name: str, password: str) -> tuple[User, DataKey]:
    """The user and their data key, or a clear error naming what is wrong.

    A wrap in an older form is re-wrapped in the current one (bound to the user's row) in the
    caller's transaction: committing it is what moves the row on.
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    if user.kdf.get("algorithm") == KEY_FILE_ONLY:
        derive_kek(password, KdfParams(salt=bytes(SALT_BYTES)))  # as long as a wrong password
        raise WrongPassword(f"user {name!r} has no password: a key file unlocks them")
    wrapped = WrappedKey(
        params=KdfParams.from_json(user.kdf), wrapped=user.wrapped_dek, version=user.key_wrap
    )
    key, current = unwrap_key(wrapped, password, user_id=user.id)
    if current is not wrapped:
        _store_wrap(user, current)
    return user, key


def _store_wrap(user: User, wrapped: WrappedKey) -> None:
    user.kdf = wrapped.params.to_json()
    user.wrapped_dek = wrapped.wrapped
    user.key_wrap = wrapped.version


def create_key_file_user(session: Session, name: str, directory: Path) -> tuple[User, DataKey]:
    """A new user whose data key only a key file in `directory` unlocks: no password to guess."""
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise MailpipeError(f"user {name!r} exists already")
    key = DataKey.generate()
    # no password wrap to bind: marked current, so `key_wrap = 1` lists only rows to re-wrap
    user = User(name=name, kdf={"algorithm": KEY_FILE_ONLY}, wrapped_dek=b"", key_wrap=WRAP_VERSION)
    session.add(user)
    session.flush()
    keyfiles.issue(session, user, key, directory)
    return user, key


def unlock_owner(
    session: Session, name: str, password: str, *, key_dir: Path
) -> tuple[User, DataKey]:
    """The owner of a one-shot command's mail, without 600,000 PBKDF2 rounds on every run: new,
    created with a key file only; else unlocked by their key file in `key_dir`, or once by
    their password, after which a key file is made there for the next runs."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        return create_key_file_user(session, name, key_dir)
    key = keyfiles.unlock(session, user, key_dir)
    if key is not None:
        return user, key
    if user.kdf.get("algorithm") == KEY_FILE_ONLY:
        raise MailpipeError(
            f"the mailpipe user {name!r} is unlocked by a key file that is not in {key_dir} "
            f"(MAILPIPE_OWNER_KEY_DIR): restore it there, or use another user with --owner NAME"
        )
    user, key = unlock_user(session, name, password)
    keyfiles.issue(session, user, key, key_dir)
    return user, key


def add_account(
    session: Session,
    user: User,
    key: DataKey,
    settings: ImapSettings,
    *,
    folders: list[str] | None = None,
    provider: str | None = None,
    oauth2: dict[str, Any] | None = None,
) -> MailAccount:
    """Store an account with its host, login and secret encrypted under the user's key."""
    account = MailAccount(user_id=user.id, provider=provider or guess_provider(settings.host))
    session.add(account)
    session.flush()
    set_credentials(account, key, settings, oauth2=oauth2)
    set_folders(account, key, folders or DEFAULT_FOLDERS)
    return account


def set_folders(account: MailAccount, key: DataKey, folders: Sequence[str]) -> None:
    """Encrypt the folder list the owner asks to sync into the account's row (bound to it): a
    folder's name says what the mail in it is about; a clear copy from before 0016 is dropped."""
    account.folders_enc = key.encrypt(
        json.dumps(list(folders)).encode(), table="mail_accounts", column="folders", row=account.id
    )
    account.folders = None


def account_folders(account: MailAccount, key: DataKey) -> list[str]:
    """The folder list the owner asked to sync (in clear only in a row from before 0016 that
    no key has converted yet)."""
    if account.folders_enc is None:
        return list(account.folders or DEFAULT_FOLDERS)
    plain = key.decrypt(
        account.folders_enc, table="mail_accounts", column="folders", row=account.id
    )
    folders: list[str] = json.loads(plain)
    return folders


def convert_user_folders(session: Session, *, user_id: int, key: DataKey) -> int:
    """`convert_folders` for every account of a user (at a web login, which has the key)."""
    clear = select(MailAccount).where(
        MailAccount.user_id == user_id, MailAccount.folders.is_not(None)
    )
    return sum(convert_folders(account, key) for account in session.scalars(clear).all())


def convert_folders(account: MailAccount, key: DataKey) -> bool:
    """Encrypt a folder list still in clear from before 0016 (where the owner's key is at hand:
    a run, a web login); whether there was one."""
    if account.folders is None:
        return False
    set_folders(account, key, account.folders)
    return True


def set_credentials(
    account: MailAccount,
    key: DataKey,
    settings: ImapSettings,
    *,
    oauth2: dict[str, Any] | None = None,
) -> None:
    """Replace the stored credentials (e.g. after the user re-enters a password), with the
    account's OAuth2 grant when it has one."""
    credentials: dict[str, Any] = {name: getattr(settings, name) for name in CREDENTIAL_FIELDS}
    if oauth2 is not None:
        credentials[OAUTH2_GRANT] = oauth2
    write_credentials(account, key, credentials)


def write_credentials(account: MailAccount, key: DataKey, credentials: dict[str, Any]) -> None:
    """Encrypt the credentials into the account's row (bound to that row)."""
    oauth2 = credentials.get(OAUTH2_GRANT) is not None or credentials.get("access_token")
    account.auth_kind = AuthKind.OAUTH2 if oauth2 else AuthKind.PASSWORD
    account.credentials_enc = key.encrypt(
        json.dumps(credentials).encode(),
        table="mail_accounts",
        column="credentials",
        row=account.id,
    )


def read_credentials(account: MailAccount, key: DataKey) -> dict[str, Any]:
    """The account's decrypted credentials: connection settings and any OAuth2 grant."""
    if account.credentials_enc is None:
        raise MailpipeError(f"account {account.id} has no stored credentials")
    plain = key.decrypt(
        account.credentials_enc, table="mail_accounts", column="credentials", row=account.id
    )
    credentials: dict[str, Any] = json.loads(plain)
    return credentials


def has_oauth2_grant(account: MailAccount, key: DataKey) -> bool:
    """Whether the account logs in with a refreshable OAuth2 grant."""
    return account.auth_kind == AuthKind.OAUTH2 and OAUTH2_GRANT in read_credentials(account, key)


def account_settings(
    account: MailAccount, key: DataKey, *, policy: AddressPolicy, **overrides: object
) -> ImapSettings:
    """Decrypt an account's connection settings, bound to the address policy every connection
    for a stored account goes through; `overrides` adjust timeouts and the like."""
    credentials = read_credentials(account, key)
    stored = {name: credentials[name] for name in CREDENTIAL_FIELDS if name in credentials}
    return ImapSettings(**{**stored, **overrides}, policy=policy)


def account_login(account: MailAccount, key: DataKey) -> str:
    """The login name an account shows its owner (no connection is made with it)."""
    return str(read_credentials(account, key).get("username") or "")


def set_push(session: Session, account_id: int, user_id: int, *, enabled: bool) -> None:
    """Push on or off for the user's account; off, its watcher gives it up at the next renewal
    of its lease and the account is polled at its interval only."""
    owned_account(session, account_id, user_id).push_enabled = enabled


def owned_account(session: Session, account_id: int, user_id: int) -> MailAccount:
    """The account if this user owns it: anyone else's account is "not found", as is a missing
    one, so no caller can tell the two apart (the one ownership check for accounts)."""
    account = session.get(MailAccount, account_id)
    if account is None or account.user_id != user_id:
        raise NotFound(f"account {account_id} not found")
    return account
