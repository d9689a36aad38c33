"""The demo (`make demo`, `python -m demo`): the whole system on embedded defaults, with no
service installed.

A built-in IMAP server (pymap) holds three demo mailboxes: anna's is healthy and gets new mail
every round; ben's password is stored wrong, so his account goes BROKEN and he is notified;
clara's sits behind a slow, flaky link that breaks her first attempt each round, which is
retried and recovers. The stub broker and an in-process worker run the jobs, SQLite stores the
mail, and the web dashboard with /metrics is served on http://127.0.0.1:8000 (log in as
demo/demo). `--once` runs one round, prints a summary and exits 0 when it behaved as designed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from mailpipe import db, grants, health
from mailpipe.accounts import add_account, create_user
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError
from mailpipe.imap import ImapSettings
from mailpipe.models import utcnow
from mailpipe.results import JobReport
from mailpipe.settings import Settings
from mailpipe.vocabulary import ErrorClass, Health, JobStatus, RunStatus
from worker.broker import use_broker
from worker.embedded import embedded_worker

from .faultproxy import FaultProxy
from .imap_server import HOST as DEMO_HOST
from .imap_server import DemoServer, demo_messages

if TYPE_CHECKING:
    from actors.pipeline import PipelineBroker

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
MAILBOXES = {"anna": "anna-pw", "ben": "ben-pw", "clara": "clara-pw"}
WRONG_PASSWORD = "not-bens-password"
FLAKY_LATENCY = 0.15  # seconds each way, a distant provider
FLAKY_BREAK_AFTER = 3_000  # server bytes before the link breaks on the first attempt
WEB_HOST = "127.0.0.1"
WEB_PORT = 8000
ROUND_SECONDS = 30
JOB_SECONDS = 120
POLL_SECONDS = 0.25
RUN_MARKS = {"success": "ok", "failed": "FAILED", "skipped": "skipped"}


@dataclass
class Demo:
    sessions: sessionmaker[Session]
    pipeline: PipelineBroker
    server: DemoServer
    link: FaultProxy
    user_id: int
    key: DataKey
    accounts: dict[str, int]


def run_demo(settings: Settings, *, once: bool) -> int:
    """Start everything, run rounds (one with --once), stop everything."""
    if not settings.embedded:
        print("the demo runs on the embedded broker: unset MAILPIPE_BROKER_URL")
        return 2
    settings = allow_demo_servers(settings)
    broker = use_broker(settings)
    from actors.pipeline import PipelineBroker  # declares the actors on that broker

    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    for stale in data.glob("demo.db*"):
        stale.unlink()
    engine = db.make_engine(f"sqlite:///{data / 'demo.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    pipeline = PipelineBroker(sessions, settings=settings, broker=broker)
    try:
        with (
            embedded_worker(settings, sessions=sessions, broker=broker),
            DemoServer(workdir=data, users=MAILBOXES) as server,
            FaultProxy(upstream=(server.host, server.port)) as link,
        ):
            demo = _setup(pipeline, server, link)
            web = _start_web(demo, settings) if not once else None
            try:
                return _rounds(demo, once=once, database=data / "demo.db")
            finally:
                if web is not None:
                    web.shutdown()
    finally:
        engine.dispose()


def allow_demo_servers(settings: Settings) -> Settings:
    """The demo's IMAP server and flaky link listen on loopback, which mailpipe refuses for
    stored accounts: allow exactly that host, as MAILPIPE_ALLOW_PRIVATE_HOSTS would."""
    policy = settings.address_policy
    if DEMO_HOST in policy.allow:
        return settings
    return replace(settings, address_policy=replace(policy, allow=(*policy.allow, DEMO_HOST)))


def _setup(pipeline: PipelineBroker, server: DemoServer, link: FaultProxy) -> Demo:
    link.latency(FLAKY_LATENCY)
    sessions = pipeline.sessions
    with sessions.begin() as session:
        user, key = create_user(session, DEMO_USER, DEMO_PASSWORD)
        accounts = {}
        for name, password in MAILBOXES.items():
            settings = ImapSettings(
                host=server.host,
                port=link.port if name == "clara" else server.port,
                username=name,
                password=WRONG_PASSWORD if name == "ben" else password,
                security="none",
            )
            provider = {"anna": "gmx", "ben": "outlook", "clara": "other"}[name]
            accounts[name] = add_account(session, user, key, settings, provider=provider).id
        grants.grant_background(
            session,
            user_id=user.id,
            key=key,
            public_key=pipeline.public_key,
            ttl_seconds=24 * 3600,
        )
        user_id = user.id
    return Demo(sessions, pipeline, server, link, user_id, key, accounts)


def _start_web(demo: Demo, settings: Settings):
    """The dashboard and /metrics in a thread; the demo goes on without it if the port is taken."""
    from web.app import create_app

    app = create_app(settings, pipeline=demo.pipeline)
    try:
        server = make_server(WEB_HOST, WEB_PORT, app, threaded=True)
    except OSError as error:
        print(f"web dashboard not started ({WEB_HOST}:{WEB_PORT}: {error.strerror})")
        return None
    threading.Thread(target=server.serve_forever, name="mailpipe-web", daemon=True).start()
    print(f"dashboard: http://{WEB_HOST}:{WEB_PORT}/  (log in as {DEMO_USER}/{DEMO_PASSWORD})")
    print(f"metrics:   http://{WEB_HOST}:{WEB_PORT}/metrics")
    return server


def _rounds(demo: Demo, *, once: bool, database: Path) -> int:
    print(f"demo IMAP server on {demo.server.host}:{demo.server.port}; clara via a flaky link")
    print(f"database: {database}\n")
    number = 0
    while True:
        number += 1
        status = _round(demo, number)
        as_designed = _check(demo, status, first=number == 1)
        _summary(demo, status, as_designed)
        if once:
            return 0 if as_designed else 1
        print(f"next round in {ROUND_SECONDS} s (Ctrl-C to stop)\n")
        try:
            time.sleep(ROUND_SECONDS)
        except KeyboardInterrupt:
            return 0
        demo.server.deliver("anna", _new_mail(number))


def _round(demo: Demo, number: int) -> JobReport:
    """One fetch job for all accounts, followed live in the terminal."""
    demo.link.reset_after(FLAKY_BREAK_AFTER, times=1)
    job_id = demo.pipeline.enqueue_fetch_job(demo.user_id, key=demo.key, max_mails=None)
    print(f"round {number}: job {job_id[:8]} for {len(demo.accounts)} accounts")
    names = {account_id: name for name, account_id in demo.accounts.items()}
    shown: dict[int, tuple] = {}
    deadline = time.monotonic() + JOB_SECONDS
    while True:
        status = demo.pipeline.get_job_status(job_id, demo.user_id)
        for run in status.accounts:
            state = (run.status, run.attempt, run.error_class)
            if shown.get(run.account_id) != state:
                shown[run.account_id] = state
                why = f" ({run.error_class})" if run.error_class else ""
                print(
                    f"  {time.strftime('%H:%M:%S')} {names[run.account_id]:<6}"
                    f" {run.status:<9} attempt {run.attempt}{why}"
                )
        if status.final:
            return status
        if time.monotonic() > deadline:
            raise MailpipeError(f"demo job {job_id} did not finish in {JOB_SECONDS} s")
        time.sleep(POLL_SECONDS)


def _check(demo: Demo, status: JobReport, *, first: bool) -> bool:
    """anna fetched (all demo mail in round 1), ben BROKEN and told, clara recovered by a retry."""
    runs = {run.account_id: run for run in status.accounts}
    anna, ben, clara = (runs[demo.accounts[name]] for name in ("anna", "ben", "clara"))
    health_by_id = {a.account_id: a.health for a in demo.pipeline.get_account_health(demo.user_id)}
    with demo.sessions() as session:
        told = [note.kind for note in health.notifications(session, demo.user_id)]
    return (
        anna.status == RunStatus.SUCCESS
        and (not first or anna.saved == len(demo_messages()))
        and ben.status == RunStatus.FAILED
        and ben.error_class == ErrorClass.INVALID_CREDENTIALS
        and health_by_id[demo.accounts["ben"]] == Health.BROKEN
        and told.count("account_broken") == 1
        and clara.status == RunStatus.SUCCESS
        and clara.attempt >= 2
        and health_by_id[demo.accounts["clara"]] == Health.HEALTHY
        and status.status == JobStatus.PARTIAL_FAILURE
    )


def _summary(demo: Demo, status: JobReport, as_designed: bool) -> None:
    names = {account_id: name for name, account_id in demo.accounts.items()}
    health_by_id = {a.account_id: a for a in demo.pipeline.get_account_health(demo.user_id)}
    print(f"job {status.job_id[:8]}: {status.status}, {status.emails_fetched} mails")
    for run in status.accounts:
        account = health_by_id[run.account_id]
        phases = ", ".join(f"{p} {s * 1000:.0f} ms" for p, s in run.phases.items())
        print(
            f"  {names[run.account_id]:<6} {RUN_MARKS.get(run.status, run.status):<8}"
            f" health {account.health:<9} saved {run.saved:>3}"
            f" quarantined {run.quarantined}  attempts {run.attempt}"
        )
        if phases:
            print(f"         phases: {phases}")
        if run.error:
            print(f"         error: {run.error}")
    with demo.sessions() as session:
        for note in health.notifications(session, demo.user_id, unread_only=True):
            print(f"  notification: {note.message}")
    print("demo behaved as designed" if as_designed else "demo did NOT behave as designed")


def _new_mail(number: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Paketdienst <versand@example.de>"
    mail["To"] = "anna@example.de"
    mail["Subject"] = f"Ihr Paket kommt heute (Sendung {number})"
    mail["Date"] = format_datetime(utcnow())
    mail["Message-ID"] = make_msgid(domain="example.de")
    mail.set_content("Zustellung zwischen 14 und 16 Uhr.")
    return mail.as_bytes()
