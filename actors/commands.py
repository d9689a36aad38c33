"""The `mailpipe` commands that need the broker: fetch, worker and scheduler."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import dramatiq
from dramatiq.brokers.stub import StubBroker

import broker_config
from actors.pipeline import PipelineBroker
from mailpipe import grants
from mailpipe.cli import describe_job, sessions_from_env, unlock
from mailpipe.errors import MailpipeError
from mailpipe.results import JobReport
from mailpipe.vocabulary import JobStatus

POLL_SECONDS = 0.2
EMBEDDED_WORKER_THREADS = 8


def run_fetch(args: argparse.Namespace) -> int:
    """Enqueue a job; with --wait, follow it to its final status (exit 1 unless success)."""
    sessions = sessions_from_env()
    user, key = unlock(sessions, args.user, args.password_env)
    embedded = isinstance(broker_config.broker, StubBroker)
    if embedded:
        grants.ensure_worker_key()  # this process is the worker too
    pipeline = PipelineBroker(sessions)
    worker = None
    if embedded and args.wait:
        worker = dramatiq.Worker(broker_config.broker, worker_threads=EMBEDDED_WORKER_THREADS)
        worker.start()
    try:
        job_id = pipeline.enqueue_fetch_job(
            user.id,
            args.account_id,
            key=key,
            max_mails=args.max_mails,
            timeout_seconds=args.timeout,
        )
        if not args.wait:
            print(json.dumps({"job_id": job_id}) if args.json else job_id)
            if embedded:
                print("note: the embedded broker runs jobs only with --wait", file=sys.stderr)
            return 0
        status = wait_for(pipeline, job_id, user.id, seconds=args.timeout * 5 + 30)
    finally:
        if worker is not None:
            worker.stop()
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


def run_worker(args: argparse.Namespace) -> int:
    """Exec the stock Dramatiq CLI on our broker and actors, with UTC and sane defaults."""
    if broker_config.BROKER_URL == "stub":
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


def run_scheduler(args: argparse.Namespace) -> int:
    """Exec periodiq, which sends the periodic scheduling message every minute (in UTC)."""
    if broker_config.BROKER_URL == "stub":
        raise MailpipeError("the scheduler needs a shared broker: set MAILPIPE_BROKER_URL")
    command = [_tool("periodiq"), "broker_config", "actors"]
    os.execvpe(command[0], command, {**os.environ, "TZ": "UTC"})


def _tool(name: str) -> str:
    """The console script installed beside this Python, so the venv's own copy runs."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def run_demo(args: argparse.Namespace) -> int:
    from actors.demo import run_demo as demo

    return demo(once=args.once)
