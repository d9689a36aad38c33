"""Push at scale: one `mailpipe watcher` process with many IDLE connections, and its latency.

Run from the repository root (as root; Dovecot, Redis and PostgreSQL as for the tests):
`python -m bench.watcher [--accounts 1000] [--messages 50]` (`make bench`).

A throwaway Dovecot (process limits raised), a watcher process and a real `dramatiq` worker on
Redis, PostgreSQL. Every account's synced position is stored first, so connecting starts no run.

Latency first, with only its own account watched: --messages messages, one at a time, over a
connection already logged in, each timed from just before the APPEND to the moment its row is in
the database, stored by the worker that the watcher's push run went to. (Measured before the
other accounts connect: each Dovecot IMAP process takes an inotify instance, and past
fs.inotify.max_user_instances, 128 by default, Dovecot falls back to looking every
mailbox_idle_check_interval, 30 s, which would be measured instead of mailpipe.)

Scale: then a second user's --accounts accounts are granted. It reports the watcher's RSS before
and after it holds them (per connection: the difference over the count), its CPU over 30 s of
idling, the time to hold all of them, and the time until all are back after Dovecot restarts
(the watcher's default backoff: 1 s doubling, with jitter).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from imapclient import IMAPClient
from sqlalchemy import func, select

from mailpipe import db, grants, names
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import Email, FolderState
from tests.support import postgres
from tests.support.dovecot import Dovecot, free_ports
from tests.support.messages import plain_message
from tests.support.workers import REDIS_URL, Workers, delete_namespace, new_namespace

LIMITS = """
default_client_limit = 4000
service imap {
  process_limit = 2200
}
service anvil {
  client_limit = 4500
}
"""
IDLE_SECONDS = 30.0
WAIT = 600.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def held(port: int) -> int:
    """IDLE connections the watcher holds now, from its own /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mailpipe_idle_connections{")
        )
    )


def wait_for(condition, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > WAIT:
            raise RuntimeError(f"not in {WAIT:.0f} s: {what}")
        time.sleep(0.05)
    return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50)
    options = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mailpipe-bench-watcher-"))
    namespace = new_namespace()
    name = postgres.create_database()
    url = postgres.database_url(postgres.ADMIN_URL, name)
    [metrics_port] = free_ports(1)
    with Dovecot.start(Path(tempfile.gettempdir()), extra_config=LIMITS) as server:
        boxes = [server.new_user() for _ in range(options.accounts)]
        latency_box = server.new_user()
        key_file = scratch / "worker.key"
        public_key = grants.generate_worker_key(key_file)
        engine = db.make_engine(url)
        db.migrate(engine)
        sessions = db.session_factory(engine)
        with sessions.begin() as session:
            first, first_key = create_user(session, "latency", "pw", iterations=1000)
            [latency_account] = _accounts(session, first, first_key, server, [latency_box])
            user, key = create_user(session, "bench", "pw", iterations=1000)
            _accounts(session, user, key, server, boxes)
            first_id, user_id = first.id, user.id
        env = {
            **os.environ,
            "MAILPIPE_DATABASE_URL": url,
            "MAILPIPE_BROKER_URL": REDIS_URL,
            "MAILPIPE_REDIS_NAMESPACE": namespace,
            "MAILPIPE_WORKER_KEY_FILE": str(key_file),
            "MAILPIPE_DATA_DIR": str(scratch),
            "MAILPIPE_WATCH_LEASE_SECONDS": "8",
            "MAILPIPE_MAX_CONNECTIONS_PER_HOST": str(options.accounts + 50),
            "TZ": "UTC",
        }
        log = open(scratch / "watcher.log", "wb")  # noqa: SIM115
        watcher = subprocess.Popen(
            [sys.executable, "-m", "cli", "watcher", "--metrics-port", str(metrics_port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        workers = Workers(env, processes=1, threads=4).start()
        try:
            wait_for(lambda: _answers(metrics_port), "the watcher's /metrics")
            with sessions.begin() as session:
                grants.grant_background(
                    session,
                    user_id=first_id,
                    key=first_key,
                    public_key=public_key,
                    ttl_seconds=7200,
                )
            wait_for(lambda: held(metrics_port) == 1, "the latency account connected")
            latencies = _latency(server, latency_box, sessions, latency_account, options.messages)
            print(
                f"APPEND to stored through watcher + worker, {len(latencies)} messages: "
                f"median {statistics.median(latencies) * 1000:.0f} ms, "
                f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
            )
            time.sleep(2)
            before = rss_kib(watcher.pid)
            with sessions.begin() as session:
                grants.grant_background(
                    session, user_id=user_id, key=key, public_key=public_key, ttl_seconds=7200
                )
            total = options.accounts + 1
            connect = wait_for(lambda: held(metrics_port) == total, "all connected")
            time.sleep(2)
            after = rss_kib(watcher.pid)
            cpu = cpu_seconds(watcher.pid)
            time.sleep(IDLE_SECONDS)
            idle_cpu = (cpu_seconds(watcher.pid) - cpu) / IDLE_SECONDS
            print(
                f"watcher with {options.accounts} IDLE connections (one process, loopback Dovecot):"
            )
            print(
                f"  RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after: "
                f"{(after - before) / options.accounts:.1f} KiB per connection"
            )
            print(f"  CPU while idle: {idle_cpu * 100:.2f} % of one core over {IDLE_SECONDS:.0f} s")
            print(f"  all connected in {connect:.1f} s after the grant")

            server.restart()
            back = wait_for(lambda: held(metrics_port) == total, "all back")
            print(f"  all {total} back {back:.1f} s after Dovecot restarted")
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(timeout=60)
            workers.stop()
            log.close()
            engine.dispose()
            delete_namespace(namespace)
            postgres.drop_database(name)
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _accounts(session, user, key, server, boxes) -> list[int]:
    """Accounts as if synced once: an empty INBOX's UIDNEXT is 1, so connecting starts no run."""
    found = []
    for login, password in boxes:
        settings = ImapSettings(
            host=server.host, port=server.port, username=login, password=password, security="none"
        )
        account = add_account(session, user, key, settings)
        session.flush()
        name = names.state_columns(key, account_id=account.id, folder="INBOX")
        session.add(FolderState(account_id=account.id, uidvalidity=1, uidnext=1, **name))
        found.append(account.id)
    return found


def _answers(port: int) -> bool:
    try:
        held(port)
    except OSError:
        return False
    return True


def _latency(server, box, sessions, account_id: int, messages: int) -> list[float]:
    login, password = box
    appender = IMAPClient(server.host, port=server.port, ssl=False)
    appender.login(login, password)

    def stored() -> int:
        with sessions() as session:
            return session.scalar(select(func.count()).where(Email.account_id == account_id)) or 0

    latencies = []
    for number in range(messages):
        time.sleep(0.3)  # one message at a time, as mail arrives
        count = stored()
        started = time.perf_counter()
        appender.append("INBOX", plain_message(number))
        while stored() == count:
            time.sleep(0.005)
        latencies.append(time.perf_counter() - started)
    appender.logout()
    return latencies


if __name__ == "__main__":
    raise SystemExit(main())
