"""`mailpipe user ...`: users, and the background grant login and logout make in the web app."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import (
    StrictParser,
    amount,
    find_user,
    nonempty,
    open_database,
    password_option,
    secret,
    unlock,
)

if TYPE_CHECKING:
    from mailpipe.settings import Settings

MAX_GRANT_HOURS = 24 * 366  # a background grant lives a year at most


def add_commands(commands: argparse._SubParsersAction) -> None:
    user = commands.add_parser("user", help="mailpipe users").add_subparsers(
        title="user", parser_class=StrictParser
    )
    user_add = user.add_parser("add", help="create a user with a fresh data key")
    user_add.add_argument("name", type=nonempty)
    password_option(user_add)
    user_add.set_defaults(run=run_user_add)
    grant = user.add_parser("grant", help="allow background sync (as at login)")
    grant.add_argument("name", type=nonempty)
    grant.add_argument(
        "--hours",
        type=amount(maximum=MAX_GRANT_HOURS),
        default=24.0,
        help="how long the grant lives",
    )
    password_option(grant)
    grant.set_defaults(run=run_user_grant)
    revoke = user.add_parser("revoke", help="end background sync (as at logout)")
    revoke.add_argument("name", type=nonempty)
    revoke.set_defaults(run=run_user_revoke)


def run_user_add(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe.accounts import create_user

    password = secret(args.password_env, f"new password for {args.name}: ", confirm=True)
    sessions = open_database(settings)
    with sessions.begin() as session:
        user, _key = create_user(session, args.name, password)
        print(f"user {user.name} created (id {user.id})")
    return 0


def run_user_grant(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe import grants

    sessions = open_database(settings)
    user, key = unlock(sessions, args.name, args.password_env, key_dir=settings.owner_key_path)
    with sessions.begin() as session:
        grants.grant_background(
            session,
            user_id=user.id,
            key=key,
            public_key=grants.worker_public_key(
                settings.worker_key_path, configured=settings.worker_public_key
            ),
            ttl_seconds=int(args.hours * 3600),
        )
    print(f"background sync allowed for {args.name} for {args.hours:g} h")
    return 0


def run_user_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe import grants

    sessions = open_database(settings)
    with sessions.begin() as session:
        removed = grants.revoke_background(session, find_user(session, args.name).id)
    print(f"background sync ended for {args.name} ({removed} grant(s) removed)")
    return 0
