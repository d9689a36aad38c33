"""`mailpipe account ...` and `mailpipe health`: a user's IMAP accounts and how they fare."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError

from .common import (
    SECURITY_MODES,
    StrictParser,
    count,
    find_user,
    instant,
    nonempty,
    open_database,
    password_option,
    port,
    row_id,
    secret,
    unlock,
    variable_secret,
)

if TYPE_CHECKING:
    from mailpipe.settings import Settings

MAX_INTERVAL_SECONDS = 7 * 24 * 3600  # a week between syncs at most
# mailpipe.providers' names, without loading its classes for a parser
PROVIDERS = ("gmail", "outlook", "yahoo", "gmx", "icloud", "other")
OAUTH2_PROVIDERS = ("generic", "google", "microsoft")


def add_commands(commands: argparse._SubParsersAction) -> None:
    account = commands.add_parser("account", help="IMAP accounts").add_subparsers(
        title="account", parser_class=StrictParser
    )
    account_add = account.add_parser("add", help="add an IMAP account to a user")
    account_add.add_argument("--user", required=True, type=nonempty)
    password_option(account_add)
    account_add.add_argument(
        "--host", type=nonempty, help="IMAP server (with --oauth2: the provider's)"
    )
    account_add.add_argument("--port", type=port)
    account_add.add_argument("--login", required=True, type=nonempty, help="IMAP login name")
    account_add.add_argument(
        "--secret-env",
        metavar="VAR",
        type=nonempty,
        help="variable with the IMAP password (default: prompt)",
    )
    account_add.add_argument("--security", choices=SECURITY_MODES, default="tls")
    account_add.add_argument("--ca-file")
    account_add.add_argument("--folder", action="append", dest="folders", metavar="F")
    account_add.add_argument(
        "--interval",
        type=count(minimum=60, maximum=MAX_INTERVAL_SECONDS),
        default=300,
        help="seconds between syncs",
    )
    account_add.add_argument("--provider", choices=PROVIDERS)
    account_add.add_argument(
        "--since", type=instant, help="never fetch mail received before this date (UTC) or time"
    )
    account_add.add_argument(
        "--oauth2",
        choices=OAUTH2_PROVIDERS,
        metavar="PROVIDER",
        help="log in with OAuth2 through this configured provider (google, microsoft, generic)",
    )
    account_add.add_argument(
        "--refresh-token-env",
        metavar="VAR",
        type=nonempty,
        help="with --oauth2: variable with the refresh token",
    )
    account_add.add_argument(
        "--no-check",
        action="store_true",
        help="store the account without logging in first (a server not reachable yet)",
    )
    account_add.set_defaults(run=run_account_add)
    account_list = account.add_parser("list", help="a user's accounts and their health")
    account_list.add_argument("--user", required=True, type=nonempty)
    account_list.add_argument("--json", action="store_true")
    account_list.set_defaults(run=run_health)
    account_remove = account.add_parser("remove", help="remove an account and its stored mail")
    account_remove.add_argument("account_id", type=row_id)
    account_remove.add_argument("--user", required=True, type=nonempty)
    account_remove.set_defaults(run=run_account_remove)
    account_push = account.add_parser(
        "push", help="turn push (IMAP IDLE watching) on or off for an account"
    )
    account_push.add_argument("account_id", type=row_id)
    account_push.add_argument("state", choices=("on", "off"))
    account_push.add_argument("--user", required=True, type=nonempty)
    account_push.set_defaults(run=run_account_push)

    health = commands.add_parser("health", help="a user's accounts and their health")
    health.add_argument("--user", required=True, type=nonempty)
    health.add_argument("--json", action="store_true")
    health.set_defaults(run=run_health)


def run_account_add(args: argparse.Namespace, settings: Settings) -> int:
    """Add an account once its server accepted the login (unless --no-check)."""
    from dataclasses import replace

    from mailpipe.accounts import add_account
    from mailpipe.imap import ImapSettings
    from mailpipe.login import verify_login
    from mailpipe.oauth2 import grant as oauth2_grant
    from mailpipe.oauth2 import refresh

    sessions = open_database(settings)
    user, key = unlock(sessions, args.user, args.password_env, key_dir=settings.owner_key_path)
    grant = None
    if args.oauth2:
        provider = settings.oauth2_providers.get(args.oauth2)
        if provider is None or not provider.configured:
            raise MailpipeError(f"OAuth2 provider {args.oauth2} is not configured (see README)")
        if not args.refresh_token_env:
            raise MailpipeError("--oauth2 needs --refresh-token-env VAR")
        refresh_token = variable_secret(args.refresh_token_env)
        tokens = refresh(
            token_url=provider.token_url,
            client_id=provider.client_id,
            client_secret=provider.client_secret,
            refresh_token=refresh_token,
        )
        grant = oauth2_grant(
            token_url=provider.token_url,
            client_id=provider.client_id,
            refresh_token=refresh_token,
            tokens=tokens,
        )
        imap = ImapSettings(
            host=args.host or provider.imap_host,
            port=args.port or provider.imap_port,
            username=args.login,
            access_token=tokens.access_token,
            security=args.security,
            ca_file=args.ca_file,
        )
    elif args.host is None:
        raise MailpipeError("--host is needed (or --oauth2 PROVIDER)")
    else:
        imap = ImapSettings(
            host=args.host,
            port=args.port,
            username=args.login,
            password=secret(
                args.secret_env, f"IMAP password for {args.login}: ", option="--secret-env VAR"
            ),
            security=args.security,
            ca_file=args.ca_file,
        )
    settings.address_policy.check(imap.host, imap.effective_port)
    if not args.no_check:
        failure = verify_login(replace(imap, policy=settings.address_policy))
        if failure is not None:
            raise MailpipeError(
                f"not added: {failure.message} ({failure.error_class}); "
                "--no-check adds it without logging in"
            )
    with sessions.begin() as session:
        account = add_account(
            session, user, key, imap, folders=args.folders, provider=args.provider, oauth2=grant
        )
        account.sync_interval_seconds = args.interval
        account.sync_since = args.since
        print(f"account {account.id} added ({account.provider})")
    return 0


def run_account_remove(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe.accounts import owned_account

    sessions = open_database(settings)
    with sessions.begin() as session:
        user = find_user(session, args.user)
        session.delete(owned_account(session, args.account_id, user.id))
    print(f"account {args.account_id} removed")
    return 0


def run_account_push(args: argparse.Namespace, settings: Settings) -> int:
    """Push on: a watcher holds an IDLE connection for it; off: it is only polled."""
    from mailpipe.accounts import set_push

    sessions = open_database(settings)
    with sessions.begin() as session:
        user = find_user(session, args.user)
        set_push(session, args.account_id, user.id, enabled=args.state == "on")
    print(f"account {args.account_id}: push {args.state}")
    return 0


def run_health(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe import reports

    sessions = open_database(settings)
    with sessions() as session:
        health = reports.account_health(session, find_user(session, args.user).id)
    if args.json:
        print(json.dumps([account.to_json() for account in health]))
        return 0
    for account in health:
        error = f"  last error: {account.last_error}" if account.last_error else ""
        fetched = account.last_success_at.isoformat() if account.last_success_at else "never"
        mode = "push" if account.pushed else f"every {account.sync_interval_seconds // 60} min"
        recent = (
            f"  {account.recent_failures} of the last {account.recent_runs} attempt(s) failed"
            if account.recent_runs
            else ""
        )
        print(
            f"{account.account_id:>5}  {account.provider:<8} {account.shown_health:<9}"
            f" {mode:<14} last fetched {fetched}{recent}{error}"
        )
    return 0
