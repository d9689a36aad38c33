"""`mailpipe sync` and `mailpipe profile`: one account synced straight from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import db
from mailpipe.accounts import account_settings, add_account, create_user, unlock_user
from mailpipe.addresses import AddressPolicy
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError, NotFound, WrongPassword
from mailpipe.failures import classify
from mailpipe.imap import SECURITY_MODES, ImapSettings
from mailpipe.models import MailAccount
from mailpipe.observer import Observer
from mailpipe.profiler import MEMORY_METHODS, RU_MAXRSS, Profiler
from mailpipe.settings import Settings
from mailpipe.sync import BATCH_BYTES, SyncOptions, SyncResult, sync_account

from .common import EXIT_FAILURE, amount, count, instant, nonempty, port, variable_secret

MAX_COMMAND_SECONDS = 3_600.0


def add_commands(commands: argparse._SubParsersAction) -> None:
    sync = commands.add_parser("sync", help="one-shot incremental sync of one account")
    sync_options(sync, db_help="database URL (default: MAILPIPE_DATABASE_URL or SQLite)")
    sync.set_defaults(run=run_sync)

    profile = commands.add_parser(
        "profile", help="sync one account and show per phase wall and CPU time, memory, counts"
    )
    sync_options(
        profile,
        db_help="database URL (default: a new temporary SQLite, so the whole mailbox is synced)",
    )
    profile.add_argument(
        "--memory",
        choices=MEMORY_METHODS,
        default=RU_MAXRSS,
        help="peak memory from the process's resident high-water mark (cheap) or tracemalloc "
        "(Python allocations only, and slows the run down)",
    )
    profile.set_defaults(run=run_profile)


def sync_options(parser: argparse.ArgumentParser, *, db_help: str) -> None:
    """The connection and run options `sync` and `profile` share."""
    parser.add_argument("--host", required=True, type=nonempty)
    parser.add_argument("--port", type=port)
    parser.add_argument("--user", required=True, type=nonempty, help="IMAP login name")
    parser.add_argument(
        "--password-env",
        required=True,
        metavar="VAR",
        type=nonempty,
        help="environment variable with the password",
    )
    parser.add_argument("--security", choices=SECURITY_MODES, default="tls")
    parser.add_argument("--ca-file", help="trust this CA bundle instead of the system's")
    parser.add_argument("--folder", action="append", dest="folders", metavar="F")
    parser.add_argument("--max-mails", type=count(), help="take at most N, the newest first")
    parser.add_argument(
        "--since", type=instant, help="never fetch mail received before this date (UTC) or time"
    )
    parser.add_argument(
        "--timeout",
        type=amount(maximum=MAX_COMMAND_SECONDS),
        default=60.0,
        help="seconds per IMAP command",
    )
    parser.add_argument(
        "--batch-bytes", type=count(), default=BATCH_BYTES, help="bound on message bytes per batch"
    )
    parser.add_argument("--db", help=db_help)
    parser.add_argument(
        "--owner", default="operator", type=nonempty, help="mailpipe user who owns the mail"
    )
    parser.add_argument(
        "--owner-password-env",
        metavar="VAR",
        type=nonempty,
        help="variable with the owner's password (default: the IMAP password's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_sync(args: argparse.Namespace, settings: Settings) -> int:
    """Sync one account straight from the command line, with no queue in between."""
    engine, target = sync_target(args, args.db or settings.database_url)
    try:
        result = target.sync()
    except Exception as error:  # every failure becomes one line naming its cause
        return one_line_failure("sync", error, host=args.host, debug=settings.debug)
    finally:
        engine.dispose()
    print(json.dumps(result.to_json()) if args.json else summary(result))
    return 0


def run_profile(args: argparse.Namespace, settings: Settings) -> int:
    """A sync under the profiler; by default into a new database, so every message is synced."""
    with tempfile.TemporaryDirectory(prefix="mailpipe-profile-") as scratch:
        engine, target = sync_target(args, args.db or f"sqlite:///{scratch}/profile.db")
        profiler = Profiler(memory=args.memory)
        try:
            with profiler:
                result = target.sync(observer=profiler)
        except Exception as error:
            return one_line_failure("profile", error, host=args.host, debug=settings.debug)
        finally:
            engine.dispose()
    profile = profiler.to_json()
    if args.json:
        print(json.dumps({**result.to_json(), "profile": profile}))
    else:
        print(f"{summary(result)}\n{profile_summary(profile)}")
    return 0


@dataclass(frozen=True)
class SyncTarget:
    """The account named on the command line, ready to sync."""

    sessions: sessionmaker[Session]
    account_id: int
    key: DataKey
    settings: ImapSettings
    options: SyncOptions

    def sync(self, *, observer: Observer | None = None) -> SyncResult:
        return sync_account(
            self.sessions,
            account_id=self.account_id,
            key=self.key,
            settings=self.settings,
            options=self.options,
            observer=observer,
        )


def sync_target(args: argparse.Namespace, url: str) -> tuple[Engine, SyncTarget]:
    """The database (migrated), its owner's key and the account, created on first use."""
    password = variable_secret(args.password_env)
    owner_password = (
        variable_secret(args.owner_password_env) if args.owner_password_env else password
    )
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
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        try:
            user, key = unlock_user(session, args.owner, owner_password)
        except NotFound:
            user, key = create_user(session, args.owner, owner_password)
        except WrongPassword:
            raise MailpipeError(_owner_hint(args)) from None
        account_id = _find_or_add_account(session, user, key, settings, args.folders)
    options = SyncOptions(
        folders=args.folders,
        max_mails=args.max_mails,
        batch_bytes=args.batch_bytes,
        since=args.since,
    )
    return engine, SyncTarget(sessions, account_id, key, settings, options)


