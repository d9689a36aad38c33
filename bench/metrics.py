"""Metrics overhead: the 10,000-message initial sync with the metrics observer on and off.

Run from the repository root: `python -m bench.metrics [--runs N] [--messages N]`. Both variants
run as child processes into fresh SQLite databases, interleaved run by run (on, off, off, on, ...)
so drift on a noisy machine hits both alike; metrics run in prometheus_client's multiprocess mode,
as in the workers. Prints each run, the medians and the overhead in percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.dovecot import Dovecot

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
from mailpipe import db
from mailpipe.accounts import add_account, create_user
from mailpipe.addresses import AddressPolicy
from mailpipe.imap import ImapSettings
from mailpipe.sync import sync_account
spec = json.loads(sys.argv[1])
observer = None
if spec["metrics"]:
    from metrics.observer import MetricsObserver
    observer = MetricsObserver(provider="other")
engine = db.make_engine(spec["db"])
db.migrate(engine)
sessions = db.session_factory(engine)
with sessions.begin() as session:
    user, key = create_user(session, "bench", "pw", iterations=1000)
    settings = ImapSettings(host=spec["host"], port=spec["port"], username=spec["user"],
                            password=spec["password"], security="none")
    account_id = add_account(session, user, key, settings).id
started = time.perf_counter()
policy = AddressPolicy(allow=(spec["host"],))  # the benchmark's own Dovecot
result = sync_account(sessions, account_id=account_id, key=key, observer=observer, policy=policy)
print(json.dumps({"wall": time.perf_counter() - started, "saved": result.saved}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args(argv)
    with Dovecot.start(Path(tempfile.gettempdir())) as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        user, password = server.new_user()
        server.seed_maildir(user, args.messages)
        walls: dict[bool, list[float]] = {True: [], False: []}
        for run in range(args.runs):
            for metrics in (True, False) if run % 2 == 0 else (False, True):
                multiproc = work / f"prom-{run}-{metrics}"
                multiproc.mkdir()
                env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
                env["dramatiq_prom_db"] = str(multiproc)
                spec = {
                    "metrics": metrics,
                    "db": f"sqlite:///{work / f'run-{run}-{metrics}.db'}",
                    "host": server.host,
                    "port": server.port,
                    "user": user,
                    "password": password,
                }
                child = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(spec)],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(child.stdout.strip().splitlines()[-1])
                if result["saved"] != args.messages:
                    raise RuntimeError(f"stored {result['saved']} of {args.messages}")
                walls[metrics].append(result["wall"])
                print(f"run {run + 1} metrics {'on ' if metrics else 'off'} {result['wall']:.3f} s")
        on, off = statistics.median(walls[True]), statistics.median(walls[False])
        print(
            f"initial sync of {args.messages} messages, median of {args.runs}: metrics on "
            f"{on:.3f} s, off {off:.3f} s, overhead {100 * (on / off - 1):+.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
