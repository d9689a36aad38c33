"""`mailpipe sync` and `mailpipe profile`: one account synced straight from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError, WrongPassword

from .common import (
    EXIT_FAILURE,
    SECURITY_MODES,
    amount,
    count,
    instant,
    nonempty,
    port,
    variable_secret,
)

if TYPE_CHECKING:  # the parser is built without them; the command loads what it runs
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from mailpipe.crypto import DataKey
    from mailpipe.imap import ImapSettings
    from mailpipe.models import User
    from mailpipe.oauth2 import TokenSource
    from mailpipe.observer import Observer
    from mailpipe.settings import Settings
    from mailpipe.sync import SyncOptions, SyncResult

MAX_COMMAND_SECONDS = 3_600.0
# mailpipe.sync.BATCH_BYTES and mailpipe.profiler's methods, without loading them for a parser
BATCH_BYTES = 8 * 1024 * 1024
RU_MAXRSS = "ru_maxrss"
MEMORY_METHODS = (RU_MAXRSS, "tracemalloc")


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
        metavar="VAR",
        type=nonempty,
        help="environment variable with the password",
    )
    parser.add_argument("--oauth2-token-url", metavar="URL", help="OAuth2 token endpoint")
    parser.add_argument("--oauth2-client-id", metavar="ID", help="OAuth2 client id")
    parser.add_argument(
        "--oauth2-client-secret-env",
        metavar="VAR",
        type=nonempty,
        help="variable with the OAuth2 client secret",
    )
    parser.add_argument(
        "--oauth2-refresh-token-env",
        metavar="VAR",
        type=nonempty,
        help="variable with the OAuth2 refresh token (used once; the rotated one is kept, "
        "encrypted, in the database)",
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
        help="variable with the password of an owner from before key files, asked for once "
        "(default: the IMAP password's, or with OAuth2 the refresh-token variable's first value)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_sync(args: argparse.Namespace, settings: Settings) -> int:
    """Sync one account straight from the command line, with no queue in between."""
    engine, target = sync_target(
        args, args.db or settings.database_url, key_dir=settings.owner_key_path
    )
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
    import tempfile

    from mailpipe.profiler import Profiler

    with tempfile.TemporaryDirectory(prefix="mailpipe-profile-") as scratch:
        # a database of its own is thrown away with its key file; a given one keeps its owner's
        key_dir = settings.owner_key_path if args.db else Path(scratch) / "keys"
        engine, target = sync_target(
            args, args.db or f"sqlite:///{scratch}/profile.db", key_dir=key_dir
        )
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
    tokens: TokenSource | None = None

    def sync(self, *, observer: Observer | None = None) -> SyncResult:
        from mailpipe.sync import sync_account

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


def sync_target(args: argparse.Namespace, url: str, *, key_dir: Path) -> tuple[Engine, SyncTarget]:
    """The database (migrated), its owner's key (from their key file in `key_dir`) and the
    account, created on first use.

    With OAuth2 the refresh token on the command line is used only when the account is new: a
    known account refreshes with the (rotated) token kept in the database.
    """
    from mailpipe import db
    from mailpipe.accounts import add_account, unlock_owner
    from mailpipe.imap import ImapSettings
    from mailpipe.oauth2 import TokenSource
    from mailpipe.oauth2 import grant as oauth2_grant
    from mailpipe.sync import SyncOptions

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


def one_line_failure(command: str, error: Exception, *, host: str, debug: bool) -> int:
    from mailpipe.failures import classify

    if debug:
        import traceback

        traceback.print_exc()
    failure = classify(error, host=host)
    print(f"mailpipe: {command} failed ({failure.error_class}): {failure.message}", file=sys.stderr)
    return EXIT_FAILURE


def _find_account(session: Session, user: User, key: DataKey, settings: ImapSettings) -> int | None:
    """The owner's account on this server with this login, if there is one."""
    from sqlalchemy import select

    from mailpipe.accounts import account_settings
    from mailpipe.addresses import AddressPolicy
    from mailpipe.models import MailAccount

    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user.id)):
        stored = account_settings(account, key, policy=AddressPolicy())  # compared, not connected
        if (stored.host, stored.effective_port, stored.username) == (
            settings.host,
            settings.effective_port,
            settings.username,
        ):
            return account.id
    return None


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
