"""The account a one-shot command syncs (`sync`, `profile`, `watch`): its database, migrated,
its owner's key and its settings, created on first use; loaded only by those commands."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import db
from mailpipe.accounts import account_settings, add_account, unlock_owner
from mailpipe.addresses import AddressPolicy
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError, WrongPassword
from mailpipe.imap import ImapSettings
from mailpipe.models import MailAccount, User
from mailpipe.oauth2 import TokenSource
from mailpipe.oauth2 import grant as oauth2_grant
from mailpipe.sync import SyncOptions, SyncResult, sync_account

from .common import variable_secret

if TYPE_CHECKING:
    from mailpipe.observer import Observer


@dataclass(frozen=True)
class SyncTarget:
    """The account named on the command line, ready to sync."""

    sessions: sessionmaker[Session]
    account_id: int
    key: DataKey
    settings: ImapSettings
    options: SyncOptions
    tokens: TokenSource | None = None

    def sync(self, *, observer: Observer | None = None) -> SyncResult:
        return sync_account(
            self.sessions,
            account_id=self.account_id,
            key=self.key,
            settings=self.settings,
            options=self.options,
            observer=observer,
            tokens=self.tokens,
        )


@dataclass(frozen=True)
class _OAuth2Login:
    """The OAuth2 options: where to refresh, as whom, and the refresh token to start from."""

    token_url: str
    client_id: str
    client_secret: str | None = field(repr=False)
    refresh_token: str = field(repr=False)


def _oauth2_login(args: argparse.Namespace) -> _OAuth2Login | None:
    """The OAuth2 options, or None for a password login; exactly one of the two is needed."""
    oauth2 = (args.oauth2_token_url, args.oauth2_client_id, args.oauth2_refresh_token_env)
    if args.password_env and any(oauth2):
        raise MailpipeError("give either --password-env or the --oauth2-* options, not both")
    if args.password_env:
        return None
    if not all(oauth2):
        raise MailpipeError(
            "--password-env VAR, or --oauth2-token-url, --oauth2-client-id and "
            "--oauth2-refresh-token-env VAR, are needed"
        )
    secret_env = args.oauth2_client_secret_env
    return _OAuth2Login(
        token_url=args.oauth2_token_url,
        client_id=args.oauth2_client_id,
        client_secret=variable_secret(secret_env) if secret_env else None,
        refresh_token=variable_secret(args.oauth2_refresh_token_env),
    )


def sync_target(
    args: argparse.Namespace, url: str, *, key_dir: Path, store_process: bool = False
) -> tuple[Engine, SyncTarget]:
    """The database (migrated), its owner's key (from their key file in `key_dir`) and the
    account, created on first use. With `store_process` the sync stores in a forked process
    (`sync.StoreProcess`): only for a command that runs no threads of its own (not `watch`).

    With OAuth2 the refresh token on the command line is used only when the account is new: a
    known account refreshes with the (rotated) token kept in the database.
    """
    oauth2 = _oauth2_login(args)
    secret = variable_secret(args.password_env) if oauth2 is None else oauth2.refresh_token
    password = secret if oauth2 is None else None
    owner_password = variable_secret(args.owner_password_env) if args.owner_password_env else secret
    settings = ImapSettings(
        host=args.host,
        port=args.port,
        username=args.user,
        password=password,
        access_token="" if oauth2 is not None else None,
        security=args.security,
        ca_file=args.ca_file,
        command_timeout=args.timeout,
        connect_timeout=min(args.timeout, 15.0),
    )
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        try:
            user, key = unlock_owner(session, args.owner, owner_password, key_dir=key_dir)
        except WrongPassword:
            raise MailpipeError(_owner_hint(args)) from None
        account_id = _find_account(session, user, key, settings)
        if account_id is None:
            grant = None
            if oauth2 is not None:
                grant = oauth2_grant(
                    token_url=oauth2.token_url,
                    client_id=oauth2.client_id,
                    refresh_token=oauth2.refresh_token,
                )
            account = add_account(session, user, key, settings, folders=args.folders, oauth2=grant)
            account_id = account.id
    options = SyncOptions(
        folders=args.folders,
        max_mails=args.max_mails,
        batch_bytes=args.batch_bytes,
        since=args.since,
        store_process=store_process,
    )
    if oauth2 is None:
        return engine, SyncTarget(sessions, account_id, key, settings, options)
    tokens = TokenSource(
        sessions,
        account_id,
        key,
        client_secret=oauth2.client_secret,
        fallback=oauth2.refresh_token,
    )
    return engine, SyncTarget(sessions, account_id, key, settings, options, tokens)


def _owner_hint(args: argparse.Namespace) -> str:
    """What to do when the database's owner of synced mail has another password."""
    given = (
        f"the password in {args.owner_password_env}"
        if args.owner_password_env
        else f"the IMAP password in {args.password_env}"
        if args.password_env
        else f"the refresh token in {args.oauth2_refresh_token_env}"
    )
    return (
        f"{given} does not unlock the mailpipe user {args.owner!r} who owns the mail in this "
        f"database (their password is the one first used for them, by default the first "
        f"account's IMAP password): give that password with --owner-password-env VAR, or sync "
        f"this account for another user with --owner NAME"
    )


def _find_account(session: Session, user: User, key: DataKey, settings: ImapSettings) -> int | None:
    """The owner's account on this server with this login, if there is one."""
    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user.id)):
        stored = account_settings(account, key, policy=AddressPolicy())  # compared, not connected
        if (stored.host, stored.effective_port, stored.username) == (
            settings.host,
            settings.effective_port,
            settings.username,
        ):
            return account.id
    return None
