"""Users and their IMAP accounts: created and unlocked with the user's password."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .addresses import AddressPolicy
from .crypto import KDF_ITERATIONS, DataKey, KdfParams, WrappedKey, create_user_key, unwrap_key
from .errors import MailpipeError, NotFound
from .imap import ImapSettings
from .models import MailAccount, User
from .vocabulary import AuthKind

PROVIDERS = ("gmail", "outlook", "yahoo", "gmx", "icloud", "other")
PROVIDER_NAMES = {
    "gmail": "Gmail",
    "outlook": "Outlook",
    "yahoo": "Yahoo",
    "gmx": "GMX",
    "icloud": "iCloud",
    "other": "E-Mail",
}
PROVIDER_HOSTS = {
    "gmail": ("gmail.com", "googlemail.com"),
    "outlook": ("outlook.com", "office365.com", "hotmail.com", "live.com"),
    "yahoo": ("yahoo.com", "yahoo.de"),
    "gmx": ("gmx.net", "gmx.de", "gmx.com"),
    "icloud": ("mail.me.com", "icloud.com"),
}
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
    wrapped, key = create_user_key(password, iterations=iterations)
    user = User(name=name, kdf=wrapped.params.to_json(), wrapped_dek=wrapped.wrapped)
    session.add(user)
    session.flush()
    return user, key


def unlock_user(session: Session, name: str, password: str) -> tuple[User, DataKey]:
    """The user and their data key, or a clear error naming what is wrong."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    wrapped = WrappedKey(params=KdfParams.from_json(user.kdf), wrapped=user.wrapped_dek)
    return user, unwrap_key(wrapped, password)


def add_account(
    session: Session,
    user: User,
    key: DataKey,
    settings: ImapSettings,
    *,
    folders: list[str] | None = None,
    provider: str | None = None,
) -> MailAccount:
    """Store an account with its host, login and secret encrypted under the user's key."""
    account = MailAccount(
        user_id=user.id,
        provider=provider or guess_provider(settings.host),
        folders=folders or ["INBOX"],
    )
    session.add(account)
    session.flush()
    set_credentials(account, key, settings)
    return account


def set_credentials(account: MailAccount, key: DataKey, settings: ImapSettings) -> None:
    """Replace the stored credentials (e.g. after the user re-enters a password)."""
    account.auth_kind = AuthKind.OAUTH2 if settings.access_token is not None else AuthKind.PASSWORD
    plain = json.dumps({name: getattr(settings, name) for name in CREDENTIAL_FIELDS}).encode()
    account.credentials_enc = key.encrypt(
        plain, table="mail_accounts", column="credentials", row=account.id
    )


def account_settings(
    account: MailAccount, key: DataKey, *, policy: AddressPolicy, **overrides: object
) -> ImapSettings:
    """Decrypt an account's connection settings, bound to the address policy every connection
    for a stored account goes through; `overrides` adjust timeouts and the like."""
    return ImapSettings(**{**_credentials(account, key), **overrides}, policy=policy)


def account_login(account: MailAccount, key: DataKey) -> str:
    """The login name an account shows its owner (no connection is made with it)."""
    return str(_credentials(account, key).get("username") or "")


def _credentials(account: MailAccount, key: DataKey) -> dict[str, Any]:
    if account.credentials_enc is None:
        raise MailpipeError(f"account {account.id} has no stored credentials")
    plain = key.decrypt(
        account.credentials_enc, table="mail_accounts", column="credentials", row=account.id
    )
    found: dict[str, Any] = json.loads(plain)
    return found


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
