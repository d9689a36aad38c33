"""`python -m demo [--once]` (what `make demo` runs): the demo, with one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailpipe.errors import MailpipeError
from mailpipe.settings import Settings

EXIT_FAILURE = 1
DEMO_EXTRA = ("pymap", "pysasl")  # what the `demo` extra installs, with what it pulls in
INSTALL_HINT = "pip install -e '.[demo]' from the checkout (make demo does)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--once", action="store_true", help="one round, a summary, then exit")
    args = parser.parse_args(argv)
    try:
        from demo.run import run_demo
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] not in DEMO_EXTRA:
            raise
        print(f"demo: {missing.name} is not installed: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return run_demo(Settings.from_env(), once=args.once)
    except KeyboardInterrupt:
        return 130
    except MailpipeError as error:
        print(f"demo: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
