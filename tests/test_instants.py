"""Every instant is stored in UTC and leaves the core as ISO 8601 with its offset, on both databases."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import event, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from actors import PipelineBroker
from mailpipe import db, grants, health, jobs, runner
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import PipelineJob, utcnow
from mailpipe.retry import RetryPolicy
from mailpipe.settings import Settings
from mailpipe.vocabulary import ErrorClass

BERLIN_WINTER = timezone(timedelta(hours=1))
SETTINGS = ImapSettings(host="imap.example", username="x", password="y", security="none")


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database whose PostgreSQL sessions run in Berlin's zone, not the server's UTC."""
    engine = db.make_engine(db_url)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _berlin_session)
    db.migrate(engine)
    try:
        yield db.session_factory(engine)
    finally:
        engine.dispose()


def _berlin_session(dbapi_connection, _record) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Europe/Berlin'")
    dbapi_connection.commit()


def ended_job(sessions: sessionmaker[Session]) -> tuple[int, str]:
    """A user whose one-account job ran and failed, with the account's health recorded."""
    with sessions.begin() as session:
        user, key = create_user(session, "anna", "pw", iterations=1_000)
        account = add_account(session, user, key, SETTINGS).id
        job = jobs.create_job(
            session, user_id=user.id, account_ids=[account], type="account", options={}
        )
    with sessions.begin() as session:
        jobs.begin_run(session, job_id=job.id, account_id=account, attempt=1)
    runner.record_crash(sessions, job_id=job.id, account_id=account)
    with sessions.begin() as session:
        health.record_outcome(
            session,
            account,
            error_class=ErrorClass.INVALID_CREDENTIALS,
            retry_policy=RetryPolicy(),
            circuit=health.CircuitPolicy(),
        )
    return user.id, job.id


def assert_utc_iso_of_now(value: str | None) -> None:
    """ISO 8601 with the offset +00:00, naming an instant of the last minute."""
    assert isinstance(value, str) and value.endswith("+00:00"), value
    assert abs(datetime.fromisoformat(value) - utcnow()) < timedelta(minutes=1), value


def test_instants_leave_the_facade_in_iso_8601_with_their_offset(sessions):
    # Given a job that ran and ended, and the health and notification it left
    user_id, job_id = ended_job(sessions)
    pipeline = PipelineBroker(
        sessions,
        settings=Settings(),
        public_key=grants.public_key_bytes(X25519PrivateKey.generate()),
    )
    # When the facade reports the job, the job list, the accounts' health and the notifications
    status = pipeline.get_job_status(job_id, user_id).to_json()
    [listed] = [job.to_json() for job in pipeline.list_jobs(user_id)]
    [account] = [account.to_json() for account in pipeline.get_account_health(user_id)]
    with sessions() as session:
        notes = [note.to_json() for note in health.notifications(session, user_id)]
    # Then every instant carries +00:00 and names the moment it happened
    [run] = status["accounts"]
    for instant in (
        status["created_at"],
        status["started_at"],
        status["finished_at"],
        listed["created_at"],
        listed["finished_at"],
        run["started_at"],
        run["finished_at"],
        account["health_checked_at"],
        account["last_fetch_at"],
        *(note["created_at"] for note in notes),
    ):
        assert_utc_iso_of_now(instant)
    assert {note["kind"] for note in notes} == {"job_failed", "account_broken"}
    assert account["last_success_at"] is None


def test_an_instant_written_in_another_zone_reads_back_as_the_same_instant_in_utc(sessions):
    # Given a job created at 10:00 in Berlin's winter time
    written = datetime(2026, 1, 15, 10, 0, tzinfo=BERLIN_WINTER)
    user_id, job_id = ended_job(sessions)
    with sessions.begin() as session:
        session.get_one(PipelineJob, job_id).created_at = written
    # When it is read back, in a query and as the core reports it
    with sessions() as session:
        stored = session.scalar(select(PipelineJob.created_at).where(PipelineJob.id == job_id))
        reported = jobs.job_status(session, job_id, user_id).to_json()["created_at"]
    # Then it is the same instant, in UTC, with its offset
    assert stored == written
    assert stored.utcoffset() == timedelta(0)
    assert reported == "2026-01-15T09:00:00+00:00"


def test_a_time_without_an_offset_is_refused_rather_than_guessed(sessions):
    # Given a stored job
    _, job_id = ended_job(sessions)
    # When a naive datetime is written into one of its instants, Then the write is refused
    with sessions() as session, pytest.raises(StatementError, match="offset"):
        session.get_one(PipelineJob, job_id).created_at = datetime(2026, 1, 15, 10, 0)
        session.flush()


def test_comparisons_with_stored_instants_hold_across_zones(sessions):
    # Given a job that finished just now
    ended_job(sessions)
    before, after = utcnow() - timedelta(minutes=1), utcnow() + timedelta(minutes=1)
    # When it is looked up by instants given in UTC and in Berlin's zone
    with sessions() as session:
        found = [
            session.scalar(select(PipelineJob.id).where(PipelineJob.finished_at >= moment))
            for moment in (
                before,
                before.astimezone(BERLIN_WINTER),
                after.astimezone(BERLIN_WINTER),
            )
        ]
    # Then the same instant selects the same rows, whatever zone it was given in
    assert [job is not None for job in found] == [True, True, False]
