"""The `mailpipe` command: operator entry points over the core, with one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailpipe.errors import MailpipeError
from mailpipe.settings import Settings

from . import accounts, alerts, diagnose, jobs, keys, queue, serve, sync, users
from .common import EXIT_FAILURE, EXIT_USAGE, StrictParser

# In the order `mailpipe --help` lists them.
COMMAND_GROUPS = (sync, diagnose, users, accounts, jobs, queue, serve, keys, alerts)


def main(argv: Sequence[str] | None = None) -> int:
    """The `mailpipe` console script: the settings are read once, for the command that runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args, Settings.from_env()) or 0
    except KeyboardInterrupt:
        return 130
    except MailpipeError as error:
        print(f"mailpipe: {error}", file=sys.stderr)
        return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--password x` must not pass for `--password-env x`.
    parser = argparse.ArgumentParser(prog="mailpipe", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(title="commands", parser_class=StrictParser)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser
