"""Round trips of a no-change poll across a 40 ms round trip: this checkout, and another beside it.

Run from the repository root (as root, Dovecot installed): `python -m bench.roundtrips` (`make
bench`). It seeds one folder with a few messages and puts ../shared/bench/latency_proxy.py (20 ms
each way) in front of Dovecot, with the tests' counting proxy (tests/support/turnproxy.py, no
delay of its own) in front of that to see the round trips on the wire. Then `mailpipe sync
--json` of the same account, each checkout into its own database, syncs once and polls --runs
times, before and after taking turns. It prints the medians of the sync's own wall time (the
`duration` of its --json, so Python's start-up and the owner's key derivation stay out), of the
round trips the wire showed, and of those the sync reported (`round_trips`), once on the plain
port, once on the implicit-TLS one (TLS 1.3). With `--before DIR` (an older checkout, e.g. a
`git worktree` of main) both take turns and the ratio after/before is printed, measured side by
side in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.dovecot import Dovecot, free_ports
from tests.support.turnproxy import TurnProxy

HERE = Path(__file__).resolve().parent.parent
LATENCY_PROXY = HERE.parent / "shared" / "bench" / "latency_proxy.py"
ONE_WAY_MS = 20.0
PASSWORD_ENV = "BENCH_IMAP_PASSWORD"
SYNC_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> int:
    """Seed, put the proxies up, run both checkouts' polls in turn and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.roundtrips", description=__doc__)
    parser.add_argument("--runs", type=int, default=7, help="polls per checkout (default 7)")
    parser.add_argument("--before", type=Path, help="an older checkout to poll beside this one")
    parser.add_argument("--messages", type=int, default=20, help="messages in the folder")
    args = parser.parse_args(argv)
    checkouts = {"before": args.before, "after": HERE} if args.before else {"after": HERE}
    for name, root in checkouts.items():
        if not (root / "cli").is_dir():
            print(f"bench.roundtrips: no checkout for {name} at {root}", file=sys.stderr)
            return 2
    with (
        tempfile.TemporaryDirectory(prefix="mailpipe-roundtrips-") as scratch,
        Dovecot.start(Path(tempfile.gettempdir())) as server,
    ):
        user, password = server.new_user()
        server.seed_maildir(user, args.messages)
        account = Account(user, password, str(server.ca_file), Path(scratch))
        tables = {
            security: _through_proxies(checkouts, account, security, upstream, args.runs)
            for security, upstream in (("none", server.port), ("tls", server.tls_port))
        }
    for security, figures in tables.items():
        _print(security, figures, args.runs)
    return 0


@dataclass(frozen=True)
class Account:
    """The one Dovecot account both checkouts poll, and where their databases go."""

    user: str
    password: str
    ca_file: str
    scratch: Path


def _through_proxies(
    checkouts: dict[str, Path], account: Account, security: str, upstream: int, runs: int
) -> dict[str, dict[str, list[float]]]:
    """The latency proxy in front of Dovecot's port, the counting proxy in front of that."""
    [port] = free_ports(1)
    latency = subprocess.Popen(
        [
            sys.executable,
            str(LATENCY_PROXY),
            "--listen",
            f"127.0.0.1:{port}",
            "--to",
            f"127.0.0.1:{upstream}",
            "--delay-ms",
            str(ONE_WAY_MS),
        ]
    )
    try:
        _wait_listening(port)
        with TurnProxy(upstream=("127.0.0.1", port)) as counter:
            return _measure(checkouts, counter, account, security, runs)
    finally:
        latency.terminate()
        latency.wait(10)


def _measure(
    checkouts: dict[str, Path], counter: TurnProxy, account: Account, security: str, runs: int
) -> dict[str, dict[str, list[float]]]:
    """Sync once per checkout, then poll each in turn; wall, wire and reported round trips."""
    figures: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "wire": [], "reported": []} for name in checkouts
    }
    for name, root in checkouts.items():  # the first sync fills each checkout's database
        _sync(root, counter.port, account, security, f"{name}-{security}.db")
    for _ in range(runs):
        for name, root in checkouts.items():
            counter.clear()
            report = _sync(root, counter.port, account, security, f"{name}-{security}.db")
            [wire] = counter.turns()
            if report["fetched"] or not all(f["unchanged"] for f in report["folders"]):
                raise SystemExit(f"bench.roundtrips: {name}'s poll found changes")
            figures[name]["wall"].append(report["duration"])
            figures[name]["wire"].append(wire)
            if "round_trips" in report:
                figures[name]["reported"].append(report["round_trips"])
    return figures


def _sync(root: Path, port: int, account: Account, security: str, database: str) -> dict:
    """`mailpipe sync --json` from a checkout, with that checkout's code."""
    command = [sys.executable, "-m", "cli", "sync", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--user", account.user, "--password-env", PASSWORD_ENV, "--security", security]
    command += ["--ca-file", account.ca_file, "--json"]
    command += ["--db", f"sqlite:///{account.scratch / database}"]
    env = {**os.environ, PASSWORD_ENV: account.password, "MAILPIPE_DATA_DIR": str(account.scratch)}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=SYNC_TIMEOUT
    )
    if done.returncode != 0:
        raise SystemExit(f"bench.roundtrips: sync in {root} failed: {done.stderr.strip()}")
    report: dict = json.loads(done.stdout)
    return report


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until the latency proxy accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench.roundtrips: the latency proxy did not start")


def _print(security: str, figures: dict[str, dict[str, list[float]]], runs: int) -> None:
    load = os.getloadavg()
    print(
        f"no-change poll, --security {security}, across {2 * ONE_WAY_MS:.0f} ms RTT "
        f"(latency_proxy.py), median of {runs}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"{'':8} {'wall s':>8} {'RTT x':>7} {'wire':>6} {'reported':>9}")
    medians: dict[str, tuple[float, float]] = {}
    for name, values in figures.items():
        wall, wire = statistics.median(values["wall"]), statistics.median(values["wire"])
        reported = statistics.median(values["reported"]) if values["reported"] else None
        medians[name] = (wall, wire)
        shown = "-" if reported is None else f"{reported:g}"
        rtt = wall / (2 * ONE_WAY_MS / 1000)
        print(f"{name:8} {wall:8.3f} {rtt:7.2f} {wire:6g} {shown:>9}")
    if "before" in medians:
        (wall_b, wire_b), (wall_a, wire_a) = medians["before"], medians["after"]
        print(f"after/before: wall {wall_a / wall_b:.2f}x, round trips {wire_a / wire_b:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
