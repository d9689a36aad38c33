"""Throwaway PostgreSQL databases for tests and benchmarks: create uniquely, drop only those."""

from __future__ import annotations

import os
import secrets

import psycopg

ADMIN_URL = os.environ.get(
    "MAILPIPE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PREFIX = "mailpipe_test_"
CONNECT_TIMEOUT = 5


def libpq_url(url: str) -> str:
    """Turn a SQLAlchemy URL into the libpq form psycopg accepts."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def database_url(admin_url: str, name: str) -> str:
    """The same server's URL pointing at another database."""
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


def create_database(admin_url: str = ADMIN_URL) -> str:
    """CREATE a database named mailpipe_test_<pid>_<random> and return its name."""
    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(
        libpq_url(admin_url), autocommit=True, connect_timeout=CONNECT_TIMEOUT
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str, admin_url: str = ADMIN_URL) -> None:
    """DROP a database made by `create_database`, even while connections to it are open."""
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not made by create_database")
    with psycopg.connect(
        libpq_url(admin_url), autocommit=True, connect_timeout=CONNECT_TIMEOUT
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str, admin_url: str = ADMIN_URL) -> bool:
    """Tell whether a database of that name exists (for tests of the cleanup)."""
    with psycopg.connect(libpq_url(admin_url), connect_timeout=CONNECT_TIMEOUT) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None
