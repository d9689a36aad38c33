"""The `mailpipe` command: operator entry points over the core, with one-line errors."""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from . import db, diagnostics, grants, jobs, reports
from .accounts import PROVIDERS, account_settings, add_account, create_user, unlock_user
from .crypto import DataKey
from .errors import MailpipeError, NotFound
from .failures import classify
from .imap import SECURITY_MODES, ImapSettings
from .models import MailAccount, PipelineJob, User
from .observer import Observer
from .profiler import MEMORY_METHODS, RU_MAXRSS, Profiler
from .results import JobReport
from .sync import BATCH_BYTES, SyncOptions, SyncResult, sync_account

STRICT_PARSER = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
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
    # No abbreviations: `--password x` must not pass for `--password-env x`.
    parser = argparse.ArgumentParser(prog="mailpipe", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(title="commands", parser_class=STRICT_PARSER)

    sync = commands.add_parser("sync", help="one-shot incremental sync of one account")
    _sync_options(sync, db_help="database URL (default: MAILPIPE_DATABASE_URL or SQLite)")
    sync.set_defaults(run=run_sync)

    profile = commands.add_parser(
        "profile", help="sync one account and show per phase wall and CPU time, memory, counts"
    )
    _sync_options(
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

    diagnose = commands.add_parser(
        "diagnose",
        help="check one IMAP connection step by step: --host ... for any server, "
        "or --account ID for a stored account",
    )
    diagnose.add_argument("--host", help="IMAP server (with --user as the IMAP login name)")
    diagnose.add_argument("--port", type=int)
    diagnose.add_argument(
        "--user", required=True, help="IMAP login name, or with --account the mailpipe user"
    )
    diagnose.add_argument(
        "--account", type=int, dest="account_id", help="a stored account of the mailpipe user"
    )
    diagnose.add_argument(
        "--password-env",
        metavar="VAR",
        help="variable with the IMAP password, or with --account the mailpipe user's "
        "(default: prompt)",
    )
    diagnose.add_argument("--security", choices=SECURITY_MODES, help="default: tls")
    diagnose.add_argument("--ca-file", help="trust this CA bundle instead of the system's")
    diagnose.add_argument(
        "--timeout", type=float, default=diagnostics.DIAGNOSE_TIMEOUT, help="seconds per step"
    )
    diagnose.add_argument("--json", action="store_true", help="print one JSON object")
    diagnose.set_defaults(run=run_diagnose)

    demo = commands.add_parser(
        "demo", help="the pipeline on embedded defaults, with a demo mailbox"
    )
    demo.add_argument("--once", action="store_true", help="one round, a summary, then exit")
    demo.set_defaults(run=_queue_command("run_demo"))

    user = commands.add_parser("user", help="mailpipe users").add_subparsers(
        title="user", parser_class=STRICT_PARSER
    )
    user_add = user.add_parser("add", help="create a user with a fresh data key")
    user_add.add_argument("name")
    _password_option(user_add)
    user_add.set_defaults(run=run_user_add)
    grant = user.add_parser("grant", help="allow background sync (as at login)")
    grant.add_argument("name")
    grant.add_argument("--hours", type=float, default=24.0, help="how long the grant lives")
    _password_option(grant)
    grant.set_defaults(run=run_user_grant)
    revoke = user.add_parser("revoke", help="end background sync (as at logout)")
    revoke.add_argument("name")
    revoke.set_defaults(run=run_user_revoke)

    account = commands.add_parser("account", help="IMAP accounts").add_subparsers(
        title="account", parser_class=STRICT_PARSER
    )
    account_add = account.add_parser("add", help="add an IMAP account to a user")
    account_add.add_argument("--user", required=True)
    _password_option(account_add)
    account_add.add_argument("--host", required=True)
    account_add.add_argument("--port", type=int)
    account_add.add_argument("--login", required=True, help="IMAP login name")
    account_add.add_argument(
        "--secret-env", metavar="VAR", help="variable with the IMAP password (default: prompt)"
    )
    account_add.add_argument("--security", choices=SECURITY_MODES, default="tls")
    account_add.add_argument("--ca-file")
    account_add.add_argument("--folder", action="append", dest="folders", metavar="F")
    account_add.add_argument("--interval", type=int, default=300, help="seconds between syncs")
    account_add.add_argument("--provider", choices=PROVIDERS)
    account_add.set_defaults(run=run_account_add)
    account_list = account.add_parser("list", help="a user's accounts and their health")
    account_list.add_argument("--user", required=True)
    account_list.add_argument("--json", action="store_true")
    account_list.set_defaults(run=run_health)
    account_remove = account.add_parser("remove", help="remove an account and its stored mail")
    account_remove.add_argument("account_id", type=int)
    account_remove.add_argument("--user", required=True)
    account_remove.set_defaults(run=run_account_remove)

    health = commands.add_parser("health", help="a user's accounts and their health")
    health.add_argument("--user", required=True)
    health.add_argument("--json", action="store_true")
    health.set_defaults(run=run_health)

    jobs_parser = commands.add_parser("jobs", help="recent fetch jobs")
    jobs_parser.add_argument("--user", required=True)
    jobs_parser.add_argument("--limit", type=int, default=20)
    jobs_parser.add_argument("--json", action="store_true")
    jobs_parser.set_defaults(run=run_jobs)
    job = commands.add_parser("job", help="one job with per-account outcomes")
    job.add_argument("job_id")
    job.add_argument("--user", help="only if this user owns the job")
    job.add_argument("--json", action="store_true")
    job.set_defaults(run=run_job)

    fetch = commands.add_parser("fetch", help="enqueue a fetch job for one or all accounts")
    fetch.add_argument("--user", required=True)
    _password_option(fetch)
    fetch.add_argument("--account", type=int, dest="account_id")
    fetch.add_argument("--max-mails", type=int, default=100)
    fetch.add_argument("--timeout", type=int, default=120, help="seconds for the job")
    fetch.add_argument("--wait", action="store_true", help="wait for the final status")
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(run=_queue_command("run_fetch"))

    worker = commands.add_parser(
        "worker", help="run Dramatiq workers (dramatiq broker_config actors)"
    )
    worker.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    worker.add_argument("--threads", type=int, default=8)
    worker.add_argument("extra", nargs="*", help="more options for dramatiq, after --")
    worker.set_defaults(run=_queue_command("run_worker"))
    web = commands.add_parser("web", help="mailpipe's own web app: dashboard and JSON API")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.set_defaults(run=run_web)

    worker_key = commands.add_parser(
        "worker-key", help="print the workers' public key (base64); --generate makes the pair"
    )
    worker_key.add_argument("--generate", action="store_true")
    worker_key.set_defaults(run=run_worker_key)
    scheduler = commands.add_parser("scheduler", help="run the periodic scheduler (periodiq)")
    scheduler.set_defaults(run=_queue_command("run_scheduler"))
    return parser


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help="variable with the mailpipe user's password (default: prompt)",
    )


def _sync_options(parser: argparse.ArgumentParser, *, db_help: str) -> None:
    """The connection and run options `sync` and `profile` share."""
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--user", required=True, help="IMAP login name")
    parser.add_argument(
        "--password-env",
        required=True,
        metavar="VAR",
        help="environment variable with the password",
    )
    parser.add_argument("--security", choices=SECURITY_MODES, default="tls")
    parser.add_argument("--ca-file", help="trust this CA bundle instead of the system's")
    parser.add_argument("--folder", action="append", dest="folders", metavar="F")
    parser.add_argument("--max-mails", type=int)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per IMAP command")
    parser.add_argument(
        "--batch-bytes", type=int, default=BATCH_BYTES, help="bound on message bytes per batch"
    )
    parser.add_argument("--db", help=db_help)
    parser.add_argument("--owner", default="operator", help="mailpipe user who owns the mail")
    parser.add_argument(
        "--owner-password-env",
        metavar="VAR",
        help="variable with the owner's password (default: the IMAP password's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _queue_command(name: str):
    """Commands that need the broker live outside the core; load them only when used."""

    def run(args: argparse.Namespace) -> int:
        from actors import commands

        return getattr(commands, name)(args)

    return run


def secret(variable: str | None, prompt: str, *, confirm: bool = False) -> str:
    """A password from the named environment variable, or typed at a prompt; never an argument."""
    if variable:
        return _secret(variable)
    if not sys.stdin.isatty():
        raise MailpipeError(f"{prompt.rstrip(': ')}: no terminal to ask; use the -env option")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != value:
        raise MailpipeError("the two entries differ")
    return value


def sessions_from_env():
    engine = db.make_engine()
    db.migrate(engine)
    return db.session_factory(engine)


def unlock(sessions, name: str, password_env: str | None):
    """The user and their data key, from their password."""
    password = secret(password_env, f"password for {name}: ")
    with sessions() as session:
        return unlock_user(session, name, password)


def find_user(session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def run_web(args: argparse.Namespace) -> int:
    """The web layer imports the broker, so the core loads it only when asked."""
    from web.app import serve

    return serve(host=args.host, port=args.port)


def run_worker_key(args: argparse.Namespace) -> int:
    """Web hosts get the public half as MAILPIPE_WORKER_PUBLIC_KEY; only workers keep the file."""
    if args.generate:
        public = grants.generate_worker_key(grants.worker_key_path())
    else:
        public = grants.worker_public_key()
    print(grants.encode_public_key(public))
    return 0


def run_user_add(args: argparse.Namespace) -> int:
    password = secret(args.password_env, f"new password for {args.name}: ", confirm=True)
    sessions = sessions_from_env()
    with sessions.begin() as session:
        user, _key = create_user(session, args.name, password)
        print(f"user {user.name} created (id {user.id})")
    return 0


def run_user_grant(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    user, key = unlock(sessions, args.name, args.password_env)
    with sessions.begin() as session:
        grants.grant_background(
            session,
            user_id=user.id,
            key=key,
            public_key=grants.worker_public_key(),
            ttl_seconds=int(args.hours * 3600),
        )
    print(f"background sync allowed for {args.name} for {args.hours:g} h")
    return 0


def run_user_revoke(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    with sessions.begin() as session:
        removed = grants.revoke_background(session, find_user(session, args.name).id)
    print(f"background sync ended for {args.name} ({removed} grant(s) removed)")
    return 0


def run_account_add(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    user, key = unlock(sessions, args.user, args.password_env)
    settings = ImapSettings(
        host=args.host,
        port=args.port,
        username=args.login,
        password=secret(args.secret_env, f"IMAP password for {args.login}: "),
        security=args.security,
        ca_file=args.ca_file,
    )
    with sessions.begin() as session:
        account = add_account(
            session, user, key, settings, folders=args.folders, provider=args.provider
        )
        account.sync_interval_seconds = args.interval
        print(f"account {account.id} added ({account.provider})")
    return 0


def run_account_remove(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    with sessions.begin() as session:
        user = find_user(session, args.user)
        account = session.get(MailAccount, args.account_id)
        if account is None or account.user_id != user.id:
            raise NotFound(f"account {args.account_id} not found")
        session.delete(account)
    print(f"account {args.account_id} removed")
    return 0


def run_health(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    with sessions() as session:
        health = reports.account_health(session, find_user(session, args.user).id)
    if args.json:
        print(json.dumps([account.to_json() for account in health]))
        return 0
    for account in health:
        error = f"  last error: {account.last_error}" if account.last_error else ""
        last_fetch = account.last_fetch_at.isoformat() if account.last_fetch_at else "never"
        print(
            f"{account.account_id:>5}  {account.provider:<8} {account.shown_health:<9}"
            f" last fetch {last_fetch}{error}"
        )
    return 0


def run_jobs(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    with sessions() as session:
        listed = jobs.list_jobs(session, find_user(session, args.user).id, args.limit)
    if args.json:
        print(json.dumps([job.to_json() for job in listed]))
        return 0
    for job in listed:
        print(
            f"{job.job_id}  {job.type:<9} {job.status:<15} "
            f"{job.emails_fetched:>6} mails  {job.created_at.isoformat()}"
        )
    return 0


def run_job(args: argparse.Namespace) -> int:
    sessions = sessions_from_env()
    with sessions() as session:
        owner = find_user(session, args.user).id if args.user else None
        if owner is None:
            found = session.get(PipelineJob, args.job_id)
            if found is None:
                raise NotFound(f"job {args.job_id} not found")
            owner = found.user_id
        status = jobs.job_status(session, args.job_id, owner)
    print(json.dumps(status.to_json()) if args.json else describe_job(status))
    return 0


def describe_job(status: JobReport) -> str:
    """A job in a few lines: status, then one line per account."""
    lines = [f"job {status.job_id}: {status.status}, {status.emails_fetched} mails"]
    for run in status.accounts:
        error = f" ({run.error_class}: {run.error})" if run.error_class else ""
        lines.append(
            f"  account {run.account_id} [{run.provider}]: {run.status}, "
            f"attempt {run.attempt}, saved {run.saved}{error}"
        )
    return "\n".join(lines)


def _secret(variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise MailpipeError(f"environment variable {variable} is not set")
    return value


def run_sync(args: argparse.Namespace) -> int:
    """Sync one account straight from the command line, with no queue in between."""
    engine, target = _sync_target(args, args.db)
    try:
        result = target.sync()
    except Exception as error:  # every failure becomes one line naming its cause
        return _one_line_failure("sync", error, host=args.host)
    finally:
        engine.dispose()
    print(json.dumps(result.to_json()) if args.json else summary(result))
    return 0


def run_profile(args: argparse.Namespace) -> int:
    """A sync under the profiler; by default into a new database, so every message is synced."""
    with tempfile.TemporaryDirectory(prefix="mailpipe-profile-") as scratch:
        engine, target = _sync_target(args, args.db or f"sqlite:///{scratch}/profile.db")
        profiler = Profiler(memory=args.memory)
        try:
            with profiler:
                result = target.sync(observer=profiler)
        except Exception as error:
            return _one_line_failure("profile", error, host=args.host)
        finally:
            engine.dispose()
    profile = profiler.to_json()
    if args.json:
        print(json.dumps({**result.to_json(), "profile": profile}))
    else:
        print(f"{summary(result)}\n{profile_summary(profile)}")
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    """Diagnose any server from its address, or a stored account unlocked by its owner."""
    if (args.host is None) == (args.account_id is None):
        raise MailpipeError("give --host (any server) or --account (a stored account)")
    if args.account_id is None:
        settings = ImapSettings(
            host=args.host,
            port=args.port,
            username=args.user,
            password=secret(args.password_env, f"IMAP password for {args.user}: "),
            security=args.security or "tls",
            ca_file=args.ca_file,
        )
        diagnosis = diagnostics.diagnose(settings, timeout=args.timeout)
    else:
        if args.port is not None or args.security is not None or args.ca_file is not None:
            raise MailpipeError("--port, --security and --ca-file go with --host, not --account")
        sessions = sessions_from_env()
        user, key = unlock(sessions, args.user, args.password_env)
        with sessions() as session:
            account = session.get(MailAccount, args.account_id)
            if account is None or account.user_id != user.id:
                raise NotFound(f"account {args.account_id} not found")
            settings = account_settings(account, key)
        diagnosis = diagnostics.diagnose(
            settings, sessions=sessions, account_id=args.account_id, timeout=args.timeout
        )
    print(json.dumps(diagnosis.to_json()) if args.json else describe_diagnosis(diagnosis))
    return 0 if diagnosis.ok else EXIT_FAILURE


@dataclass(frozen=True)
class _SyncTarget:
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


def _sync_target(args: argparse.Namespace, url: str | None) -> tuple[Engine, _SyncTarget]:
    """The database (migrated), its owner's key and the account, created on first use."""
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
    engine = db.make_engine(url)
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
    return engine, _SyncTarget(sessions, account_id, key, settings, options)


def _one_line_failure(command: str, error: Exception, *, host: str) -> int:
    if os.environ.get("MAILPIPE_DEBUG"):
        traceback.print_exc()
    failure = classify(error, host=host)
    print(f"mailpipe: {command} failed ({failure.error_class}): {failure.message}", file=sys.stderr)
    return EXIT_FAILURE


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


def describe_diagnosis(diagnosis: diagnostics.Diagnosis) -> str:
    """One line per check, then the verdict and, on failure, what to act on."""
    lines = [
        f"{check.status:<8} {check.name:<17} {diagnostics.summarise(check)}"
        for check in diagnosis.checks
    ]
    failure = diagnosis.failure
    lines.append(f"failed at {failure.name}: {failure.reason}" if failure else "every check passed")
    return "\n".join(lines)
