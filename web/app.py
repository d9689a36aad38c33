"""mailpipe's own small web app: login, the dashboard, the API blueprint and /metrics.

`create_app(config)` builds it; `serve(host=..., port=...)` is `mailpipe web`. The data key
derived at login lives only in the in-process session store (see web.sessions); the cookie
holds an opaque random id.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException
from werkzeug.serving import run_simple

import broker_config
from actors import runtime
from actors.pipeline import PipelineBroker
from mailpipe import db, grants
from mailpipe.accounts import unlock_user
from mailpipe.crypto import KDF_ITERATIONS, SALT_BYTES, DataKey, KdfParams, derive_kek
from mailpipe.errors import NotFound, WrongPassword
from mailpipe.vocabulary import JOB_FINAL

from . import present
from .blueprint import (
    API_PREFIX,
    CSRF_HEADER,
    DEFAULT_MAX_QUEUED_JOBS,
    create_blueprint,
    http_error_response,
)
from .i18n import TEXTS, language, text
from .sessions import DEFAULT_IDLE_SECONDS, DEFAULT_MAX_SECONDS, ServerSession, SessionStore

SESSION_COOKIE = "mailpipe_session"
LOGIN_COOKIE = "mailpipe_login"
LOGIN_FORM_SECONDS = 15 * 60
DASHBOARD_JOBS = 10
DASHBOARD_NOTIFICATIONS = 20
EMBEDDED_WORKER_THREADS = 4
DEFAULTS: dict[str, Any] = {
    "MAILPIPE_DATABASE_URL": None,
    "MAILPIPE_SESSION_IDLE_SECONDS": DEFAULT_IDLE_SECONDS,
    "MAILPIPE_SESSION_MAX_SECONDS": DEFAULT_MAX_SECONDS,
    "MAILPIPE_BACKGROUND_GRANT_HOURS": 24,
    "MAILPIPE_MAX_QUEUED_JOBS": DEFAULT_MAX_QUEUED_JOBS,
    "MAILPIPE_ALERT_TOKEN": None,
    "MAILPIPE_ALERT_TOKEN_FILE": None,
    "MAILPIPE_COOKIE_SECURE": False,
    "MAX_CONTENT_LENGTH": 1024 * 1024,
}
NUMBERS = (
    "MAILPIPE_SESSION_IDLE_SECONDS",
    "MAILPIPE_SESSION_MAX_SECONDS",
    "MAILPIPE_BACKGROUND_GRANT_HOURS",
    "MAILPIPE_MAX_QUEUED_JOBS",
)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class WebState:
    """What the views share: the session store, the database and the pipeline."""

    logins: SessionStore
    sessions: sessionmaker[Session]
    pipeline: PipelineBroker
    background_grant_seconds: float


def config_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The app's settings from `MAILPIPE_*` variables; numbers are checked here, not later."""
    found: dict[str, Any] = {}
    for name in (setting for setting in DEFAULTS if setting.startswith("MAILPIPE_")):
        value = environ.get(name)
        if value in (None, ""):
            continue
        if name in NUMBERS:
            try:
                found[name] = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number, not {value!r}") from None
        elif name == "MAILPIPE_COOKIE_SECURE":
            found[name] = value.lower() in ("1", "true", "yes")
        else:
            found[name] = value
    return found


def alert_token(config: Mapping[str, Any]) -> str | None:
    """The Alertmanager bearer token: `MAILPIPE_ALERT_TOKEN`, else the first line of its file."""
    token = config.get("MAILPIPE_ALERT_TOKEN")
    path = config.get("MAILPIPE_ALERT_TOKEN_FILE")
    if not token and path:
        token = Path(path).read_text().strip()
    return token or None


def create_app(
    config: Mapping[str, Any] | None = None, *, pipeline: PipelineBroker | None = None
) -> Flask:
    """The whole app; `pipeline` (tests, embedding) overrides the one built from the config."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    if pipeline is None:
        engine = db.make_engine(app.config["MAILPIPE_DATABASE_URL"])
        db.migrate(engine)
        pipeline = PipelineBroker(db.session_factory(engine))
    state = WebState(
        logins=SessionStore(
            idle_seconds=app.config["MAILPIPE_SESSION_IDLE_SECONDS"],
            max_seconds=app.config["MAILPIPE_SESSION_MAX_SECONDS"],
        ),
        sessions=pipeline.sessions,
        pipeline=pipeline,
        background_grant_seconds=app.config["MAILPIPE_BACKGROUND_GRANT_HOURS"] * 3600,
    )
    app.extensions["mailpipe"] = state
    app.register_blueprint(
        create_blueprint(
            current_user=lambda: g.login.user_id if g.login else None,
            current_key=lambda: g.login.key if g.login else None,
            csrf_token=lambda: g.login.csrf_token if g.login else None,
            pipeline=pipeline,
            alert_token=alert_token(app.config),
            max_queued_jobs=int(app.config["MAILPIPE_MAX_QUEUED_JOBS"]),
        )
    )
    app.jinja_env.filters["seconds"] = _seconds
    app.jinja_env.filters["when"] = _when

    @app.before_request
    def load_login() -> None:
        g.login = state.logins.get(request.cookies.get(SESSION_COOKIE))

    @app.after_request
    def secure(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.endpoint != "static":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response | HTTPException:
        if request.path.startswith(API_PREFIX + "/"):
            return http_error_response(error)
        return error

    @app.get("/login")
    def login_form() -> Response:
        return _login_page(language(request))

    @app.post("/login")
    def login() -> Response:
        lang = language(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        given = request.form.get("login_token", "")
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            return _login_page(lang, error="login_expired", status=400)
        user = _unlock(state, request.form.get("username", ""), request.form.get("password", ""))
        if user is None:
            return _login_page(lang, error="login_failed", status=401)
        user_id, name, key = user
        login = state.logins.create(user_id=user_id, user_name=name, key=key)
        if request.form.get("background"):
            login.notice = _grant_background(state, login)
        response = redirect(_dashboard_url(), code=303)
        response.set_cookie(
            SESSION_COOKIE,
            login.id,
            httponly=True,
            samesite="Lax",
            secure=bool(app.config["MAILPIPE_COOKIE_SECURE"]),
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @app.post("/logout")
    def logout() -> Response:
        login: ServerSession | None = g.login
        if login is None:
            return redirect(url_for("login_form"), code=303)
        given = request.form.get("csrf_token") or request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(given.encode(), login.csrf_token.encode()):
            abort(403)
        state.logins.end(login.id)
        with state.sessions.begin() as session:
            grants.revoke_background(session, login.user_id)
        response = redirect(url_for("login_form"), code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/")
    def dashboard() -> Response | str:
        login: ServerSession | None = g.login
        if login is None:
            return redirect(url_for("login_form", **_lang_arg()), code=303)
        lang = language(request)
        notice, login.notice = login.notice, None
        return render_template(
            "dashboard.html",
            lang=lang,
            t=TEXTS[lang],
            login=login,
            notice=text(lang, notice) if notice else None,
            **_dashboard_data(state, login, lang),
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), mimetype=CONTENT_TYPE_LATEST)

    return app


def _lang_arg() -> dict[str, str]:
    """Keep an explicit `?lang=` across redirects; otherwise the browser's language decides."""
    lang = request.args.get("lang")
    return {"lang": lang} if lang in TEXTS else {}


