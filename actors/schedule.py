"""schedule_due: every minute, enqueue the accounts whose background sync is due.

periodiq has no locking: two schedulers both fire. The core's claim lets only one enqueue each
account; this actor only enqueues ordinary fetch jobs, so retries never meet periodiq's skip.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import dramatiq
from periodiq import cron

from mailpipe import grants, jobs, schedule
from mailpipe.diagnostics import requests
from mailpipe.errors import NotFound
from mailpipe.models import utcnow
from mailpipe.runner import end_lost_runs
from worker import runtime

logger = logging.getLogger(__name__)
PURGE_BATCHES = 50  # at most 250,000 old jobs deleted per tick


@dramatiq.actor(queue_name="schedule", periodic=cron("* * * * *"), max_retries=0)
def schedule_due() -> None:
    """End runs whose message was lost, claim due accounts, start one scheduled job per user for
    them; delete expired key grants (a sealed key should not outlive its use) and jobs and
    diagnoses finished longer ago than the retention."""
    from actors.pipeline import PipelineBroker

    settings = runtime.settings()
    sessions = runtime.sessions()
    # Runs whose message is gone (Redis lost its data, a restored database) would keep their
    # accounts from being claimed for good; a job older than its key grant's life is past use.
    lost = end_lost_runs(
        sessions, created_before=utcnow() - timedelta(seconds=settings.job_grant_ttl_seconds)
    )
    if lost:
        logger.warning("ended %d runs whose queue message was lost", lost)
    with sessions.begin() as session:
        claimed = schedule.claim_due_accounts(session)
    pipeline = PipelineBroker(sessions, settings=settings)
    for user_id, account_ids in claimed.items():
        try:
            pipeline.enqueue_scheduled_job(user_id, account_ids)
        except NotFound:
            logger.info("background grant of a user ended before enqueue; skipped")
    with sessions.begin() as session:
        purged = grants.purge_expired(session)
    before = utcnow() - timedelta(days=settings.job_retention_days)
    retired = 0
    for _ in range(PURGE_BATCHES):  # short transactions; what is left waits for the next tick
        with sessions.begin() as session:
            deleted = jobs.purge_finished(session, before=before)
        retired += deleted
        if deleted < jobs.PURGE_BATCH:
            break
    with sessions.begin() as session:
        diagnoses = requests.purge_finished(session, before=before)
    if purged or retired or diagnoses:
        logger.info(
            "deleted %d expired key grants, %d old finished jobs and %d old diagnoses",
            purged,
            retired,
            diagnoses,
        )
