"""Benchmark the command line's start-up against a bare Python start, side by side in one run.

Run from the repository root: `python -m bench.startup` (`make bench`).

For --runs rounds (7 by default), interleaved so that drift on a noisy machine hits all alike,
it times in a child process each of:
  python    the same Python importing argparse, and nothing else (the floor);
  help      `mailpipe --help`;
  sync-help `mailpipe sync --help` (the parser of the command that runs most);
  compare   with --compare CMD, that command's `--help` too (another checkout's `mailpipe`, for
            before-and-after figures side by side).
It prints each one's minimum and median wall milliseconds and the ratio of the minima to the
bare start's (the bar: `mailpipe --help` within 3x, minimum of 7 each), with the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BAR = 3.0  # `mailpipe --help` within this many times a bare Python start importing argparse


def mailpipe_command() -> list[str]:
    """The console script beside this Python, so the checkout's own copy runs."""
    beside = Path(sys.executable).with_name("mailpipe")
    return [str(beside)] if beside.exists() else [shutil.which("mailpipe") or "mailpipe"]


def timed(command: list[str]) -> float:
    """Wall seconds of one child, which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (minimum of N each)")
    parser.add_argument("--compare", metavar="CMD", help="another `mailpipe` to time as well")
    args = parser.parse_args(argv)
    mailpipe = mailpipe_command()
    targets = {
        "python": [sys.executable, "-c", "import argparse"],
        "help": [*mailpipe, "--help"],
        "sync-help": [*mailpipe, "sync", "--help"],
    }
    if args.compare:
        targets["compare"] = [args.compare, "--help"]
    for command in targets.values():  # warm the file cache: the first start reads from disk
        timed(command)
    seconds: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.runs):
        for name, command in targets.items():
            seconds[name].append(timed(command))
    floor = min(seconds["python"])
    print(f"start-up, {args.runs} runs each, load average {os.getloadavg()[0]:.2f}")
    print(f"{'target':<10}{'min ms':>9}{'median ms':>11}{'x python':>10}")
    for name, values in seconds.items():
        print(
            f"{name:<10}{min(values) * 1000:>9.1f}{statistics.median(values) * 1000:>11.1f}"
            f"{min(values) / floor:>10.2f}"
        )
    ratio = min(seconds["help"]) / floor
    verdict = "within" if ratio <= BAR else "NOT within"
    print(f"mailpipe --help: {ratio:.2f}x a bare start, {verdict} the {BAR:g}x bar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
