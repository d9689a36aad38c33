"""The `mailpipe` command: operator entry points over the core, with one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

from sqlalchemy import select

from . import db
from .accounts import account_settings, add_account, create_user, unlock_user
from .errors import MailpipeError, NotFound
from .failures import classify
from .imap import SECURITY_MODES, ImapSettings
from .models import MailAccount
from .sync import BATCH_BYTES, SyncOptions, SyncResult, sync_account

EXIT_FAILURE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except MailpipeError as error:
        print(f"mailpipe: {error}", file=sys.stderr)
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailpipe", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    sync = commands.add_parser("sync", help="one-shot incremental sync of one account")
    sync.add_argument("--host", required=True)
    sync.add_argument("--port", type=int)
    sync.add_argument("--user", required=True, help="IMAP login name")
    sync.add_argument(
        "--password-env",
        required=True,
        metavar="VAR",
        help="environment variable with the password",
    )
    sync.add_argument("--security", choices=SECURITY_MODES, default="tls")
    sync.add_argument("--ca-file", help="trust this CA bundle instead of the system's")
    sync.add_argument("--folder", action="append", dest="folders", metavar="F")
    sync.add_argument("--max-mails", type=int)
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds per IMAP command")
    sync.add_argument(
        "--batch-bytes", type=int, default=BATCH_BYTES, help="bound on message bytes per batch"
    )
    sync.add_argument("--db", help="database URL (default: MAILPIPE_DATABASE_URL or SQLite)")
    sync.add_argument("--owner", default="operator", help="mailpipe user who owns the mail")
    sync.add_argument(
        "--owner-password-env",
        metavar="VAR",
        help="variable with the owner's password (default: the IMAP password's)",
    )
    sync.add_argument("--json", action="store_true", help="print one JSON object")
    sync.set_defaults(run=run_sync)

    demo = commands.add_parser("demo", help="sync a built-in demo mailbox into SQLite")
    demo.set_defaults(run=run_demo)
    return parser


def _secret(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise MailpipeError(f"environment variable {variable} is not set")
    return value


def run_sync(args: argparse.Namespace) -> int:
    """Sync one account straight from the command line, with no queue in between."""
    password = _secret(args.password_env)
    owner_password = _secret(args.owner_password_env) if args.owner_password_env else password
    settings = ImapSettings(
        host=args.host,
        port=args.port,
        username=args.user,
        password=password,
        security=args.security,
        ca_file=args.ca_file,
        command_timeout=args.timeout,
        connect_timeout=min(args.timeout, 15.0),
    )
    engine = db.make_engine(args.db)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        try:
            user, key = unlock_user(session, args.owner, owner_password)
        except NotFound:
            user, key = create_user(session, args.owner, owner_password)
        account_id = _find_or_add_account(session, user, key, settings, args.folders)
    options = SyncOptions(
        folders=args.folders, max_mails=args.max_mails, batch_bytes=args.batch_bytes
    )
    try:
        result = sync_account(
            sessions, account_id=account_id, key=key, settings=settings, options=options
        )
    except Exception as error:  # every failure becomes one line naming its cause
        if os.environ.get("MAILPIPE_DEBUG"):
            traceback.print_exc()
        failure = classify(error, host=args.host)
        print(f"mailpipe: sync failed ({failure.error_class}): {failure.message}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        engine.dispose()
    print(json.dumps(result.to_json()) if args.json else summary(result))
    return 0


def _find_or_add_account(session, user, key, settings: ImapSettings, folders) -> int:
    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user.id)):
        stored = account_settings(account, key)
        if (stored.host, stored.effective_port, stored.username) == (
            settings.host,
            settings.effective_port,
            settings.username,
        ):
            return account.id
    return add_account(session, user, key, settings, folders=folders).id


def summary(result: SyncResult) -> str:
    """A few human lines: counts, then where the time went."""
    phases = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in result.phases.items())
    unchanged = sum(1 for folder in result.folders if folder.unchanged)
    return (
        f"{len(result.folders)} folder(s), {unchanged} unchanged: fetched {result.fetched}, "
        f"saved {result.saved}, duplicates {result.duplicates}, "
        f"quarantined {result.quarantined} in {result.duration:.3f} s\n"
        f"phases: {phases}"
    )


def run_demo(args: argparse.Namespace) -> int:
    from .demo_run import run

    return run()
