"""Dramatiq actors: thin wrappers that hand each message to the core and record the outcome.

`dramatiq broker_config actors` and `periodiq broker_config actors` load this package.
"""

import broker_config  # noqa: F401  (the broker and its middleware come before any actor)
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
