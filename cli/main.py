"""The `mailpipe` command: operator entry points over the core, with one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from mailpipe.errors import MailpipeError

from . import accounts, alerts, demo, diagnose, jobs, keys, queue, serve, sync, users, watch
from .common import EXIT_FAILURE, EXIT_USAGE, OutputLost, StrictParser

# In the order `mailpipe --help` lists them.
COMMAND_GROUPS = (sync, watch, diagnose, users, accounts, jobs, queue, serve, keys, alerts, demo)


def main(argv: Sequence[str] | None = None) -> int:
    """The `mailpipe` console script: the settings are read once, for the command that runs."""
    stdout = sys.stdout
    sys.stdout = GuardedOutput(stdout)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, or a bad command line already said on stderr
            sys.stdout.flush()
            return done.code if isinstance(done.code, int) else EXIT_USAGE
        if not hasattr(args, "run"):
            parser.print_help()
            sys.stdout.flush()
            return EXIT_USAGE
        code = _run(args)
        sys.stdout.flush()  # a closed or full output shows here at the latest, not at exit
        if argv is None and getattr(args, "exit_at_once", False):
            _exit_at_once(code)
        return code
    except KeyboardInterrupt:
        return 130
    except OutputLost as lost:
        return _output_lost(lost.error, stdout)
    finally:
        sys.stdout = stdout


class GuardedOutput:
    """Standard output that tells a failed write (`| head -1`, a full disk) apart from any
    other OSError, so it can be said in one line instead of a traceback."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise OutputLost(error) from error

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise OutputLost(error) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _run(args: argparse.Namespace) -> int:
    """Run the command; any failure but a lost output is one line naming its cause."""
    from mailpipe.settings import Settings  # not for --help or a bad command line

    settings = None
    try:
        settings = Settings.from_env()
        return args.run(args, settings) or 0
    except MailpipeError as error:
        _say(f"mailpipe: {error}")
        return EXIT_FAILURE
    except (OutputLost, KeyboardInterrupt):
        raise
    except Exception as error:  # never a traceback, unless MAILPIPE_DEBUG asks for one
        if settings is not None and settings.debug:
            import traceback

            traceback.print_exc()
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        _say(f"mailpipe: unexpected error ({type(error).__name__}): {cause}")
        return EXIT_FAILURE


def _exit_at_once(code: int) -> NoReturn:
    """End the `mailpipe` process now that a one-shot command is done (its database closed,
    its threads joined, its output flushed): tearing down SQLAlchemy and the rest module by
    module would add about 0.2 s to every run (bench/sync.py)."""
    logging = sys.modules.get("logging")  # loaded by the command if it logs: flush its handlers
    if logging is not None:
        logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _output_lost(error: OSError, stdout: TextIO) -> int:
    """Say once, on stderr, that the output could not be written; keep exit from trying again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
    why = "its reader closed it" if error.errno == errno.EPIPE else os.strerror(error.errno or 0)
    _say(f"mailpipe: the output could not be written: {why}")
    return EXIT_FAILURE


def _say(line: str) -> None:
    """One line on stderr, even when stderr itself is gone."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--password x` must not pass for `--password-env x`.
    parser = StrictParser(prog="mailpipe", description=__doc__)
    commands = parser.add_subparsers(title="commands", parser_class=StrictParser)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser
