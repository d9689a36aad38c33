"""`mailpipe demo`: the checkout's demo (`python -m demo`), run in a child process.

The demo is a development package beside this one in the source checkout, not installed with
mailpipe, and nothing imports it: this command finds it on disk and runs it with the checkout
on PYTHONPATH, as `make demo` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError

from .common import count

if TYPE_CHECKING:
    from mailpipe.settings import Settings

CHECKOUT = Path(__file__).resolve().parents[1]  # where cli/ sits; demo/ sits beside it there
MAX_ROUNDS = 1_000
NO_CHECKOUT = (
    "the demo runs from a source checkout of mailpipe, which this installation is not: "
    "clone the repository and run `make demo` there"
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="the demo from the source checkout (what `make demo` runs)"
    )
    demo.add_argument(
        "--rounds",
        type=count(maximum=MAX_ROUNDS),
        metavar="N",
        help="run N rounds, then exit 0 only if every one behaved as designed "
        "(default: a round every 30 s with the dashboard, until Ctrl-C)",
    )
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    """`python -m demo` from the checkout this command was installed from (editable install)."""
    if not (CHECKOUT / "demo" / "__main__.py").is_file():
        raise MailpipeError(NO_CHECKOUT)
    import subprocess

    path = os.pathsep.join(filter(None, (str(CHECKOUT), os.environ.get("PYTHONPATH"))))
    command = [sys.executable, "-m", "demo"]
    if args.rounds is not None:
        command += ["--rounds", str(args.rounds)]
    try:
        return subprocess.run(command, env={**os.environ, "PYTHONPATH": path}).returncode
    except KeyboardInterrupt:  # the demo got the same Ctrl-C and has stopped
        return 130