def _owner_hint(args: argparse.Namespace) -> str:
    """What to do when the database's owner of synced mail has another password."""
    given = (
        f"the password in {args.owner_password_env}"
        if args.owner_password_env
        else f"the IMAP password in {args.password_env}"
    )
    return (
        f"{given} does not unlock the mailpipe user {args.owner!r} who owns the mail in this "
        f"database (their password is the one first used for them, by default the first "
        f"account's IMAP password): give that password with --owner-password-env VAR, or sync "
        f"this account for another user with --owner NAME"
    )


def one_line_failure(command: str, error: Exception, *, host: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    failure = classify(error, host=host)
    print(f"mailpipe: {command} failed ({failure.error_class}): {failure.message}", file=sys.stderr)
    return EXIT_FAILURE


def _find_or_add_account(session, user, key, settings: ImapSettings, folders) -> int:
    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user.id)):
        stored = account_settings(account, key, policy=AddressPolicy())  # compared, not connected
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
        f"quarantined {result.quarantined}, flags changed {result.flags_changed}, "
        f"vanished {result.vanished} in {result.duration:.3f} s\n"
        f"phases: {phases}"
    )


def profile_summary(profile: dict) -> str:
    """Per phase: wall and CPU time and what bound it; then memory and mail counts."""
    lines = [f"{'phase':<12}{'wall ms':>10}{'cpu ms':>10}{'cpu/wall':>10}  bound  calls"]
    for name, phase in profile["phases"].items():
        lines.append(
            f"{name:<12}{phase['wall_seconds'] * 1000:>10.1f}{phase['cpu_seconds'] * 1000:>10.1f}"
            f"{phase['cpu_ratio']:>10.2f}  {phase['bound']:<6}{phase['calls']:>6}"
        )
    memory, mail = profile["memory"], profile["mail"]
    lines.append(
        f"run {profile['wall_seconds'] * 1000:.0f} ms wall, {profile['cpu_seconds'] * 1000:.0f} ms "
        f"CPU; peak memory {(memory['peak_bytes'] or 0) / 2**20:.1f} MiB ({memory['method']}); "
        f"{mail['fetched']} mails ({mail['fetched_bytes'] / 2**20:.1f} MiB) in "
        f"{mail['batches']} batch(es)"
    )
    return "\n".join(lines)
