"""The directory forked worker processes share their metrics through, prepared before they start.

prometheus_client chooses multiprocess storage when it is first imported, from
`PROMETHEUS_MULTIPROC_DIR`; Dramatiq's Prometheus middleware writes to `dramatiq_prom_db`. Both
must name one directory, set before Python starts, and it must be emptied when workers start:
files of an earlier run would otherwise add their counts to this one's.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from mailpipe.errors import MailpipeError

DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
DRAMATIQ_ENV = "dramatiq_prom_db"
FILE_PATTERN = "*.db"  # prometheus_client names its files <kind>_<pid>.db


def directory(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """The shared directory, or None when metrics stay in each process (embedded use, tests)."""
    value = environ.get(DIRECTORY_ENV)
    return Path(value) if value else None


def prepare(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Empty the directory and point Dramatiq's middleware at it; call before exec'ing workers.

    Only prometheus_client's own files are removed, so a mistaken path loses nothing else.
    """
    path = directory(environ)
    if path is None:
        return None
    dramatiq_path = environ.setdefault(DRAMATIQ_ENV, str(path))
    if Path(dramatiq_path).resolve() != path.resolve():
        raise MailpipeError(
            f"{DRAMATIQ_ENV}={dramatiq_path} must name the same directory as {DIRECTORY_ENV}={path}"
        )
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(FILE_PATTERN):
        stale.unlink(missing_ok=True)
    return path
