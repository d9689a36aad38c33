"""diagnose_account: the full diagnostics of one account, run by a worker, read back by the web.

The message names a request and nothing else. The request row says whose account it is, and
the user's data key travels as a key grant sealed to the workers for that request alone,
dropped as soon as the report is stored (encrypted under the same key).
"""

from __future__ import annotations

import dramatiq
from sqlalchemy.orm import Session, sessionmaker

from actors import runtime
from actors.fetch import QUEUE
from actors.pipeline import JOB_GRANT_TTL_SECONDS
from mailpipe import diagnostics, grants
from mailpipe.crypto import DataKey

# Connect, STARTTLS and login, then about a dozen commands, each bounded by the diagnosis
# timeout; a lost connection skips the rest, so this is far more than a diagnosis needs.
TIME_LIMIT_MS = 120_000


@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=TIME_LIMIT_MS)
def diagnose_account(request_id: str) -> None:
    """Run one requested diagnosis; a diagnosis reports failures itself, so it is never retried."""
    diagnostics.run_requested(runtime.sessions(), request_id, private_key=runtime.private_key())


def request_diagnosis(
    sessions: sessionmaker[Session],
    *,
    user_id: int,
    account_id: int,
    key: DataKey,
    public_key: bytes | None = None,
    broker: dramatiq.Broker | None = None,
) -> str:
    """Record the request, seal the user's key for it and send the message; returns its id.

    `public_key` and `broker` default to the workers' key and the actor's broker; the web
    passes its pipeline's, so the check goes where the pipeline's fetches go.
    """
    with sessions.begin() as session:
        request_id = diagnostics.request_diagnosis(
            session,
            user_id=user_id,
            account_id=account_id,
            key=key,
            public_key=public_key or grants.worker_public_key(),
            ttl_seconds=JOB_GRANT_TTL_SECONDS,
        )
    (broker or diagnose_account.broker).enqueue(diagnose_account.message(request_id))
    return request_id
