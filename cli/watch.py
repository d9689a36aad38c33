"""`mailpipe watch`: one account synced now, then again whenever the server reports new mail."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailpipe.retry import RetryPolicy
    from mailpipe.settings import Settings
    from mailpipe.sync import SyncResult

    from .target import SyncTarget

from .common import EXIT_FAILURE, OutputLost, run_until_stopped, start_up
from .sync import one_line_failure, summary, sync_options

POLL_SECONDS = 60.0  # a server without IDLE is asked this often instead


def add_commands(commands: argparse._SubParsersAction) -> None:
    watch = commands.add_parser(
        "watch",
        help="sync one account, then again on every change the server reports (IMAP IDLE), "
        "until Ctrl-C",
    )
    sync_options(watch, db_help="database URL (default: MAILPIPE_DATABASE_URL or SQLite)")
    watch.set_defaults(run=run_watch)


def run_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Sync, then IDLE on the first named folder (INBOX by default) and sync on each change; a
    lost connection is opened again with backoff; Ctrl-C or SIGTERM end it with exit 0."""
    with start_up():
        from mailpipe.watcher import watched_folder

        from .target import sync_target

        engine, target = sync_target(
            args, args.db or settings.database_url, key_dir=settings.owner_key_path
        )

    def emit(result: SyncResult) -> None:
        print(json.dumps(result.to_json()) if args.json else summary(result), flush=True)

    try:
        run_until_stopped(
            watch(target, folder=watched_folder(args.folders), emit=emit, policy=settings.retry)
        )
    except (BrokenPipeError, OutputLost):
        # stdout was closed (`mailpipe watch --json | head -1`): say so once, not at exit again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("mailpipe: watch stopped: its output was closed", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # every failure becomes one line naming its cause
        return one_line_failure("watch", error, host=args.host, debug=settings.debug)
    finally:
        engine.dispose()
    return 0


async def watch(
    target: SyncTarget,
    *,
    folder: str,
    emit: Callable[[SyncResult], None],
    policy: RetryPolicy,
) -> None:
    """IDLE first, then sync: whatever arrives after the first sync began is reported by IDLE.

    The first connection's failure ends the command (as `mailpipe sync` would); later
    transient ones are retried with the retry policy's backoff and jitter.
    """
    import asyncio

    from mailpipe import idle

    failures = 0
    first = True
    while True:
        try:
            connection = await asyncio.to_thread(idle.open_idle, target.settings, folder)
        except idle.IdleUnsupported as error:
            print(f"mailpipe: {error}; polling every {POLL_SECONDS:.0f} s", file=sys.stderr)
            while True:
                emit(await asyncio.to_thread(target.sync))
                await asyncio.sleep(POLL_SECONDS)
        except Exception as error:
            failures = _retry_or_raise(error, first=first, failures=failures, target=target)
            await asyncio.sleep(policy.backoff_seconds(failures))
            continue
        try:
            await connection.start()
            emit(await asyncio.to_thread(target.sync))
            first, failures = False, 0
            while True:
                await connection.changes()
                emit(await asyncio.to_thread(target.sync))
        except (asyncio.CancelledError, BrokenPipeError, OutputLost):
            raise
        except Exception as error:
            failures = _retry_or_raise(error, first=first, failures=failures, target=target)
        finally:
            await connection.close()
        await asyncio.sleep(policy.backoff_seconds(failures))


def _retry_or_raise(error: Exception, *, first: bool, failures: int, target: SyncTarget) -> int:
    """One line on stderr and the next failure count, or the error again when it is final."""
    from mailpipe.failures import classify

    failure = classify(error, host=target.settings.host)
    if first or not failure.transient:
        raise error
    print(
        f"mailpipe: watch: {failure.message} ({failure.error_class}); connecting again",
        file=sys.stderr,
        flush=True,
    )
    return failures + 1
