"""Push latency: from APPEND to "saved" with `mailpipe watch`, on a real Dovecot (loopback).

Run from the repository root (as root, Dovecot installed): `python -m bench.push [--messages N]`
(`make bench`). It starts a throwaway Dovecot, runs `mailpipe watch --json` on one mailbox (SQLite),
waits for its first sync, then N times: APPEND one message over a connection already logged in
and wait for watch to print the sync that saved it. Latency is from just before the APPEND
command is sent to the moment the line is read: what a user of the assistant would wait. Prints
the median, p95 and the largest, and how the time splits into the sync itself (its own
"duration") and the rest. To tell the server's share of that rest from ours, it then times
--messages more APPENDs to the moment a bare `IdleConnection` reports EXISTS (no sync at all):
Dovecot 2.3 waits 500 ms after a change before it notifies IDLE clients (NOTIFY_DELAY_MSECS
in its index-mailbox-check.c), so that is the floor on this server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imapclient import IMAPClient

from mailpipe import idle
from mailpipe.imap import ImapSettings
from tests.support.dovecot import Dovecot
from tests.support.messages import plain_message

PASSWORD_ENV = "MAILPIPE_BENCH_PASSWORD"
TARGET_MEDIAN = 1.0  # seconds: the bar; 0.2 s is the aim


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    options = parser.parse_args()
    with (
        Dovecot.start(Path(tempfile.gettempdir())) as server,
        tempfile.TemporaryDirectory() as scratch,
    ):
        user, password = server.new_user()
        command = [
            sys.executable,
            "-m",
            "cli",
            "watch",
            *("--host", server.host, "--port", str(server.port), "--user", user),
            *("--password-env", PASSWORD_ENV, "--security", "none"),
            *("--db", f"sqlite:///{scratch}/push.db", "--json"),
        ]
        env = {**os.environ, PASSWORD_ENV: password}
        watch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        latencies: list[float] = []
        syncs: list[float] = []
        try:
            assert watch.stdout is not None
            json.loads(watch.stdout.readline())  # the first sync
            appender = IMAPClient(server.host, port=server.port, ssl=False)
            appender.login(user, password)
            for number in range(options.messages):
                time.sleep(0.05)  # one message at a time, as mail arrives
                started = time.perf_counter()
                appender.append("INBOX", plain_message(number))
                saved = 0
                while saved == 0:  # a sync that found nothing yet does not end the wait
                    report = json.loads(watch.stdout.readline())
                    saved += report["saved"]
                latencies.append(time.perf_counter() - started)
                syncs.append(report["duration"])
        finally:
            watch.terminate()
            watch.wait(timeout=30)
        settings = ImapSettings(
            host=server.host, port=server.port, username=user, password=password, security="none"
        )
        notices = asyncio.run(_notices(settings, appender, options.messages))
        appender.logout()
    median = statistics.median(latencies)
    print(f"mailpipe watch, {len(latencies)} messages, APPEND to saved (loopback Dovecot):")
    print(
        f"  median {median * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms (target: median under {TARGET_MEDIAN:.0f} s)"
    )
    sync_median = statistics.median(syncs)
    print(
        f"  of which the sync itself: median {sync_median * 1000:.0f} ms; "
        f"notice and wake-up: {(median - sync_median) * 1000:.0f} ms"
    )
    print(
        f"  the server's notice alone (APPEND to EXISTS on a bare IDLE connection): median "
        f"{statistics.median(notices) * 1000:.0f} ms, p95 {percentile(notices, 0.95) * 1000:.0f} ms"
    )
    return 0 if median < TARGET_MEDIAN else 1


async def _notices(settings: ImapSettings, appender: IMAPClient, count: int) -> list[float]:
    """APPEND to EXISTS, with nothing of mailpipe's but the IDLE client in between."""
    connection = await asyncio.to_thread(idle.open_idle, settings)
    await connection.start()
    notices = []
    for number in range(count):
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await asyncio.to_thread(appender.append, "INBOX", plain_message(1000 + number))
        await connection.changes()
        notices.append(time.perf_counter() - started)
    await connection.close()
    return notices


if __name__ == "__main__":
    raise SystemExit(main())
