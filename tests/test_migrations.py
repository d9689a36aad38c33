"""Schema upgrades keep what is in flight: jobs begun before an upgrade still finalise."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select

from mailpipe import db, diagnostics, grants, jobs  # noqa: F401  (their tables, too)
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, Base, PipelineJob


def downgrade(engine, revision: str) -> None:
    """Take a SQLite database back to an older schema, keeping its rows."""
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
        with connection.begin():
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, revision)


def test_upgrade_counts_the_open_runs_of_jobs_in_flight(tmp_path):
    # Given a job of three accounts, one run ended, in a database from before runs_open
    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        user, key = create_user(session, "u", "pw", iterations=1_000)
        settings = ImapSettings(host="h", username="x", password="y", security="none")
        ids = [add_account(session, user, key, settings).id for _ in range(3)]
        job = jobs.create_job(session, user_id=user.id, account_ids=ids, type="all", options={})
    with sessions.begin() as session:
        jobs.finish_run(session, job_id=job.id, account_id=ids[0], status="success")
    downgrade(engine, "0003")
    # When the schema is upgraded as workers do at start
    db.migrate(engine)
    # Then every row is still there, the job counts two open runs, and the last one finalises it
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AccountRun)) == 3
        assert session.scalar(select(PipelineJob.runs_open)) == 2
    with sessions.begin() as session:
        assert jobs.finish_run(session, job_id=job.id, account_id=ids[1], status="success") is None
    with sessions.begin() as session:
        finished = jobs.finish_run(session, job_id=job.id, account_id=ids[2], status="failed")
    assert finished is not None and finished.status == "partial_failure"


def test_the_head_revision_the_code_knows_is_alembics_head(tmp_path):
    # Given the migration scripts, and a database migrated by them
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    engine = db.make_engine(f"sqlite:///{tmp_path / 'head.db'}")
    db.migrate(engine)
    # Then the revision migrate() takes for the newest is Alembic's head, and the database is there
    assert ScriptDirectory.from_config(cfg).get_current_head() == db.HEAD_REVISION
    assert db.schema_revision(engine) == db.HEAD_REVISION


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_the_migrations_build_the_schema_the_models_describe(db_url):
    # Given a database built by the migrations alone
    engine = db.make_engine(db_url)
    db.migrate(engine)
    # When Alembic compares it with the models (types and server defaults included)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        drift = compare_metadata(context, Base.metadata)
    engine.dispose()
    # Then nothing differs: code and schema agree on every table, column, index and default
    assert drift == []
