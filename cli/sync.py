"""`mailpipe sync` and `mailpipe profile`: one account synced straight from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    EXIT_FAILURE,
    SECURITY_MODES,
    amount,
    count,
    instant,
    nonempty,
    port,
    start_up,
)

if TYPE_CHECKING:  # the parser is built without them; the command loads what it runs
    from mailpipe.settings import Settings
    from mailpipe.sync import SyncResult

MAX_COMMAND_SECONDS = 3_600.0
# mailpipe.sync.BATCH_BYTES and mailpipe.profiler's methods, without loading them for a parser
BATCH_BYTES = 8 * 1024 * 1024
RU_MAXRSS = "ru_maxrss"
MEMORY_METHODS = (RU_MAXRSS, "tracemalloc")


def add_commands(commands: argparse._SubParsersAction) -> None:
    sync = commands.add_parser("sync", help="one-shot incremental sync of one account")
    sync_options(sync, db_help="database URL (default: MAILPIPE_DATABASE_URL or SQLite)")
    sync.set_defaults(run=run_sync, exit_at_once=True)

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
    profile.set_defaults(run=run_profile, exit_at_once=True)


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
    with start_up():
        from .target import sync_target

        engine, target = sync_target(
            args,
            args.db or settings.database_url,
            key_dir=settings.owner_key_path,
            store_process=True,
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

    with tempfile.TemporaryDirectory(prefix="mailpipe-profile-") as scratch:
        # a database of its own is thrown away with its key file; a given one keeps its owner's
        key_dir = settings.owner_key_path if args.db else Path(scratch) / "keys"
        with start_up():
            from mailpipe.profiler import Profiler, children_peak_bytes

            from .target import sync_target

            engine, target = sync_target(
                args,
                args.db or f"sqlite:///{scratch}/profile.db",
                key_dir=key_dir,
                store_process=True,
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
    profile["memory"]["store_process_peak_bytes"] = children_peak_bytes()
    if args.json:
        print(json.dumps({**result.to_json(), "profile": profile}))
    else:
        print(f"{summary(result)}\n{profile_summary(profile)}")
    return 0


def one_line_failure(command: str, error: Exception, *, host: str, debug: bool) -> int:
    from mailpipe.failures import classify

    if debug:
        import traceback

        traceback.print_exc()
    failure = classify(error, host=host)
    print(f"mailpipe: {command} failed ({failure.error_class}): {failure.message}", file=sys.stderr)
    return EXIT_FAILURE


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
    store = memory.get("store_process_peak_bytes") or 0
    beside = f", store process {store / 2**20:.1f} MiB (ru_maxrss)" if store else ""
    lines.append(
        f"run {profile['wall_seconds'] * 1000:.0f} ms wall, {profile['cpu_seconds'] * 1000:.0f} ms "
        f"CPU; peak memory {(memory['peak_bytes'] or 0) / 2**20:.1f} MiB ({memory['method']})"
        f"{beside}; {mail['fetched']} mails ({mail['fetched_bytes'] / 2**20:.1f} MiB) in "
        f"{mail['batches']} batch(es)"
    )
    return "\n".join(lines)
