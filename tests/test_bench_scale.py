"""bench.scale, run tiny: its report counts what happened, so the big run's figures can be trusted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.workers import ROOT

pytestmark = [pytest.mark.dovecot, pytest.mark.postgres]
ACCOUNTS = 3


def test_scale_bench_counts_every_run_and_measures_every_process() -> None:
    """Given 3 Dovecot accounts of 2 users, real workers, Redis and PostgreSQL,
    when bench.scale runs an initial round, one poll round and a short watcher round,
    then each round counts one successful run per account (mail only in the first), every
    process group used CPU, the database and Redis did work per run, the percentiles are
    ordered, each worker's RSS is reported and the watcher held every account."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            "--accounts",
            str(ACCOUNTS),
            "--users",
            "2",
            "--polls",
            "1",
            "--watch-seconds",
            "1",
            "--settle",
            "0",
            "--timeout",
            "60",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    initial, poll = report["rounds"]
    for row in (initial, poll):
        assert row["runs"] == ACCOUNTS
        assert row["statuses"] == {"failed": 0, "skipped": 0, "success": ACCOUNTS}
        assert row["accounts_per_s"] == pytest.approx(ACCOUNTS / row["wall_s"])
        assert {"workers", "dovecot", "postgres", "redis", "scheduler"} <= set(
            row["cpu_ms_per_run"]
        )
        assert row["cpu_ms_per_run"]["workers"] > 0
        assert row["cpu_ms_per_run"]["scheduler"] > 0
        assert row["redis_commands_per_run"] > 0
        assert row["run_ms"]["p50"] <= row["run_ms"]["p95"] <= row["run_ms"]["p99"]
        assert len(row["worker_rss_mib"]) == 2
        assert all(rss > 10 for rss in row["worker_rss_mib"])
    assert initial["fetched"] == ACCOUNTS * report["messages"]
    assert poll["fetched"] == 0
    watch = report["watchers"]
    assert watch["held"] == ACCOUNTS
    assert all(rss > 10 for rss in watch["watcher_rss_mib"])
    assert sum(watch["watcher_fds"]) >= ACCOUNTS
