"""The demo (`make demo`, `python -m demo`): the whole system on embedded defaults, with no
service installed.

A built-in IMAP server (pymap) holds three demo mailboxes: anna's is healthy and gets new mail
every round; ben's password is stored wrong, so his account goes BROKEN and he is notified;
clara's sits behind a slow, flaky link that breaks her first attempt each round, which is
retried and recovers. The stub broker and an in-process worker run the jobs, SQLite stores the
mail, and the web dashboard is served on http://127.0.0.1:8000 (log in as demo/demo), with
/metrics for the bearer token the demo writes to its data dir. `--rounds N` runs N rounds without the dashboard, back to back, and exits 0 only
when every round behaved as designed; a round that did not says which check failed.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import WSGIRequestHandler, make_server

from mailpipe import db, grants, health
from mailpipe.accounts import add_account, create_user
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError
from mailpipe.imap import ImapSettings
from mailpipe.models import utcnow
from mailpipe.results import JobReport
from mailpipe.settings import Settings
from mailpipe.vocabulary import ErrorClass, Health, JobStatus, JobType, RunStatus
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
# server bytes before the link breaks the first attempt of each round: past the greeting and the
# login (about 240 bytes), so the break comes mid-session, and short of the about 650 bytes even
# a no-change re-sync receives (tests/test_demo.py runs rounds of both kinds)
FLAKY_BREAK_AFTER = 400
WEB_HOST = "127.0.0.1"
WEB_PORT = 8000
ROUND_SECONDS = 30
JOB_SECONDS = 120
POLL_SECONDS = 0.25
METRICS_TOKEN_FILENAME = "metrics.token"
RUN_MARKS = {"success": "ok", "failed": "FAILED", "skipped": "skipped"}
# ben's wrong password fails his run, until after MAILPIPE_CIRCUIT_FAILURES such rounds his
# circuit opens and skips it (one probe per cool-down fails again)
BEN_EXPECTED = {
    (RunStatus.FAILED, ErrorClass.INVALID_CREDENTIALS),
    (RunStatus.SKIPPED, ErrorClass.CIRCUIT_OPEN),
}


@dataclass
class Demo:
    sessions: sessionmaker[Session]
    pipeline: PipelineBroker
    server: DemoServer
    link: FaultProxy
    user_id: int
    key: DataKey
    accounts: dict[str, int]
    seen_jobs: set[str] = field(default_factory=set)  # the jobs the terminal has followed


def run_demo(settings: Settings, *, rounds: int | None) -> int:
    """Start everything, run rounds (`rounds` of them, else until Ctrl-C), stop everything."""
    if not settings.embedded:
        print("the demo runs on the embedded broker: unset MAILPIPE_BROKER_URL")
        return 2
    settings = allow_demo_servers(settings)
    _quiet_logs()
    broker = use_broker(settings)
    from actors.pipeline import PipelineBroker  # declares the actors on that broker

    data = Path(settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    for stale in data.glob("demo.db*"):
        stale.unlink()
    settings = with_metrics_token(settings, data)
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
            web = _start_web(demo, settings) if rounds is None else None
            try:
                return _rounds(demo, rounds=rounds, database=data / "demo.db")
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


def _quiet_logs() -> None:
    """The terminal is the demo's live display: Dramatiq's own lines (a skipped message, a
    retry) would cut into it, and the demo says the same in its own words."""
    logging.getLogger("dramatiq").setLevel(logging.CRITICAL)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)


def with_metrics_token(settings: Settings, data: Path) -> Settings:
    """/metrics answers only the scraper's bearer token: the demo makes one in its data dir
    (unless MAILPIPE_METRICS_TOKEN_FILE names one), so a curl can look."""
    if settings.metrics_token_file is not None:
        return settings
    token_file = data / METRICS_TOKEN_FILENAME
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(32) + "\n")
        token_file.chmod(0o600)
    return replace(settings, metrics_token_file=token_file)


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
        server = make_server(WEB_HOST, WEB_PORT, app, threaded=True, request_handler=_QuietRequests)
    except OSError as error:
        print(f"web dashboard not started ({WEB_HOST}:{WEB_PORT}: {error.strerror})")
        return None
    threading.Thread(target=server.serve_forever, name="mailpipe-web", daemon=True).start()
    print(f"dashboard: http://{WEB_HOST}:{WEB_PORT}/  (log in as {DEMO_USER}/{DEMO_PASSWORD})")
    token_file = settings.metrics_token_file
    print(
        f'metrics:   curl -H "Authorization: Bearer $(cat {token_file})" '
        f"http://{WEB_HOST}:{WEB_PORT}/metrics"
    )
    return server


class _QuietRequests(WSGIRequestHandler):
    """Werkzeug's handler without its access log, which would cut into the live display."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def _rounds(demo: Demo, *, rounds: int | None, database: Path) -> int:
    """Run the rounds; with a count, exit 0 only when every round behaved as designed."""
    print(f"demo IMAP server on {demo.server.host}:{demo.server.port}; clara via a flaky link")
    print(f"mailboxes (--security none): {', '.join(f'{u}/{p}' for u, p in MAILBOXES.items())}")
    print(f"database: {database}\n")
    failed_rounds = 0
    number = 0
    while True:
        number += 1
        status = _round(demo, number)
        problems = _check(demo, status, first=number == 1)
        failed_rounds += bool(problems)
        _summary(demo, status, problems)
        if rounds is not None and number >= rounds:
            if rounds > 1:
                print(f"{rounds - failed_rounds} of {rounds} rounds behaved as designed")
            return 0 if failed_rounds == 0 else 1
        if rounds is None:
            print(f"next round in {ROUND_SECONDS} s (Ctrl-C to stop)\n")
            try:
                _follow_others(demo, seconds=ROUND_SECONDS)
            except KeyboardInterrupt:
                return 0
        else:
            print()
        demo.server.deliver("anna", _new_mail(number))


