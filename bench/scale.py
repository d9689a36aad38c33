"""Scale, run for real: many accounts through the scheduler, real workers, Redis, PostgreSQL, Dovecot.

Run from the repository root (as root; Dovecot, Redis and PostgreSQL as for the tests):
`python -m bench.scale [--accounts 10000] [--users 1000]` (`make bench` runs a small one).

A throwaway Dovecot holds --accounts users with --messages messages each; the accounts belong to
--users mailpipe users, each with a live background grant. `dramatiq broker_config actors` runs
--processes x --threads workers on Redis (a namespace of its own) and PostgreSQL (a database of
its own). This process is the scheduler: each round it makes every account due and runs the
product's tick (actors.schedule.schedule_due: claim, one scheduled job per user through
PipelineBroker). Round 1 is the initial sync, the next --polls rounds find nothing new. Then
`mailpipe watcher` processes (one per 5,000 accounts, the product's capacity) hold every
account in IMAP IDLE instead, watched for --watch-seconds.

Per round: accounts per second, CPU per account run by process group (worker processes,
PostgreSQL backends of this database, Redis, Dovecot and its children, the scheduler tick),
PostgreSQL transactions (pg_stat_database of this database) and Redis commands (INFO
commandstats: the Redis is shared, so other users' commands count too) per run, p50/p95/p99 run
duration from the runs table, queue depth sampled over time and each worker's RSS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import redis
from sqlalchemy import create_engine, func, select, update

from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, MailAccount
from mailpipe.vocabulary import RUN_FINAL
from mailpipe.watcher import WatchPolicy
from tests.support import postgres
from tests.support.dovecot import Dovecot, free_ports
from tests.support.policy import LOOPBACK_HOSTS
from tests.support.workers import REDIS_URL, Workers, delete_namespace, new_namespace

FAST_KDF = 1_000
BENCH_APP = "mailpipe-bench-scale"  # this process's own queries, left out of the backends' CPU
CLOCK = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.5
# One imap process serves many connections (a process each would be 10,000 processes for the
# watchers; service_count = 0 lets client_limit count); login processes as Debian ships them.
LIMITS = """
default_client_limit = 25000
default_vsz_limit = 1G
service imap {
  service_count = 0
  client_limit = 100
  process_limit = 400
}
service anvil {
  client_limit = 25000
}
"""


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and of the children it has reaped (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / CLOCK


def descendants(root: int) -> list[int]:
    """The process and every live process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def tree_cpu(root: int) -> float:
    """CPU of a process tree: each live member's own and its reaped children's, counted once."""
    return sum(proc_cpu(pid) for pid in descendants(root))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Probe:
    """Before/after readings of the processes, the database's and Redis's counters."""

    def __init__(self, *, database: str, namespace: str, roots: dict[str, list[int]]) -> None:
        self.database = database
        self.namespace = namespace
        self.roots = roots
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.admin = psycopg.connect(postgres.libpq_url(postgres.ADMIN_URL), autocommit=True)
        self.own_commands = 0  # our own commands to the shared Redis, taken off its count
        # every backend's CPU when last seen: pools close connections, and a backend's CPU
        # leaves with it (the sampler looks twice a second, so only a shorter life goes unseen)
        self.seen: dict[int, float] = {}
        self.lock = threading.Lock()

    def backends(self) -> dict[int, float]:
        with self.lock:
            rows = self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name <> %s",
                (self.database, BENCH_APP),
            ).fetchall()
        now = {pid: proc_cpu(pid) for (pid,) in rows}
        self.seen.update({pid: cpu for pid, cpu in now.items() if cpu})
        return now

    def xacts(self) -> tuple[int, int]:
        """Transactions and sessions (connections opened) of this database so far."""
        with self.lock:
            self.admin.execute("SELECT pg_stat_clear_snapshot()")
            row = self.admin.execute(
                "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database "
                "WHERE datname = %s",
                (self.database,),
            ).fetchone()
        return int(row[0]), int(row[1])

    def redis_cpu_and_calls(self) -> tuple[float, int]:
        cpu = self.redis.info("cpu")
        calls = sum(stat["calls"] for stat in self.redis.info("commandstats").values())
        self.own_commands += 2
        return cpu["used_cpu_sys"] + cpu["used_cpu_user"], calls

    def depth(self) -> int:
        self.own_commands += 1
        return int(self.redis.llen(f"{self.namespace}:fetch"))

    def cpu(self) -> dict:
        redis_cpu, calls = self.redis_cpu_and_calls()
        return {
            "groups": {
                name: sum(tree_cpu(pid) for pid in pids) for name, pids in self.roots.items()
            },
            "backends": {**self.seen, **self.backends()},
            "redis": redis_cpu,
            "calls": calls,
            "own": self.own_commands,
        }

    @staticmethod
    def spent(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds per process group between two readings."""
        spent = {
            name: after["groups"][name] - before["groups"].get(name, 0.0)
            for name in after["groups"]
        }
        spent["postgres"] = sum(
            cpu - before["backends"].get(pid, 0.0) for pid, cpu in after["backends"].items()
        )
        spent["redis"] = after["redis"] - before["redis"]
        return spent

    @staticmethod
    def commands(before: dict, after: dict) -> int:
        return after["calls"] - before["calls"] - (after["own"] - before["own"])

    def close(self) -> None:
        self.redis.close()
        self.admin.close()


class DepthSampler(threading.Thread):
    """The fetch queue's depth every SAMPLE_SECONDS while a round runs."""

    def __init__(self, probe: Probe) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while not self.done.is_set():
            self.samples.append((time.perf_counter() - started, self.probe.depth()))
            self.probe.backends()
            self.done.wait(SAMPLE_SECONDS)

    def series(self, points: int = 8) -> list[tuple[float, int]]:
        step = max(1, len(self.samples) // points)
        return self.samples[::step]


def setup(server: Dovecot, url: str, args: argparse.Namespace, public_key: bytes) -> None:
    """Dovecot users with a few messages, the mailpipe users and accounts, background grants."""
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    boxes = []
    for index in range(args.accounts):
        login, password = server.new_user()
        server.seed_maildir(login, args.messages, seed=index)
        boxes.append((login, password))
    per_user = -(-args.accounts // args.users)
    for number in range(args.users):
        mine = boxes[number * per_user : (number + 1) * per_user]
        if not mine:
            break
        with sessions.begin() as session:
            user, key = create_user(session, f"user{number}", "pw", iterations=FAST_KDF)
            for login, password in mine:
                settings = ImapSettings(
                    host=server.host,
                    port=server.port,
                    username=login,
                    password=password,
                    security="none",
                )
                add_account(session, user, key, settings)
            session.flush()
            grants.grant_background(
                session, user_id=user.id, key=key, public_key=public_key, ttl_seconds=86_400
            )
    engine.dispose()


def wait_for(condition, what: str, *, seconds: float, log=lambda: "") -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > seconds:
            raise RuntimeError(f"not in {seconds:.0f} s: {what}\n{log()[-2000:]}")
        time.sleep(SAMPLE_SECONDS)
    return time.perf_counter() - started


def run_round(name: str, ctx: dict, args: argparse.Namespace) -> dict:
    """Make every account due, run one scheduler tick, wait until every run is final."""
    engine, probe, workers = ctx["engine"], ctx["probe"], ctx["workers"]
    with engine.connect() as conn:
        mark = conn.scalar(select(func.coalesce(func.max(AccountRun.id), 0)))
        conn.execute(update(MailAccount).values(next_sync_at=None))
    ctx["own_xacts"] += 2
    before = probe.cpu()
    sampler = DepthSampler(probe)
    sampler.start()
    started = time.perf_counter()
    tick = time.thread_time()
    ctx["schedule_due"].fn()
    tick = time.thread_time() - tick

    def finished() -> bool:
        ctx["own_xacts"] += 1
        with engine.connect() as conn:
            done = conn.scalar(
                select(func.count())
                .select_from(AccountRun)
                .where(AccountRun.id > mark, AccountRun.status.in_(list(RUN_FINAL)))
            )
        return done >= args.accounts

    wait_for(finished, f"round {name}", seconds=args.timeout, log=workers.log)
    wall = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    after = probe.cpu()
    rss = [rss_mib(pid) for pid in workers.children()]
    with engine.connect() as conn:
        rows = conn.execute(
            select(AccountRun.status, AccountRun.duration, AccountRun.fetched).where(
                AccountRun.id > mark
            )
        ).all()
    ctx["own_xacts"] += 1
    xacts, sessions = settled_xacts(ctx, args)
    runs = len(rows)
    cpu = Probe.spent(before, after)
    cpu["scheduler"] = tick
    durations = [row.duration or 0.0 for row in rows]
    return {
        "round": name,
        "runs": runs,
        "statuses": {
            status.value: sum(1 for row in rows if row.status == status)
            for status in sorted(RUN_FINAL)
        },
        "fetched": sum(row.fetched for row in rows),
        "wall_s": wall,
        "accounts_per_s": runs / wall,
        "cpu_ms_per_run": {group: 1000 * seconds / runs for group, seconds in cpu.items()},
        "pg_xacts_per_run": xacts / runs,
        "pg_sessions_per_run": sessions / runs,
        "redis_commands_per_run": Probe.commands(before, after) / runs,
        "run_ms": {
            "p50": 1000 * percentile(durations, 0.50),
            "p95": 1000 * percentile(durations, 0.95),
            "p99": 1000 * percentile(durations, 0.99),
        },
        "queue_depth": sampler.series(),
        "max_queue_depth": max((depth for _t, depth in sampler.samples), default=0),
        "worker_rss_mib": rss,
    }


def settled_xacts(ctx: dict, args: argparse.Namespace) -> tuple[int, int]:
    """Transactions and sessions since the last call, once idle backends flushed their counts
    (up to 10 s after their last transaction)."""
    time.sleep(args.settle)
    xacts, sessions = ctx["probe"].xacts()
    spent = xacts - ctx["xacts"] - ctx["own_xacts"], sessions - ctx["sessions"]
    ctx["xacts"], ctx["sessions"], ctx["own_xacts"] = xacts, sessions, 0
    return spent


def held(port: int) -> int:
    """IDLE connections the watcher holds now, from its own /metrics."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return -1
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("mailpipe_idle_connections{")
        )
    )


def watch_round(ctx: dict, args: argparse.Namespace, seconds: float) -> dict:
    """The same accounts held in IDLE by `mailpipe watcher` processes, as many as the product's
    per-process capacity needs: CPU, memory, connections."""
    count = -(-args.accounts // WatchPolicy().capacity)
    ports = free_ports(count)
    log = open(ctx["scratch"] / "watcher.log", "wb")  # noqa: SIM115 - closed below
    watchers = [
        subprocess.Popen(
            [sys.executable, "-m", "cli", "watcher", "--metrics-port", str(port)],
            env=ctx["env"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for port in ports
    ]
    probe = ctx["probe"]
    probe.roots["watchers"] = [watcher.pid for watcher in watchers]

    def holding() -> int:
        return sum(held(port) for port in ports)

    try:
        connect = wait_for(
            lambda: holding() >= args.accounts,
            "the watchers hold every account",
            seconds=args.timeout,
            log=lambda: (ctx["scratch"] / "watcher.log").read_text(errors="replace"),
        )
        time.sleep(2)
        settled_xacts(ctx, args)
        before = probe.cpu()
        sampler = DepthSampler(probe)
        sampler.start()
        time.sleep(seconds)
        sampler.done.set()
        sampler.join()
        after = probe.cpu()
        xacts, sessions = settled_xacts(ctx, args)
        cpu = Probe.spent(before, after)
        dovecot = descendants(ctx["dovecot"])
        return {
            "accounts": args.accounts,
            "watchers": count,
            "held": holding(),
            "connect_s": connect,
            "window_s": seconds,
            "cpu_percent": {group: 100 * spent / seconds for group, spent in cpu.items()},
            "pg_xacts_per_s": xacts / seconds,
            "pg_sessions": sessions,
            "redis_commands_per_s": Probe.commands(before, after) / seconds,
            "watcher_rss_mib": [rss_mib(watcher.pid) for watcher in watchers],
            "watcher_fds": [len(os.listdir(f"/proc/{watcher.pid}/fd")) for watcher in watchers],
            "dovecot_processes": len(dovecot),
            "dovecot_rss_mib": sum(rss_mib(pid) for pid in dovecot),
            "pg_connections": len(probe.backends()),
        }
    finally:
        probe.roots.pop("watchers", None)
        for watcher in watchers:
            watcher.terminate()
        for watcher in watchers:
            watcher.wait(timeout=60)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--polls", type=int, default=2, help="no-change rounds after the first")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--watch-seconds", type=float, default=60.0, help="0: no watcher round")
    parser.add_argument("--settle", type=float, default=11.0, help="PostgreSQL flushes its counts")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.users <= args.accounts:
        parser.error("--users must be between 1 and --accounts")
    scratch = Path(tempfile.mkdtemp(prefix="mailpipe-bench-scale-"))
    namespace = new_namespace()
    database = postgres.create_database()
    url = postgres.database_url(postgres.ADMIN_URL, database)
    key_file = scratch / "worker.key"
    public_key = grants.generate_worker_key(key_file)
    env = {
        **os.environ,
        "MAILPIPE_DATABASE_URL": url,
        "MAILPIPE_BROKER_URL": REDIS_URL,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_WORKER_KEY_FILE": str(key_file),
        "MAILPIPE_DATA_DIR": str(scratch),
        "MAILPIPE_ALLOW_PRIVATE_HOSTS": LOOPBACK_HOSTS,
        # every account is on one host here; real accounts spread over many providers
        "MAILPIPE_MAX_CONNECTIONS_PER_HOST": str(args.accounts + 100),
        "TZ": "UTC",
    }
    os.environ.update(env)  # this process is the scheduler: broker_config reads the same
    importlib.import_module("broker_config")
    schedule_due = importlib.import_module("actors.schedule").schedule_due
    runtime = importlib.import_module("worker.runtime")
    workers = None
    probe = None
    engine = create_engine(
        url, connect_args={"application_name": BENCH_APP}, isolation_level="AUTOCOMMIT"
    )
    try:
        with Dovecot.start(Path(tempfile.gettempdir()), extra_config=LIMITS) as server:
            started = time.perf_counter()
            setup(server, url, args, public_key)
            made = time.perf_counter() - started
            runtime.sessions()  # the scheduler's pool and schema check, before any tick
            workers = Workers(env, processes=args.processes, threads=args.threads).start()
            wait_for(
                lambda: workers.log().count("Worker process is ready") >= args.processes,
                "the workers are ready",
                seconds=120,
                log=workers.log,
            )
            assert workers.process is not None
            probe = Probe(
                database=database,
                namespace=namespace,
                roots={"workers": [workers.process.pid], "dovecot": [server.pid or 0]},
            )
            ctx = {
                "engine": engine,
                "probe": probe,
                "workers": workers,
                "schedule_due": schedule_due,
                "scratch": scratch,
                "env": env,
                "dovecot": server.pid or 0,
                "xacts": 0,
                "sessions": 0,
                "own_xacts": 0,
            }
            settled_xacts(ctx, args)
            progress({"setup_s": made})
            rounds = [progress(run_round("initial", ctx, args))]
            rounds += [
                progress(run_round(f"poll {n}", ctx, args)) for n in range(1, args.polls + 1)
            ]
            watch = watch_round(ctx, args, args.watch_seconds) if args.watch_seconds else None
    finally:
        if workers is not None:
            workers.stop()
        if probe is not None:
            probe.close()
        engine.dispose()
        delete_namespace(namespace)
        postgres.drop_database(database)
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "accounts": args.accounts,
        "users": args.users,
        "messages": args.messages,
        "processes": args.processes,
        "threads": args.threads,
        "setup_s": made,
        "load": os.getloadavg(),
        "rounds": rounds,
        "watchers": watch,
    }
    print(json.dumps(report) if args.json else render(report))
    return 0


def progress(figures: dict) -> dict:
    """Each round's figures on stderr as soon as they are known (a long run can fail later)."""
    print(json.dumps(figures), file=sys.stderr, flush=True)
    return figures


def render(report: dict) -> str:
    lines = [
        f"{report['accounts']} accounts ({report['messages']} messages each) of "
        f"{report['users']} users; {report['processes']} worker processes x "
        f"{report['threads']} threads; set up in {report['setup_s']:.0f} s; load "
        + " ".join(f"{value:.2f}" for value in report["load"])
    ]
    for row in report["rounds"]:
        cpu = row["cpu_ms_per_run"]
        lines += [
            f"round {row['round']}: {row['runs']} runs {row['statuses']}, {row['fetched']} mails, "
            f"{row['wall_s']:.1f} s, {row['accounts_per_s']:.1f} accounts/s",
            "  CPU ms per run: "
            + ", ".join(f"{group} {value:.2f}" for group, value in cpu.items())
            + f" (total {sum(cpu.values()):.2f})",
            f"  per run: {row['pg_xacts_per_run']:.1f} PostgreSQL transactions "
            f"({row['pg_sessions_per_run']:.2f} connections opened), "
            f"{row['redis_commands_per_run']:.1f} Redis commands (shared Redis: others' count too)",
            "  run duration ms: "
            + ", ".join(f"{name} {value:.0f}" for name, value in row["run_ms"].items()),
            "  queue depth (s: messages): "
            + ", ".join(f"{at:.1f}: {depth}" for at, depth in row["queue_depth"])
            + f"; max {row['max_queue_depth']}",
            "  worker RSS MiB: " + ", ".join(f"{value:.0f}" for value in row["worker_rss_mib"]),
        ]
    watch = report["watchers"]
    if watch:
        lines += [
            f"{watch['watchers']} watcher(s) holding {watch['held']} of {watch['accounts']} "
            "accounts in IDLE "
            f"(all held {watch['connect_s']:.0f} s after start), over {watch['window_s']:.0f} s:",
            "  CPU % of a core: "
            + ", ".join(f"{group} {value:.2f}" for group, value in watch["cpu_percent"].items()),
            f"  {watch['pg_xacts_per_s']:.1f} PostgreSQL transactions/s "
            f"({watch['pg_sessions']} connections opened), "
            f"{watch['redis_commands_per_s']:.1f} Redis commands/s",
            "  watcher RSS MiB "
            + ", ".join(f"{value:.0f}" for value in watch["watcher_rss_mib"])
            + f", open files {watch['watcher_fds']}; "
            f"Dovecot {watch['dovecot_processes']} processes, {watch['dovecot_rss_mib']:.0f} MiB "
            f"RSS; {watch['pg_connections']} PostgreSQL connections",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
