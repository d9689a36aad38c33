"""Engines and schema: SQLite tuned for one writer at a time, PostgreSQL as is; Alembic migrates."""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, inspect, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_PAGE_SIZE = 16_384  # mail bodies are large blobs; bigger pages mean fewer overflow pages
# a batch's pages (8 MiB of mail and the index pages it touches) stay in memory until its
# commit: with SQLite's default of 2 MiB, it spills and reads them back (bench.sync)
SQLITE_CACHE_KIB = 16_384
MIGRATIONS = Path(__file__).with_name("migrations")
HEAD_REVISION = "0016"  # the newest migration (tests/test_migrations.py holds it to Alembic's head)
POOL_SIZE = 5  # SQLAlchemy's default, for processes with a few threads
PG_MIGRATION_LOCK = 0x6D61696C  # "mail": one advisory lock id for schema upgrades
_MIGRATION_LOCK = threading.Lock()  # Alembic's module-level proxies are not thread-safe


def make_engine(
    url: str, *, pool_size: int = POOL_SIZE, pre_ping: bool = True, recycle_seconds: int = -1
) -> Engine:
    """An engine for `url`, with SQLite set to WAL (and the SQLite file's directory made).

    `pool_size` is how many connections the pool keeps open once used (it opens one only when
    all are busy): past it, a returned connection is closed, and the next busy moment opens a
    new PostgreSQL backend (a fork, authentication and cold caches) for one transaction.
    `pre_ping` tests each connection with a `SELECT 1` of its own as it is checked out (a
    transaction per checkout); without it, a connection the server dropped fails its first
    statement, and the pool then replaces every connection opened before that moment.
    `recycle_seconds` (-1: never) replaces a connection that old at its next checkout.
    """
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url, pool_pre_ping=pre_ping, pool_size=pool_size, pool_recycle=recycle_seconds
    )


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only takes effect on a new file
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when many processes start at once.

    One query tells a schema at the newest revision, which is left alone without loading
    Alembic (whose imports cost a command or worker start about a tenth of a second); an empty
    database gets the models' tables at once, stamped with the newest revision, instead of
    replaying every migration; anything else is upgraded by Alembic.
    """
    revision = schema_revision(engine)
    if revision == HEAD_REVISION or (revision is None and _create_empty(engine)):
        return
    upgrade(engine)


def upgrade(engine: Engine) -> None:
    """Run the Alembic migrations from the database's revision to the newest."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with _MIGRATION_LOCK, _migration_lock(engine), engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A batch migration copies a table and drops the old one; with foreign keys
            # enforced, that drop would cascade into every child row (SQLite ignores this
            # pragma inside a transaction, so it comes first).
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        with connection.begin():
            if not sqlite:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
            if broken:
                raise RuntimeError(f"the migration left rows without their parent: {broken[:5]}")


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (one query); None for one without the schema."""
    with engine.connect() as connection:
        try:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        except DBAPIError:  # no such table: the database has no schema yet
            return None


def _create_empty(engine: Engine) -> bool:
    """Create the schema in a database without tables, as the migrations would leave it, and
    stamp it with the newest revision; False (nothing done) if it has tables after all."""
    from .models import Base

    with _MIGRATION_LOCK, _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name != "sqlite":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        if inspect(connection).get_table_names():
            return False  # another process made it meanwhile, or an older schema: Alembic's job
        Base.metadata.create_all(connection)
        connection.exec_driver_sql(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
        )
        connection.exec_driver_sql(f"INSERT INTO alembic_version VALUES ('{HEAD_REVISION}')")
    return True


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """SQLite: an exclusive lock file beside the database, held while migrating."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """The rows an INSERT, UPDATE or DELETE touched: `Session.execute` is typed to return a
    plain `Result`, but for these statements it is a `CursorResult`, which counts them."""
    return cast("CursorResult[*tuple[Any, ...]]", result).rowcount
