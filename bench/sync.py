"""Benchmark `mailpipe sync` against the raw imapclient floor, on a real Dovecot, in one run.

Run from the repository root (as root, Dovecot installed): `python -m bench.sync` (`make bench`).

It starts a throwaway Dovecot (tests/support/dovecot.py), seeds one mailbox with --messages
synthetic messages, warms Dovecot's index with one untimed raw fetch, then for each of --runs
repetitions times, each in its own child process:
  raw       imapclient alone: login, SELECT readonly, UID SEARCH ALL, FETCH BODY.PEEK[] FLAGS
            INTERNALDATE in batches of 500, nothing parsed or stored (the Python floor);
  initial   `mailpipe sync ... --json` into a fresh database (SQLite file, or a PostgreSQL
            database created for the run and dropped after it with --postgres);
  no-change the same command again on that database: nothing new to fetch.
Targets are interleaved run by run so drift on a noisy machine hits all alike (with --compare,
another checkout's `mailpipe` too, for before-and-after figures side by side). It prints the
median wall seconds, messages/s, peak RSS of the child (os.wait4's ru_maxrss), the ratio to
raw, and mailpipe's own in-process "duration" from its JSON (the no-change one in ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import postgres
from tests.support.dovecot import Dovecot

PASSWORD_ENV = "MAILPIPE_BENCH_PASSWORD"
BATCH = 500
CHILD_TIMEOUT = 1800.0
TARGETS = ("raw", "sqlite", "postgres")

RAW = r"""
import os, sys
from imapclient import IMAPClient
host, port, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
batch = int(sys.argv[4])
c = IMAPClient(host, port=port, ssl=False)
c.login(user, os.environ["MAILPIPE_BENCH_PASSWORD"])
c.select_folder("INBOX", readonly=True)
uids = c.search("ALL")
n = 0
for i in range(0, len(uids), batch):
    n += len(c.fetch(uids[i:i + batch], ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"]))
c.logout()
print(n)
"""


@dataclass
class Child:
    """What one timed child process did."""

    seconds: float
    max_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Row:
    """The measurements of one target across runs, or why it has none."""

    name: str
    seconds: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    counts_messages: bool = True
    error: str | None = None


def run_child(argv: list[str], *, env: dict[str, str], workdir: Path) -> Child:
    """Run argv to completion; wall time and the child's own peak RSS come from os.wait4."""
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        watchdog = threading.Timer(CHILD_TIMEOUT, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Child(
        seconds=seconds,
        max_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        returncode=process.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def find_mailpipe(explicit: str | None) -> str | None:
    """The mailpipe command of this interpreter's environment, else the one on PATH."""
    if explicit:
        return explicit
    beside = Path(sys.prefix) / "bin" / "mailpipe"
    return str(beside) if beside.exists() else shutil.which("mailpipe")


def failure(child: Child) -> str:
    """One line saying how a child failed."""
    tail = (child.stderr.strip() or child.stdout.strip())[-400:]
    return f"failed (exit {child.returncode}): {tail}"


def raw_count(child: Child) -> int | None:
    """The message count the raw program prints last, if it printed one."""
    words = child.stdout.split()
    return int(words[-1]) if words and words[-1].isdigit() else None


def record(row: Row, child: Child, *, result: dict | None = None) -> None:
    """Add one successful measurement to a row."""
    row.seconds.append(child.seconds)
    row.rss_mb.append(child.max_rss_mb)
    if result is not None:
        row.durations.append(float(result["duration"]))
        row.phases.append({k: float(v) for k, v in result.get("phases", {}).items()})


class Bench:
    """One benchmark session: a seeded Dovecot plus the commands to time against it."""

    def __init__(self, args: argparse.Namespace, server: Dovecot, workdir: Path) -> None:
        """Keep what every run needs."""
        self.args = args
        self.server = server
        self.workdir = workdir
        self.user, self.password = server.new_user()
        self.env = {**os.environ, PASSWORD_ENV: self.password}
        self.env.pop("MAILPIPE_DATABASE_URL", None)
        self.env["MAILPIPE_OWNER_KEY_DIR"] = str(workdir / "keys")  # the owners' key files
        self.mailpipe = find_mailpipe(args.mailpipe)

    def raw_argv(self) -> list[str]:
        """The raw imapclient fetch as a child command."""
        s = self.server
        return [self.args.python, "-c", RAW, s.host, str(s.port), self.user, str(BATCH)]

    def sync_argv(self, db_url: str, command: str) -> list[str]:
        """`mailpipe sync` of the seeded account into db_url."""
        s = self.server
        return [
            command,
            "sync",
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--user",
            self.user,
            "--password-env",
            PASSWORD_ENV,
            "--security",
            "none",
            "--db",
            db_url,
            "--json",
        ]

    def run_raw(self, row: Row, expected: int) -> None:
        """Time one raw fetch and check it saw every message."""
        child = run_child(self.raw_argv(), env=self.env, workdir=self.workdir)
        if child.returncode != 0:
            row.error = failure(child)
        elif (count := raw_count(child)) != expected:
            row.error = f"fetched {count} of {expected} messages"
        else:
            record(row, child)

    @contextlib.contextmanager
    def fresh_database(self, backend: str) -> Iterator[str]:
        """A new empty database URL for one run, removed (file) or dropped (PostgreSQL) after."""
        if backend == "sqlite":
            directory = Path(tempfile.mkdtemp(dir=self.workdir))
            try:
                yield f"sqlite:///{directory / 'mailpipe.db'}"
            finally:
                shutil.rmtree(directory)
            return
        name = postgres.create_database(self.args.pg_admin_url)
        try:
            yield postgres.database_url(self.args.pg_admin_url, name)
        finally:
            postgres.drop_database(name, self.args.pg_admin_url)

    def run_mailpipe(
        self,
        backend: str,
        initial: Row,
        nochange: Row,
        expected: int,
        *,
        command: str | None = None,
    ) -> None:
        """Time an initial sync into a fresh database, then a no-change re-sync of it."""
        command = command or self.mailpipe
        if command is None:
            initial.error = nochange.error = "mailpipe command not found (pip install -e .)"
            return
        with self.fresh_database(backend) as db_url:
            for row, want in ((initial, expected), (nochange, 0)):
                child = run_child(
                    self.sync_argv(db_url, command), env=self.env, workdir=self.workdir
                )
                if child.returncode != 0:
                    row.error = failure(child)
                    return
                try:
                    result = json.loads(child.stdout)
                except json.JSONDecodeError:
                    row.error = f"output is not one JSON object: {child.stdout[-300:]!r}"
                    return
                if result.get("fetched") != want:
                    row.error = f"fetched {result.get('fetched')}, expected {want}: {result}"
                    return
                record(row, child, result=result)

    def warm_up(self) -> int:
        """One untimed raw fetch: Dovecot indexes the fresh Maildir and the page cache fills."""
        child = run_child(self.raw_argv(), env=self.env, workdir=self.workdir)
        if child.returncode != 0:
            raise SystemExit(f"warm-up fetch {failure(child)}")
        return raw_count(child)


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(values)


def print_table(rows: list[Row], *, messages: int, header: str) -> None:
    """Median seconds, msg/s, peak RSS, ratio to raw and in-process duration per target."""
    raw = next((r for r in rows if r.name.startswith("raw") and r.seconds), None)
    raw_median = median(raw.seconds) if raw else None
    print(header)
    print(
        f"{'what':30} {'median s':>9} {'msg/s':>8} {'peak RSS MB':>12} {'x raw':>7} {'in-process':>11}"
    )
    for row in rows:
        if row.error or not row.seconds:
            print(f"{row.name:30} {row.error or 'not run'}")
            continue
        secs = median(row.seconds)
        rate = f"{messages / secs:8.0f}" if row.counts_messages else f"{'-':>8}"
        ratio = f"{secs / raw_median:7.2f}" if raw_median else f"{'?':>7}"
        inproc = ""
        if row.durations:
            d = median(row.durations)
            inproc = f"{d * 1000:8.0f} ms" if not row.counts_messages else f"{d:9.2f} s"
        print(f"{row.name:30} {secs:9.2f} {rate} {max(row.rss_mb):12.1f} {ratio} {inproc:>11}")
    for row in rows:
        if row.phases and not row.error:
            names = list(dict.fromkeys(k for p in row.phases for k in p))
            parts = [
                f"{n} {median([p.get(n, 0.0) for p in row.phases]) * 1000:.0f} ms" for n in names
            ]
            print(f"  phases, {row.name}: {', '.join(parts)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; all keyword-style flags."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.sync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=10_000, help="mailbox size (10000)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are shown (3)")
    parser.add_argument(
        "--only",
        default="raw,sqlite",
        help=f"comma-separated targets out of {','.join(TARGETS)} (default raw,sqlite)",
    )
    parser.add_argument("--postgres", action="store_true", help="also sync into PostgreSQL")
    parser.add_argument("--pg-admin-url", default=postgres.ADMIN_URL, help="server to use")
    parser.add_argument("--mailpipe", help="mailpipe command (default: this venv's, then PATH)")
    parser.add_argument(
        "--compare",
        metavar="COMMAND",
        help="another mailpipe command (an older checkout's) timed run by run beside ours",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the raw fetch")
    parser.add_argument("--seed", type=int, default=1, help="message generator seed")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    if args.postgres and "postgres" not in targets:
        targets.append("postgres")
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        parser.error(f"--only: unknown target(s) {sorted(unknown)}; choose from {TARGETS}")
    if args.messages < 1 or args.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    args.targets = targets
    return args


def main(argv: list[str] | None = None) -> int:
    """Seed, warm up, time every target run by run, print the table; exit 1 if any failed."""
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
    try:
        with Dovecot.start(Path(tempfile.gettempdir())) as server:
            bench = Bench(args, server, workdir)
            started = time.perf_counter()
            size = server.seed_maildir(bench.user, args.messages, seed=args.seed)
            seeded = time.perf_counter() - started
            print(
                f"seeded {args.messages} messages ({size / 1e6:.1f} MB) in {seeded:.1f} s; "
                f"mailpipe: {bench.mailpipe or 'not found'}",
                flush=True,
            )
            count = bench.warm_up()
            if count != args.messages:
                raise SystemExit(f"warm-up fetched {count} of {args.messages} messages")
            rows: dict[str, Row] = {}
            if "raw" in args.targets:
                rows["raw"] = Row("raw imapclient FETCH")
            for backend in ("sqlite", "postgres"):
                if backend in args.targets:
                    rows[f"{backend}-initial"] = Row(f"mailpipe initial ({backend})")
                    rows[f"{backend}-nochange"] = Row(
                        f"mailpipe no-change ({backend})", counts_messages=False
                    )
                    if args.compare:
                        rows[f"{backend}-compare-initial"] = Row(f"compared initial ({backend})")
                        rows[f"{backend}-compare-nochange"] = Row(
                            f"compared no-change ({backend})", counts_messages=False
                        )
            for run in range(args.runs):
                if "raw" in rows and not rows["raw"].error:
                    bench.run_raw(rows["raw"], args.messages)
                for backend in ("sqlite", "postgres"):
                    initial = rows.get(f"{backend}-initial")
                    nochange = rows.get(f"{backend}-nochange")
                    if initial and nochange and not (initial.error or nochange.error):
                        bench.run_mailpipe(backend, initial, nochange, args.messages)
                    initial = rows.get(f"{backend}-compare-initial")
                    nochange = rows.get(f"{backend}-compare-nochange")
                    if initial and nochange and not (initial.error or nochange.error):
                        bench.run_mailpipe(
                            backend, initial, nochange, args.messages, command=args.compare
                        )
                print(f"run {run + 1}/{args.runs} done", flush=True)
            version = subprocess.run(
                ["/usr/sbin/dovecot", "--version"], capture_output=True, text=True, check=False
            ).stdout.split(" ")[0]
            header = (
                f"\n{args.messages} messages ({size / 1e6:.1f} MB), median of {args.runs} runs, "
                f"Dovecot {version} on loopback, Python {platform.python_version()}"
            )
            print_table(list(rows.values()), messages=args.messages, header=header)
            return 1 if any(r.error for r in rows.values()) else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
