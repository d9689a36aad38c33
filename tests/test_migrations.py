"""Schema upgrades keep what is in flight: jobs begun before an upgrade still finalise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, select

from mailpipe import db, jobs
from mailpipe.accounts import account_folders, add_account, create_user
from mailpipe.crypto import LEGACY_WRAP, WRAP_VERSION, DataKey, KdfParams
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, MailAccount, PipelineJob, User
from mailpipe.settings import Settings
from tests.support.keys import legacy_wrap
from tests.test_web_api import LOGIN_TOKEN
from web.app import create_app


def web_login(url: str, data_dir: Path, name: str, password: str):
    """A login through the web app's form on this database; the answer."""
    client = create_app(Settings(database_url=url, data_dir=data_dir)).test_client()
    token = LOGIN_TOKEN.search(client.get("/login").text).group(1)
    return client.post(
        "/login", data={"login_token": token, "username": name, "password": password}
    )


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


def alembic_config(script_location: Path, connection: Connection) -> Config:
    """The configuration `alembic -c mailpipe/alembic.ini` gives env.py, on an open connection."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = connection
    return cfg


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_alembic_check_finds_nothing_the_migrations_left_out(db_url):
    # Given a database built by the migrations alone
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    # When `alembic check` compares it with every model (types and server defaults included,
    # as env.py configures autogenerate)
    with engine.connect() as connection:
        command.check(alembic_config(db.MIGRATIONS, connection))  # raises on any difference
    engine.dispose()
    # Then there was nothing to migrate: `alembic revision --autogenerate` would write no operation


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_an_empty_database_gets_the_newest_schema_without_replaying_the_migrations(db_url):
    # Given an empty database
    engine = db.make_engine(db_url)
    assert db.schema_revision(engine) is None
    # When it is migrated as a command does at start
    db.migrate(engine)
    # Then it is at the newest revision, and `alembic check` finds it the same as the models
    # (the test above holds the migrations to the same models)
    assert db.schema_revision(engine) == db.HEAD_REVISION
    with engine.connect() as connection:
        command.check(alembic_config(db.MIGRATIONS, connection))
    # And migrating again changes nothing
    db.migrate(engine)
    assert db.schema_revision(engine) == db.HEAD_REVISION
    engine.dispose()


def test_autogenerate_writes_a_utc_instant_as_the_database_type(tmp_path):
    # Given a database at head that lacks one timestamp column of the models
    engine = db.make_engine(f"sqlite:///{tmp_path / 'drift.db'}")
    db.migrate(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE mail_accounts DROP COLUMN failure_window_start")
    scripts = shutil.copytree(db.MIGRATIONS, tmp_path / "migrations")
    # When a migration is autogenerated (into a copy of the scripts)
    with engine.connect() as connection:
        script = command.revision(
            alembic_config(scripts, connection), message="drift", autogenerate=True
        )
    engine.dispose()
    # Then it adds the column as a DateTime with time zone, without importing the models
    written = Path(script.path).read_text()
    assert "sa.Column('failure_window_start', sa.DateTime(timezone=True), nullable=True)" in written
    assert "mailpipe" not in written


def test_a_user_from_before_0014_logs_in_and_is_rewrapped_bound_to_the_user(tmp_path):
    # Given a database at 0012 holding a user whose data key is wrapped as it was then
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    downgrade(engine, "0012")
    params = KdfParams(salt=b"s" * 16, iterations=1_000)
    old_wrap = legacy_wrap(DataKey.generate(), "pw", params)
    with engine.begin() as connection:
        connection.execute(
            User.__table__.insert(),
            {"name": "anna", "kdf": params.to_json(), "wrapped_dek": old_wrap},
        )
    # When the schema is upgraded, Then the row is marked as the old form
    db.migrate(engine)
    with db.session_factory(engine)() as session:
        assert session.scalar(select(User.key_wrap)) == LEGACY_WRAP
    # When anna logs in through the web app
    answer = web_login(url, tmp_path, "anna", "pw")
    # Then she is in, and her row carries the new form (bound to her row), written at login
    assert answer.status_code == 303
    with db.session_factory(engine)() as session:
        row = session.scalars(select(User)).one()
        assert row.key_wrap == WRAP_VERSION and row.wrapped_dek != old_wrap
    engine.dispose()


def test_a_folder_list_from_before_0016_is_sealed_at_the_owners_login(tmp_path):
    # Given a database at 0015 holding anna's account with its folder list in clear
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(host="imap.example.org", username="anna", password="pw")
    with sessions.begin() as session:
        anna, key = create_user(session, "anna", "pw", iterations=1_000)
        account = add_account(session, anna, key, settings)
        account.folders, account.folders_enc = ["INBOX", "Kunden"], None
        account_id = account.id
    downgrade(engine, "0015")
    # When the schema is upgraded, Then the list is still read as it was
    db.migrate(engine)
    with sessions() as session:
        assert account_folders(session.get_one(MailAccount, account_id), key) == ["INBOX", "Kunden"]
    # When anna logs in through the web app
    answer = web_login(url, tmp_path, "anna", "pw")
    # Then the list is sealed at her login, and no folder name is left in clear
    assert answer.status_code == 303
    with sessions() as session:
        row = session.get_one(MailAccount, account_id)
        assert row.folders is None
        assert account_folders(row, key) == ["INBOX", "Kunden"]
    engine.dispose()
