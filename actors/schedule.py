"""schedule_due: every minute, enqueue the accounts whose background sync is due.

periodiq has no locking: two schedulers both fire. The core's claim lets only one enqueue each
account; this actor only enqueues ordinary fetch jobs, so retries never meet periodiq's skip.
"""

from __future__ import annotations

import logging

import dramatiq
from periodiq import cron

from actors import runtime
from mailpipe import grants, schedule
from mailpipe.errors import NotFound

logger = logging.getLogger(__name__)


@dramatiq.actor(queue_name="schedule", periodic=cron("* * * * *"), max_retries=0)
def schedule_due() -> None:
    """Claim due accounts, start one scheduled job per user for them, and delete expired key
    grants (a sealed key should not outlive its use)."""
    from actors.pipeline import PipelineBroker

    sessions = runtime.sessions()
    with sessions.begin() as session:
        claimed = schedule.claim_due_accounts(session)
    pipeline = PipelineBroker(sessions)
    for user_id, account_ids in claimed.items():
        try:
            pipeline.enqueue_scheduled_job(user_id, account_ids)
        except NotFound:
            logger.info("background grant of a user ended before enqueue; skipped")
    with sessions.begin() as session:
        purged = grants.purge_expired(session)
    if purged:
        logger.info("deleted %d expired key grants", purged)
