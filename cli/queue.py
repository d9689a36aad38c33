"""The commands that need the broker: `mailpipe fetch`, `worker`, `scheduler` and `watcher`.

They load the broker and the actors only when they run, so the other commands start without
them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import time
from typing import TYPE_CHECKING

from mailpipe.errors import MailpipeError

from .common import (
    MAX_PORT,
    MAX_PROCESSES,
    count,
    nonempty,
    open_database,
    password_option,
    row_id,
    run_until_stopped,
    unlock,
)
from .jobs import describe_job

if TYPE_CHECKING:
    from actors.pipeline import PipelineBroker
    from mailpipe.results import JobReport
    from mailpipe.settings import Settings

POLL_SECONDS = 0.2
MAX_MAILS = 1_000_000
WATCHER_METRICS_PORT = 9192
MAX_JOB_SECONDS = 3600  # mailpipe.jobs.MAX_TIMEOUT_SECONDS, without loading it for a parser


def add_commands(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser("fetch", help="enqueue a fetch job for one or all accounts")
    fetch.add_argument("--user", required=True, type=nonempty)
    password_option(fetch)
    fetch.add_argument("--account", type=row_id, dest="account_id")
    fetch.add_argument("--max-mails", type=count(maximum=MAX_MAILS), default=100)
    fetch.add_argument(
        "--timeout",
        type=count(maximum=MAX_JOB_SECONDS),
        default=120,
        help="seconds for the job",
    )
    fetch.add_argument("--wait", action="store_true", help="wait for the final status")
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(run=run_fetch)

    worker = commands.add_parser(
        "worker", help="run Dramatiq workers (dramatiq broker_config actors)"
    )
    worker.add_argument(
        "--processes", type=count(maximum=MAX_PROCESSES), default=os.cpu_count() or 1
    )
    worker.add_argument("--threads", type=count(maximum=MAX_PROCESSES), default=8)
    worker.add_argument("extra", nargs="*", help="more options for dramatiq, after --")
    worker.set_defaults(run=run_worker)

    scheduler = commands.add_parser("scheduler", help="run the periodic scheduler (periodiq)")
    scheduler.set_defaults(run=run_scheduler)

    watcher = commands.add_parser(
        "watcher",
        help="hold IMAP IDLE connections and start a fetch run when new mail arrives (push)",
    )
    watcher.add_argument(
        "--metrics-port",
        type=count(minimum=0, maximum=MAX_PORT),
        default=WATCHER_METRICS_PORT,
        help="serve this watcher's /metrics here (0: not at all)",
    )
    watcher.add_argument("--metrics-host", default="0.0.0.0")
    watcher.set_defaults(run=run_watcher)


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    """Enqueue a job; with --wait, follow it to its final status (exit 1 unless success).

    On the embedded broker this process is the worker too, so its jobs run only with --wait.
    """
    from mailpipe import grants
    from mailpipe.vocabulary import JobStatus
    from worker.broker import use_broker
    from worker.embedded import embedded_worker

    sessions = open_database(settings)
    user, key = unlock(sessions, args.user, args.password_env, key_dir=settings.owner_key_path)
    broker = use_broker(settings)
    from actors.pipeline import PipelineBroker  # declares the actors on that broker

    pipeline = PipelineBroker(sessions, settings=settings, broker=broker)
    if settings.embedded and not args.wait:
        grants.ensure_worker_key(settings.worker_key_path, configured=settings.worker_public_key)
    with (
        embedded_worker(settings, sessions=sessions, broker=broker)
        if settings.embedded and args.wait
        else contextlib.nullcontext()
    ):
        job_id = pipeline.enqueue_fetch_job(
            user.id,
            args.account_id,
            key=key,
            max_mails=args.max_mails,
            timeout_seconds=args.timeout,
        )
        if not args.wait:
            print(json.dumps({"job_id": job_id}) if args.json else job_id)
            if settings.embedded:
                print("note: the embedded broker runs jobs only with --wait", file=sys.stderr)
            return 0
        status = wait_for(pipeline, job_id, user.id, seconds=args.timeout * 5 + 30)
    print(json.dumps(status.to_json()) if args.json else describe_job(status))
    return 0 if status.status == JobStatus.SUCCESS else 1


def wait_for(pipeline: PipelineBroker, job_id: str, user_id: int, *, seconds: float) -> JobReport:
    """Poll the job record until it is final."""
    deadline = time.monotonic() + seconds
    while True:
        status = pipeline.get_job_status(job_id, user_id)
        if status.final:
            return status
        if time.monotonic() > deadline:
            raise MailpipeError(f"job {job_id} is still {status.status} after {seconds:.0f} s")
        time.sleep(POLL_SECONDS)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Exec the stock Dramatiq CLI on our broker and actors, with UTC and sane defaults."""
    if settings.embedded:
        raise MailpipeError("workers need a shared broker: set MAILPIPE_BROKER_URL=redis://...")
    from metrics import multiprocess

    multiprocess.prepare()  # empties PROMETHEUS_MULTIPROC_DIR, points dramatiq_prom_db at it
    command = [
        _tool("dramatiq"),
        "broker_config",
        "actors",
        "--processes",
        str(args.processes),
        "--threads",
        str(args.threads),
        *args.extra,
    ]
    os.execvpe(command[0], command, {**os.environ, "TZ": "UTC"})


def run_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    """Exec periodiq, which sends the periodic scheduling message every minute (in UTC)."""
    if settings.embedded:
        raise MailpipeError("the scheduler needs a shared broker: set MAILPIPE_BROKER_URL")
    command = [_tool("periodiq"), "broker_config", "actors"]
    os.execvpe(command[0], command, {**os.environ, "TZ": "UTC"})


def run_watcher(args: argparse.Namespace, settings: Settings) -> int:
    """Watch the push accounts this process gets leases on, until Ctrl-C or SIGTERM; runs go
    to the workers through the broker (on the embedded broker, to a worker in this process)."""
    from mailpipe import grants
    from mailpipe.watcher import Watcher, owner_name
    from metrics.observer import WatchMetrics
    from worker import runtime
    from worker.broker import use_broker
    from worker.embedded import embedded_worker

    sessions = open_database(settings)
    broker = use_broker(settings)
    from actors.pipeline import PipelineBroker  # declares the actors on that broker

    pipeline = PipelineBroker(sessions, settings=settings, broker=broker)
    slots = None
    if not settings.embedded:  # IDLE connections count against the hosts' connection caps
        runtime.configure(settings, sessions=sessions)
        slots = runtime.IdleSlots(ttl_ms=int(settings.watch.lease_seconds * 1000))
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host)
    with (
        embedded_worker(settings, sessions=sessions, broker=broker)
        if settings.embedded
        else contextlib.nullcontext()
    ):
        watcher = Watcher(
            sessions,
            owner=owner_name(socket.gethostname(), os.getpid()),
            private_key=grants.load_private_key(settings.worker_key_path),
            enqueue=lambda user, accounts, noticed: pipeline.enqueue_push_job(
                user, accounts, noticed_at=noticed
            ),
            retry=settings.retry,
            policy=settings.watch,
            address_policy=settings.address_policy,
            observer=WatchMetrics(),
            slots=slots,
            oauth2_providers=settings.oauth2_providers,
        )
        run_until_stopped(watcher.run())
    return 0


def _tool(name: str) -> str:
    """The console script installed beside this Python, so the venv's own copy runs."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)
