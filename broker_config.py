"""The worker process's entry point: `dramatiq broker_config actors` and `periodiq broker_config
actors` import this module to get the broker, then the actors declare themselves on it.

It is the one module that reads the environment when imported: `Settings.from_env()` once, the
broker built from those settings (middleware and their order: worker/broker.py) and made
Dramatiq's global broker, and the worker runtime configured with the same settings. Nothing in
the product imports it; host apps, the command line and the demo build their broker from their
own settings with `worker.broker.use_broker`.
"""

import dramatiq

from mailpipe import logs
from mailpipe.settings import Settings
from worker import runtime
from worker.broker import build_broker

SETTINGS = Settings.from_env()
logs.configure(SETTINGS.log_format)  # the format of the dramatiq CLI's log handlers
broker = build_broker(SETTINGS)
dramatiq.set_broker(broker)
runtime.configure(SETTINGS)
