"""diagnose_account: the full diagnostics of one account, run by a worker, read back by the web
(`PipelineBroker.request_diagnosis` sends it).

The message names a request and nothing else. The request row says whose account it is, and
the user's data key travels as a key grant sealed to the workers for that request alone,
dropped as soon as the report is stored (encrypted under the same key).
"""

from __future__ import annotations

import dramatiq

from actors.fetch import QUEUE
from mailpipe import diagnostics
from worker import runtime

# Connect, STARTTLS and login, then about a dozen commands, each bounded by the diagnosis
# timeout; a lost connection skips the rest, so this is far more than a diagnosis needs.
TIME_LIMIT_MS = 120_000


@dramatiq.actor(queue_name=QUEUE, max_retries=0, time_limit=TIME_LIMIT_MS)
def diagnose_account(request_id: str) -> None:
    """Run one requested diagnosis; a diagnosis reports failures itself, so it is never retried."""
    diagnostics.run_requested(
        runtime.sessions(),
        request_id,
        private_key=runtime.private_key(),
        policy=runtime.settings().address_policy,
        oauth2_providers=runtime.settings().oauth2_providers,
    )
