"""The restore drill of docs/runbook.md "Backup and restore", with real workers and pg_dump, and
what a Redis that lost its data costs (nothing: the runs it held are ended and synced again).

What is backed up: the PostgreSQL database (`pg_dump -Fc`) and the worker key file. The drill
syncs, dumps, syncs more (work the backup will not have), loses the database, restores the dump
into a new one, points the same workers (same Redis namespace, same key) at it, and syncs again:
the workers carry on from the restored folder positions and every message is stored once.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from actors import PipelineBroker
from mailpipe import db, grants, schedule
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import Email, utcnow
from mailpipe.runner import end_lost_runs
from mailpipe.settings import Settings
from tests.support import postgres
from tests.support.cluster import running_cluster
from tests.support.messages import plain_message as message
from tests.support.workers import delete_namespace

FAST_KDF = 1_000
PG_DUMP = shutil.which("pg_dump")
PG_RESTORE = shutil.which("pg_restore")
pytestmark = pytest.mark.skipif(
    PG_DUMP is None or PG_RESTORE is None,
    reason="pg_dump is missing: `make test` installs the Debian package postgresql-client",
)


def libpq(database: str) -> str:
    return postgres.libpq_url(postgres.database_url(postgres.ADMIN_URL, database))


def stored(sessions, account_id: int) -> list[tuple[bytes, int, int]]:
    with sessions() as session:
        return list(
            session.execute(
                select(Email.folder_hash, Email.uidvalidity, Email.uid)
                .where(Email.account_id == account_id)
                .order_by(Email.uid)
            ).all()
        )


def test_a_restored_database_lets_the_workers_carry_on_without_duplicates(dovecot, tmp_path):
    login, password = dovecot.new_user()
    dovecot.append(login, password, [message(i) for i in range(3)])
    dump = tmp_path / "mailpipe.dump"
    restored = postgres.create_database()
    try:
        with running_cluster(dovecot, tmp_path) as cluster:
            # Given a user whose account was synced, and a backup taken then
            with cluster.sessions.begin() as session:
                user, key = create_user(session, "drill", "pw", iterations=FAST_KDF)
                user_id = user.id
                imap = ImapSettings(
                    host=dovecot.host,
                    port=dovecot.port,
                    username=login,
                    password=password,
                    security="none",
                )
                account_id = add_account(session, user, key, imap).id
            first = cluster.wait(cluster.pipeline.enqueue_fetch_job(user_id, key=key), user_id)
            assert (first["status"], first["emails_fetched"]) == ("success", 3)
            subprocess.run(
                [PG_DUMP, "--format=custom", f"--file={dump}", libpq(cluster.database)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            # And work done after the backup: two more mails synced
            dovecot.append(login, password, [message(i) for i in range(3, 5)])
            second = cluster.wait(cluster.pipeline.enqueue_fetch_job(user_id, key=key), user_id)
            assert second["emails_fetched"] == 2

            # When the database is lost and the dump restored into a new one, and the same
            # workers (same Redis namespace, same worker key) are pointed at it
            cluster.workers.stop()
            subprocess.run(
                [PG_RESTORE, "--no-owner", f"--dbname={libpq(restored)}", str(dump)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            url = postgres.database_url(postgres.ADMIN_URL, restored)
            cluster.env = {**cluster.env, "MAILPIPE_DATABASE_URL": url}
            cluster.restart_workers()
            engine = db.make_engine(url)
            try:
                sessions = db.session_factory(engine)
                pipeline = PipelineBroker(
                    sessions,
                    settings=Settings.from_env(cluster.env),
                    public_key=cluster.pipeline.public_key,
                    broker=cluster.pipeline.broker,
                )
                cluster.sessions, cluster.pipeline = sessions, pipeline
                before = stored(sessions, account_id)
                third = cluster.wait(pipeline.enqueue_fetch_job(user_id, key=key), user_id)

                # Then the restored database had the mail of the backup only, the workers
                # fetched what came after it, and every message is stored exactly once
                assert len(before) == 3
                assert (third["status"], third["emails_fetched"]) == ("success", 2)
                after = stored(sessions, account_id)
                assert len(after) == len(set(after)) == 5
                assert [uid for _folder, _validity, uid in after] == [1, 2, 3, 4, 5]
                # And the user's key still opens what the restored database holds
                with sessions() as session:
                    email = session.scalars(
                        select(Email).where(Email.account_id == account_id).limit(1)
                    ).one()
                    raw = key.decrypt(email.raw_enc, table="emails", column="raw", row=email.id)
                    assert b"Message-ID" in raw
                    total = session.scalar(select(func.count()).select_from(Email))
                assert total == 5
            finally:
                engine.dispose()
    finally:
        postgres.drop_database(restored)
        dump.unlink(missing_ok=True)


def test_the_runbook_names_what_to_back_up_and_the_drill():
    runbook = (Path(__file__).resolve().parents[1] / "docs" / "runbook.md").read_text()
    section = runbook.split("### Backup and restore", 1)[1].split("\n### ", 1)[0]
    for needed in ("pg_dump", "pg_restore", "MAILPIPE_WORKER_KEY_FILE", "Redis", __name__):
        assert needed.split(".")[-1] in section, needed


def test_a_redis_that_lost_its_queue_loses_nothing(dovecot, tmp_path):
    login, password = dovecot.new_user()
    dovecot.append(login, password, [message(i) for i in range(2)])
    with running_cluster(dovecot, tmp_path) as cluster:
        # Given a user with background sync, and a job whose message Redis then lost (the
        # workers were down; the namespace is wiped, as a Redis restarted without its data)
        with cluster.sessions.begin() as session:
            user, key = create_user(session, "lost", "pw", iterations=FAST_KDF)
            user_id = user.id
            grants.grant_background(
                session,
                user_id=user_id,
                key=key,
                public_key=cluster.pipeline.public_key,
                ttl_seconds=3600,
            )
            imap = ImapSettings(
                host=dovecot.host,
                port=dovecot.port,
                username=login,
                password=password,
                security="none",
            )
            account_id = add_account(session, user, key, imap).id
        cluster.workers.stop()
        job_id = cluster.pipeline.enqueue_fetch_job(user_id, key=key)
        delete_namespace(cluster.namespace, cluster.redis_url)
        with cluster.sessions.begin() as session:
            assert schedule.claim_due_accounts(session) == {}  # its open run holds the account

        # When the scheduler's tick ends runs of jobs older than a job's key grant lives
        ended = end_lost_runs(cluster.sessions, created_before=utcnow() + timedelta(seconds=1))

        # Then the job ends, failed with a reason, and the account is claimed and synced again
        assert ended == 1
        lost = cluster.pipeline.get_job_status(job_id, user_id).to_json()
        assert lost["status"] == "failed"
        [run] = lost["accounts"]
        assert (run["status"], run["error_class"]) == ("failed", "unknown")
        assert "message was lost" in run["error"]
        cluster.restart_workers()
        with cluster.sessions.begin() as session:
            claimed = schedule.claim_due_accounts(session)
        assert claimed == {user_id: [account_id]}
        again = cluster.pipeline.enqueue_scheduled_job(user_id, claimed[user_id])
        synced = cluster.wait(again, user_id)
        assert (synced["status"], synced["emails_fetched"]) == ("success", 2)
        assert len(stored(cluster.sessions, account_id)) == 2
