"""Alembic environment: run against the connection `mailpipe.db.migrate` hands over."""

from alembic import context
from sqlalchemy import create_engine

from mailpipe.models import Base
from mailpipe.settings import Settings

target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        engine = create_engine(Settings.from_env().database_url)  # the `alembic` command
        with engine.begin() as connection:
            _run_with(connection)
    else:
        _run_with(connection)


def _run_with(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
