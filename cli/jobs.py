"""`mailpipe jobs` and `mailpipe job`: fetch jobs and their per-account outcomes."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from mailpipe.errors import NotFound

if TYPE_CHECKING:
    from mailpipe.results import JobReport
    from mailpipe.settings import Settings

from .common import MAX_LIMIT, count, find_user, nonempty, open_database


def add_commands(commands: argparse._SubParsersAction) -> None:
    jobs_parser = commands.add_parser("jobs", help="recent fetch jobs")
    jobs_parser.add_argument("--user", required=True, type=nonempty)
    jobs_parser.add_argument("--limit", type=count(maximum=MAX_LIMIT), default=20)
    jobs_parser.add_argument("--json", action="store_true")
    jobs_parser.set_defaults(run=run_jobs)
    job = commands.add_parser("job", help="one job with per-account outcomes")
    job.add_argument("job_id", type=nonempty)
    job.add_argument("--user", type=nonempty, help="only if this user owns the job")
    job.add_argument("--json", action="store_true")
    job.set_defaults(run=run_job)


def run_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe import jobs

    sessions = open_database(settings)
    with sessions() as session:
        listed = jobs.list_jobs(session, find_user(session, args.user).id, args.limit)
    if args.json:
        print(json.dumps([job.to_json() for job in listed]))
        return 0
    for job in listed:
        why = f" ({job.reason})" if job.reason else ""
        print(
            f"{job.job_id}  {job.type:<9} {job.status + why:<30} "
            f"{job.emails_fetched:>6} mail(s)  {job.created_at.isoformat()}"
        )
    return 0


def run_job(args: argparse.Namespace, settings: Settings) -> int:
    from mailpipe import jobs
    from mailpipe.models import PipelineJob

    sessions = open_database(settings)
    with sessions() as session:
        owner = find_user(session, args.user).id if args.user else None
        if owner is None:
            found = session.get(PipelineJob, args.job_id)
            if found is None:
                raise NotFound(f"job {args.job_id} not found")
            owner = found.user_id
        status = jobs.job_status(session, args.job_id, owner)
    print(json.dumps(status.to_json()) if args.json else describe_job(status))
    return 0


def describe_job(status: JobReport) -> str:
    """A job in a few lines: status, then one line per account."""
    why = f" ({status.reason})" if status.reason else ""
    lines = [f"job {status.job_id}: {status.status}{why}, {status.emails_fetched} mail(s)"]
    for run in status.accounts:
        error = f" ({run.error_class}: {run.error})" if run.error_class else ""
        lines.append(
            f"  account {run.account_id} [{run.provider}]: {run.status}, "
            f"attempt {run.attempt}, saved {run.saved}{error}"
        )
    return "\n".join(lines)
