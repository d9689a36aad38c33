"""Benchmark the orchestration on the real Redis broker, PostgreSQL and Dovecot, in one run.

Run from the repository root (as root, Dovecot installed): `python -m bench.pipeline`.

  enqueue    PipelineBroker.enqueue_fetch_job for one user with --enqueue-accounts accounts
             (default 10,000): job and run rows, the sealed key, one message per account into
             a Redis namespace of its own. Median of --runs.
  parallel   --accounts accounts (default 100) with --messages new messages each (default 100)
             behind a proxy adding --latency seconds each way (default 20 ms, a distant
             provider), fetched as one job by --processes worker processes (default 2) x
             --threads threads, after a warm-up job has booted every worker process; against
             the same job run by one worker process with one thread (one account after
             another), each into a fresh database. Every message must be stored exactly once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select

import broker_config  # noqa: F401  (the broker the actors of this process are declared on)
from actors import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import Email
from mailpipe.settings import Settings
from tests.support import postgres
from tests.support.cluster import running_cluster
from tests.support.dovecot import Dovecot
from tests.support.faultproxy import FaultProxy
from tests.support.workers import REDIS_URL, Workers, delete_namespace, new_namespace
from worker.broker import build_broker

FAST_KDF = 1_000
WAIT_SECONDS = 1800


def fresh(url_holder: list[str]):
    name = postgres.create_database()
    url_holder.append(name)
    url = postgres.database_url(postgres.ADMIN_URL, name)
    engine = db.make_engine(url)
    db.migrate(engine)
    return url, engine, db.session_factory(engine)


def bench_enqueue(args: argparse.Namespace, public_key: bytes) -> list[float]:
    """Seconds to enqueue one job covering many accounts, per run."""
    timings = []
    for _ in range(args.runs):
        made: list[str] = []
        namespace = new_namespace()
        _url, engine, sessions = fresh(made)
        try:
            with sessions.begin() as session:
                user, key = create_user(session, "bench", "pw", iterations=FAST_KDF)
                settings = ImapSettings(
                    host="127.0.0.1", username="x", password="y", security="none"
                )
                for _ in range(args.enqueue_accounts):
                    add_account(session, user, key, settings)
            settings = Settings(broker_url=REDIS_URL, redis_namespace=namespace)
            broker = build_broker(settings)
            pipeline = PipelineBroker(
                sessions, settings=settings, public_key=public_key, broker=broker
            )
            started = time.perf_counter()
            pipeline.enqueue_fetch_job(user.id, key=key)
            timings.append(time.perf_counter() - started)
            broker.close()
        finally:
            engine.dispose()
            delete_namespace(namespace)
            postgres.drop_database(made[0])
    return timings


def seed(server: Dovecot, args: argparse.Namespace) -> list[tuple[str, str]]:
    mailboxes = []
    for index in range(args.accounts):
        login, password = server.new_user()
        server.seed_maildir(login, args.messages, seed=index)
        mailboxes.append((login, password))
    return mailboxes


def setup_accounts(sessions, mailboxes, port: int) -> tuple[int, object, list[int]]:
    with sessions.begin() as session:
        user, key = create_user(session, "bench", "pw", iterations=FAST_KDF)
        ids = [
            add_account(
                session,
                user,
                key,
                ImapSettings(
                    host="127.0.0.1", port=port, username=login, password=pw, security="none"
                ),
            ).id
            for login, pw in mailboxes
        ]
    return user.id, key, ids


def stored(sessions) -> tuple[int, int]:
    with sessions() as session:
        total = session.scalar(select(func.count()).select_from(Email))
        distinct = session.scalar(
            select(func.count()).select_from(
                select(Email.account_id, Email.uid).distinct().subquery()
            )
        )
    return total, distinct


def bench_pipeline(
    mailboxes, port: int, workdir: Path, *, processes: int, threads: int
) -> tuple[float, tuple[int, int]]:
    """One job over every account, run by the given workers; seconds and (stored, distinct)."""
    # every benchmark account lives on one host; real accounts spread over many providers
    caps = {"MAILPIPE_MAX_CONNECTIONS_PER_HOST": str(max(64, processes * threads))}
    with running_cluster(
        None,
        Path(tempfile.mkdtemp(dir=workdir)),
        extra_env=caps,
        processes=processes,
        threads=threads,
    ) as cluster:
        user_id, key, ids = setup_accounts(cluster.sessions, mailboxes, port)
        pipeline = cluster.pipeline
        warm_up(pipeline, user_id, key, ids, cluster.workers)
        started = time.perf_counter()
        job_id = pipeline.enqueue_fetch_job(user_id, key=key, max_mails=None, timeout_seconds=600)
        deadline = time.monotonic() + WAIT_SECONDS
        while not pipeline.get_job_status(job_id, user_id).final:
            if time.monotonic() > deadline:
                raise RuntimeError("parallel job did not finish:\n" + cluster.workers.log()[-2000:])
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        status = pipeline.get_job_status(job_id, user_id).status
        if status != "success":
            raise RuntimeError(f"parallel job ended {status}")
        return elapsed, stored(cluster.sessions)


def warm_up(pipeline: PipelineBroker, user_id: int, key, ids: list[int], workers: Workers) -> None:
    """Let every worker process boot and connect before timing: one account, max one mail.

    The first message a worker process handles opens its database pool and checks the schema;
    a long-running worker pays that once, so the benchmark does not time it. The warmed-up
    account's first mail is stored here; the timed job finds the rest.
    """
    jobs = [
        pipeline.enqueue_fetch_job(user_id, ids[0], key=key, max_mails=1)
        for _ in range(workers.processes * 2)
    ]
    deadline = time.monotonic() + WAIT_SECONDS
    while not all(pipeline.get_job_status(job, user_id).final for job in jobs):
        if time.monotonic() > deadline:
            raise RuntimeError("warm-up did not finish:\n" + workers.log()[-2000:])
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--enqueue-accounts", type=int, default=10_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--only", default="enqueue,parallel")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as tmp:
        workdir = Path(tmp)
        public_key = grants.generate_worker_key(workdir / "enqueue.key")
        if "enqueue" in only:
            timings = bench_enqueue(args, public_key)
            print(
                f"enqueue of {args.enqueue_accounts} accounts: median "
                f"{statistics.median(timings):.3f} s over {len(timings)} runs "
                f"({', '.join(f'{t:.3f}' for t in timings)})"
            )
        if "parallel" in only:
            with Dovecot.start(Path(tempfile.gettempdir())) as server:
                mailboxes = seed(server, args)
                expected = args.accounts * args.messages
                with FaultProxy(upstream=(server.host, server.port)) as link:
                    link.latency(args.latency)
                    rows = []
                    for _ in range(args.runs):
                        seq, seq_count = bench_pipeline(
                            mailboxes, link.port, workdir, processes=1, threads=1
                        )
                        par, par_count = bench_pipeline(
                            mailboxes,
                            link.port,
                            workdir,
                            processes=args.processes,
                            threads=args.threads,
                        )
                        assert seq_count == (expected, expected), seq_count
                        assert par_count == (expected, expected), par_count
                        rows.append((seq, par))
                seq = statistics.median(r[0] for r in rows)
                par = statistics.median(r[1] for r in rows)
                pairs = ", ".join(f"{s:.2f}/{p:.2f}={s / p:.1f}x" for s, p in rows)
                print(
                    f"{args.accounts} accounts x {args.messages} messages, {args.latency * 1000:.0f} ms"
                    f" each way: one after another {seq:.2f} s, {args.processes} worker processes x "
                    f"{args.threads} threads {par:.2f} s, speed-up {seq / par:.1f}x "
                    f"(medians of {len(rows)}; runs side by side: {pairs}; "
                    "every message stored exactly once in both)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
