"""Cost of the structured log events: one `account_run` event, dropped, as text and as JSON.

Run from the repository root: `python -m bench.logs [--runs N] [--events N]`. Each variant logs
the same event (a successful run's phases and counts) N times into a handler on /dev/null, the
variants interleaved run by run so drift on a noisy machine hits all alike. Prints each run, the
median microseconds per event, and each variant's ratio to the event being dropped (the logger
below INFO, as in a process that configured no logging).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from mailpipe import logs

VARIANTS = ("dropped", "text", "json")
PHASES = {
    "connect": 0.0137,
    "diagnostics": 0.00004,
    "folder_list": 0.00001,
    "fetch": 0.0037,
    "parse": 0.0002,
    "process": 0.0073,
    "save": 0.0178,
    "disconnect": 0.0012,
}
COUNTS = {"fetched": 3, "fetched_bytes": 474, "saved": 3, "duplicates": 0, "quarantined": 0}


def one_run(variant: str, events: int, sink: logging.Handler) -> float:
    """Microseconds per event for `events` events under `variant`."""
    logger = logs.logger
    logger.handlers = [] if variant == "dropped" else [sink]
    logger.propagate = False
    logger.setLevel(logging.WARNING if variant == "dropped" else logging.INFO)
    sink.setFormatter(
        logs.JsonFormatter() if variant == "json" else logging.Formatter(logs.TEXT_FORMAT)
    )
    started = time.perf_counter()
    for number in range(events):
        logs.account_run(
            job_id="0123456789abcdef0123456789abcdef",
            account_id=number,
            attempt=1,
            status="success",
            provider="gmx",
            duration_seconds=0.1435,
            phases=PHASES,
            counts=COUNTS,
        )
    return (time.perf_counter() - started) / events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        sink = logging.StreamHandler(devnull)
        results: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for run in range(args.runs):
            order = VARIANTS if run % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                results[variant].append(one_run(variant, args.events, sink))
            print(f"run {run + 1}: " + ", ".join(f"{v} {results[v][-1]:.2f} us" for v in VARIANTS))
    medians = {variant: statistics.median(values) for variant, values in results.items()}
    print(f"\nmedian of {args.runs} runs of {args.events} account_run events:")
    print("| variant | us per event | x dropped |\n|---|---|---|")
    for variant in VARIANTS:
        print(
            f"| {variant} | {medians[variant]:.2f} | {medians[variant] / medians['dropped']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