def _follow_others(demo: Demo, *, seconds: float) -> None:
    """Between rounds, follow the jobs started elsewhere (the dashboard's "Jetzt abrufen")."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for job in demo.pipeline.list_jobs(demo.user_id, limit=5):
            if job.job_id not in demo.seen_jobs and job.type != JobType.SCHEDULED:
                demo.seen_jobs.add(job.job_id)
                print(f"job {job.job_id[:8]} started from the dashboard")
                status = _follow(demo, job.job_id)
                print(_job_line(status))
        time.sleep(POLL_SECONDS)


def _round(demo: Demo, number: int) -> JobReport:
    """One fetch job for all accounts, followed live in the terminal."""
    demo.link.reset_after(FLAKY_BREAK_AFTER, times=1)
    job_id = demo.pipeline.enqueue_fetch_job(demo.user_id, key=demo.key, max_mails=None)
    demo.seen_jobs.add(job_id)
    print(f"round {number}: job {job_id[:8]} for {len(demo.accounts)} accounts")
    return _follow(demo, job_id)


def _follow(demo: Demo, job_id: str) -> JobReport:
    """Print each change of a run's status until the job is final."""
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


def _check(demo: Demo, status: JobReport, *, first: bool) -> list[str]:
    """What did not go as designed (nothing, when the round behaved): anna fetched (all demo
    mail in round 1), ben BROKEN and told once (his run failed, or skipped once his circuit
    opened), clara's flaky link broke her first attempt and a retry recovered it, and the job
    a partial failure."""
    runs = {run.account_id: run for run in status.accounts}
    anna, ben, clara = (runs[demo.accounts[name]] for name in ("anna", "ben", "clara"))
    health_by_id = {a.account_id: a.health for a in demo.pipeline.get_account_health(demo.user_id)}
    with demo.sessions() as session:
        told = [note.kind for note in health.notifications(session, demo.user_id)]
    problems = []
    if anna.status != RunStatus.SUCCESS:
        problems.append(f"anna's run {anna.status} ({anna.error_class}), expected success")
    elif first and anna.saved != len(demo_messages()):
        problems.append(f"anna saved {anna.saved} mails, expected {len(demo_messages())}")
    if (ben.status, ben.error_class) not in BEN_EXPECTED:
        problems.append(
            f"ben's run {ben.status} ({ben.error_class}), expected failed (invalid_credentials)"
            " or skipped (circuit_open)"
        )
    if health_by_id[demo.accounts["ben"]] != Health.BROKEN:
        problems.append(f"ben's account is {health_by_id[demo.accounts['ben']]}, expected BROKEN")
    if told.count("account_broken") != 1:
        problems.append(f"ben was told {told.count('account_broken')} times, expected once")
    if clara.status != RunStatus.SUCCESS:
        problems.append(f"clara's run {clara.status} ({clara.error_class}), expected success")
    elif clara.attempt < 2:
        problems.append("clara's flaky link did not break: her run succeeded on attempt 1")
    if health_by_id[demo.accounts["clara"]] != Health.HEALTHY:
        problems.append(f"clara's account is {health_by_id[demo.accounts['clara']]}")
    if status.status != JobStatus.PARTIAL_FAILURE:
        problems.append(f"the job is {status.status}, expected partial_failure")
    return problems


def _job_line(status: JobReport) -> str:
    why = f" ({status.reason})" if status.reason else ""
    return f"job {status.job_id[:8]}: {status.status}{why}, {_mails(status.emails_fetched)}"


def _mails(count: int) -> str:
    return f"{count} mail" if count == 1 else f"{count} mails"


def _ms(seconds: float) -> str:
    """A phase's time: whole milliseconds, or a tenth for the quick ones (never "0 ms")."""
    ms = seconds * 1000
    if ms >= 10:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms" if ms >= 0.1 else "<0.1 ms"


def _summary(demo: Demo, status: JobReport, problems: list[str]) -> None:
    names = {account_id: name for name, account_id in demo.accounts.items()}
    health_by_id = {a.account_id: a for a in demo.pipeline.get_account_health(demo.user_id)}
    print(_job_line(status))
    for run in status.accounts:
        account = health_by_id[run.account_id]
        phases = ", ".join(f"{p} {_ms(s)}" for p, s in run.phases.items())
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
    if problems:
        print(f"demo did NOT behave as designed: {'; '.join(problems)}")
    else:
        print("demo behaved as designed")


def _new_mail(number: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = "Paketdienst <versand@example.de>"
    mail["To"] = "anna@example.de"
    mail["Subject"] = f"Ihr Paket kommt heute (Sendung {number})"
    mail["Date"] = format_datetime(utcnow())
    mail["Message-ID"] = make_msgid(domain="example.de")
    mail.set_content("Zustellung zwischen 14 und 16 Uhr.")
    return mail.as_bytes()
