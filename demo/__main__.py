"""`python -m demo [--rounds N | --once]` (what `make demo` runs): the demo, with one-line
errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mailpipe.errors import MailpipeError
from mailpipe.settings import Settings

EXIT_FAILURE = 1
MAX_ROUNDS = 1_000
DEMO_EXTRA = ("pymap", "pysasl")  # what the `demo` extra installs, with what it pulls in
INSTALL_HINT = "pip install -e '.[demo]' from the checkout (make demo does)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument(
        "--rounds",
        type=_rounds,
        metavar="N",
        help="run N rounds without the dashboard, then exit 0 only if every one behaved as "
        "designed (default: rounds every 30 s with the dashboard, until Ctrl-C)",
    )
    runs.add_argument("--once", action="store_true", help="the same as --rounds 1")
    args = parser.parse_args(argv)
    rounds = 1 if args.once else args.rounds
    try:
        from demo.run import run_demo
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] not in DEMO_EXTRA:
            raise
        print(f"demo: {missing.name} is not installed: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        code = run_demo(Settings.from_env(), rounds=rounds)
        sys.stdout.flush()  # a closed output shows here at the latest, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output's reader went away: say so once, on stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("demo: the output could not be written: its reader closed it", file=sys.stderr)
        return EXIT_FAILURE
    except MailpipeError as error:
        print(f"demo: {error}", file=sys.stderr)
        return EXIT_FAILURE


def _rounds(text: str) -> int:
    try:
        rounds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of rounds, not {text!r}") from None
    if not 1 <= rounds <= MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_ROUNDS}, not {rounds}")
    return rounds


if __name__ == "__main__":
    sys.exit(main())
