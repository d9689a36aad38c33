"""Dramatiq actors: thin wrappers that hand each message to the core and record the outcome.

`dramatiq broker_config actors` and `periodiq broker_config actors` load this package. Importing
it declares the actors on Dramatiq's global broker, so that broker comes first: broker_config
sets it in worker processes, `worker.broker.use_broker(settings)` anywhere else.
"""

import dramatiq

if dramatiq.broker.global_broker is None:
    raise ImportError(
        "set the broker before importing actors: worker.broker.use_broker(settings), "
        "or import broker_config in a worker process"
    )

from actors.diagnose import diagnose_account
from actors.fetch import fetch_account, fetch_exhausted
from actors.pipeline import PipelineBroker
from actors.schedule import schedule_due

__all__ = [
    "PipelineBroker",
    "diagnose_account",
    "fetch_account",
    "fetch_exhausted",
    "schedule_due",
]