def _dashboard_url() -> str:
    return url_for("dashboard", **_lang_arg())


def _login_page(lang: str, *, error: str | None = None, status: int = 200) -> Response:
    """The login form with a fresh token bound to a Strict cookie (no login from other sites)."""
    token = secrets.token_urlsafe(32)
    page = render_template(
        "login.html",
        lang=lang,
        t=TEXTS[lang],
        error=text(lang, error) if error else None,
        login_token=token,
        action=url_for("login", **_lang_arg()),
    )
    response = Response(page, status=status, mimetype="text/html")
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=LOGIN_FORM_SECONDS,
        path="/login",
        httponly=True,
        samesite="Strict",
    )
    return response


def _unlock(state: WebState, name: str, password: str) -> tuple[int, str, DataKey] | None:
    """(user id, name, data key), or None for any wrong name or password alike."""
    with state.sessions() as session:
        try:
            user, key = unlock_user(session, name.strip(), password)
        except NotFound:
            # cost the same as a wrong password, so timing does not tell which names exist
            derive_kek(password, KdfParams(salt=bytes(SALT_BYTES), iterations=KDF_ITERATIONS))
            return None
        except WrongPassword:
            return None
        return user.id, user.name, key


def _grant_background(state: WebState, login: ServerSession) -> str | None:
    """Let the scheduler fetch while the user is away; a notice key when that is impossible."""
    try:
        public_key = state.pipeline.public_key
        with state.sessions.begin() as session:
            grants.grant_background(
                session,
                user_id=login.user_id,
                key=login.key,
                public_key=public_key,
                ttl_seconds=state.background_grant_seconds,
            )
    except grants.WorkerKeyError:
        return "background_unavailable"
    return None


def _dashboard_data(state: WebState, login: ServerSession, lang: str) -> dict:
    """Everything the page shows, read once per page view."""
    pipeline = state.pipeline
    listed = pipeline.list_jobs(login.user_id, DASHBOARD_JOBS)
    health = pipeline.get_account_health(login.user_id)
    trend = pipeline.get_performance_metrics(login.user_id).to_json()["trend"]
    with state.sessions() as session:
        labels = present.account_labels(session, login.user_id, login.key)
        covered = present.job_account_ids(session, [job.job_id for job in listed])
        notes = present.user_notifications(
            session, login.user_id, limit=DASHBOARD_NOTIFICATIONS, lang=lang
        )
    jobs = [
        present.job_summary_view(
            job, account_ids=covered.get(job.job_id, []), labels=labels, lang=lang
        )
        for job in listed
    ]
    running = next((job["job_id"] for job in jobs if job["status"] not in JOB_FINAL), None)
    return {
        "jobs": jobs,
        "accounts": [present.account_view(a, labels=labels, lang=lang) for a in health],
        "notifications": notes["notifications"],
        "unread": notes["unread"],
        "page_data": {"lang": lang, "texts": TEXTS[lang], "trend": trend, "running": running},
    }


def _seconds(value: float | None, lang: str) -> str:
    """Seconds with one decimal, with a decimal comma in German."""
    if value is None:
        return "—"
    shown = f"{value:.1f}"
    return f"{shown.replace('.', ',') if lang == 'de' else shown} s"


def _when(value: str | None) -> str:
    """An instant (ISO 8601 with its offset) as UTC text; the page's script shows it in the
    reader's own time zone."""
    if not value:
        return "—"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def serve(*, host: str, port: int) -> int:
    """`mailpipe web`: on the embedded broker this process also runs the jobs, like the demo."""
    embedded = isinstance(broker_config.broker, StubBroker)
    if embedded:
        grants.ensure_worker_key()
    app = create_app(config_from_env())
    worker = None
    if embedded:
        runtime.embed(
            sessions=app.extensions["mailpipe"].sessions,
            private_key=grants.worker_private_key(),
        )
        worker = dramatiq.Worker(broker_config.broker, worker_threads=EMBEDDED_WORKER_THREADS)
        worker.start()
    try:
        run_simple(host, port, app, threaded=True)
    finally:
        if worker is not None:
            worker.stop()
    return 0
