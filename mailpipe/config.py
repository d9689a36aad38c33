"""Settings read from the environment, with embedded defaults that need no services."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = "data"


def data_dir() -> Path:
    """Where embedded state lives (the SQLite file, demo mailboxes); made on first use."""
    path = Path(os.environ.get("MAILPIPE_DATA_DIR", DEFAULT_DATA_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """`MAILPIPE_DATABASE_URL`, or a SQLite file in the data directory."""
    url = os.environ.get("MAILPIPE_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{(data_dir() / 'mailpipe.db').resolve()}"


def int_setting(name: str, default: int) -> int:
    """An integer from the environment, with a clear error when it is not one."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None
