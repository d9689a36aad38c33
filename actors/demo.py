"""`mailpipe demo`: the pipeline on embedded defaults, against a built-in IMAP server.

No service is needed: pymap serves demo mail on loopback, the stub broker and an in-process
worker run the jobs, SQLite stores the mail. Two rounds show a full fetch, then an incremental one.
"""

from __future__ import annotations

import os
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import dramatiq
from dramatiq.brokers.stub import StubBroker

import broker_config
from actors import runtime
from actors.commands import wait_for
from actors.pipeline import PipelineBroker
from mailpipe import config, db, grants
from mailpipe.accounts import add_account, create_user
from mailpipe.demo_server import DemoServer, demo_messages
from mailpipe.imap import ImapSettings
from mailpipe.models import utcnow

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
WORKER_THREADS = 4
JOB_SECONDS = 60


def run_demo() -> int:
    """Two fetch rounds against the demo server; exit 0 when both behaved as designed."""
    if not isinstance(broker_config.broker, StubBroker):
        print("mailpipe demo runs on the embedded broker: unset MAILPIPE_BROKER_URL")
        return 2
    data = config.data_dir()
    database = data / "demo.db"
    for stale in data.glob("demo.db*"):
        stale.unlink()
    engine = db.make_engine(f"sqlite:///{database.resolve()}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    grants.ensure_worker_key()
    runtime.embed(sessions=sessions, private_key=grants.worker_private_key())
    worker = dramatiq.Worker(broker_config.broker, worker_threads=WORKER_THREADS)
    worker.start()
    try:
        with DemoServer(workdir=data, users={DEMO_USER: DEMO_PASSWORD}) as server:
            return _rounds(sessions, server, database)
    finally:
        worker.stop()
        engine.dispose()


def _rounds(sessions, server: DemoServer, database: Path) -> int:
    with sessions.begin() as session:
        user, key = create_user(session, DEMO_USER, DEMO_PASSWORD)
        settings = ImapSettings(
            host=server.host,
            port=server.port,
            username=DEMO_USER,
            password=DEMO_PASSWORD,
            security="none",
        )
        add_account(session, user, key, settings, provider="other")
        user_id = user.id
    pipeline = PipelineBroker(sessions)
    expected = len(demo_messages())
    print(f"demo IMAP server on {server.host}:{server.port}, {expected} messages in INBOX")
    print(f"database: {database}\n")

    first = _round(pipeline, user_id, key, "round 1: first fetch of the mailbox")
    server.deliver(DEMO_USER, _new_mail())
    second = _round(pipeline, user_id, key, "round 2: one new message has arrived")

    [health] = pipeline.get_account_health(user_id)
    print(f"account health: {health['health']}, last success {health['last_success_at']}")
    as_designed = (
        first["status"] == "success"
        and first["accounts"][0]["saved"] == expected
        and first["accounts"][0]["quarantined"] >= 1
        and second["status"] == "success"
        and second["accounts"][0]["saved"] == 1
    )
    print("demo behaved as designed" if as_designed else "demo did NOT behave as designed")
    return 0 if as_designed else 1


def _round(pipeline: PipelineBroker, user_id: int, key, title: str) -> dict:
    job_id = pipeline.enqueue_fetch_job(user_id, key=key, max_mails=None)
    status = wait_for(pipeline, job_id, user_id, seconds=JOB_SECONDS)
    [run] = status["accounts"]
    phases = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in run["phases"].items())
    print(title)
    print(
        f"  job {status['job_id'][:8]}: {status['status']}: fetched {run['fetched']}, "
        f"saved {run['saved']}, quarantined {run['quarantined']}, processed {run['processed']}"
    )
    print(f"  phases: {phases}\n")
    return status


def _new_mail() -> bytes:
    mail = EmailMessage()
    mail["From"] = "Paketdienst <versand@example.de>"
    mail["To"] = f"{DEMO_USER}@example.de"
    mail["Subject"] = "Ihr Paket kommt heute"
    mail["Date"] = format_datetime(utcnow())
    mail["Message-ID"] = make_msgid(domain="example.de")
    mail.set_content(f"Zustellung zwischen 14 und 16 Uhr. ({os.getpid()})")
    return mail.as_bytes()
