"""The crash drill at scale: SIGKILL every worker process mid-sync, again and again.

Run from the repository root (as root, Dovecot installed, Redis and PostgreSQL running):
`python -m bench.crash --kills 20`.

It starts a Dovecot of its own, a cluster (Redis namespace, PostgreSQL database, `dramatiq`
worker processes) with redelivery after 1.5 s, and --accounts accounts behind a proxy adding
--latency seconds each way. Each round waits until a sync has a connection open, lets it run a
random while, SIGKILLs every worker process and starts new ones; new mail and a new fetch job
come whenever nothing is left to interrupt. At the end it waits for every job and prints the
figures: kills survived, messages lost and duplicated (both must be 0), jobs final, runs open.
Exit status 1 when anything was lost, doubled or left unfinished.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

from tests.support.cluster import running_cluster
from tests.support.crash import CRASH_ENV, PER_ROUND, Drill, kill_loop
from tests.support.dovecot import Dovecot
from tests.support.faultproxy import FaultProxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.crash", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--kills", type=int, default=20, help="kill rounds (default 20)")
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=PER_ROUND, help="new messages per account")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds each way")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="one line per kill")
    args = parser.parse_args(argv)
    log = print if args.verbose else (lambda _line: None)
    with (
        tempfile.TemporaryDirectory(prefix="mailpipe-crash-") as tmp,
        Dovecot.start(Path(tempfile.gettempdir())) as server,
        running_cluster(
            server,
            Path(tmp),
            extra_env=CRASH_ENV,
            processes=args.processes,
            threads=args.threads,
        ) as cluster,
        FaultProxy(upstream=(server.host, server.port)) as link,
    ):
        link.latency(args.latency)
        drill = Drill(cluster, port=link.port, accounts=args.accounts, rng=random.Random(args.seed))
        report = kill_loop(
            cluster, drill, link, kills=args.kills, per_round=args.per_round, log=log
        )
    print(f"crash drill: {report.line()}")
    healthy = (
        report.lost == 0
        and report.duplicates == 0
        and report.open_runs == 0
        and report.final_jobs == report.jobs
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
