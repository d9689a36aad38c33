"""mailpipe's own small web app: login, the dashboard, the API blueprint and /metrics (for the
scraper, with its bearer token).

`create_app(settings)` builds it; `serve(settings, host=..., port=...)` is `mailpipe web`. The
data key derived at login lives only in the in-process session store (see web.sessions); the
cookie holds an opaque random id.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from gunicorn.app.base import BaseApplication
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import run_simple

from mailpipe import db, grants, logs, mail, names
from mailpipe.accounts import convert_user_folders, unlock_user
from mailpipe.crypto import KDF_ITERATIONS, SALT_BYTES, DataKey, KdfParams, derive_kek
from mailpipe.errors import MailpipeError, NotFound, WrongPassword
from mailpipe.settings import Settings
from mailpipe.vocabulary import JOB_FINAL
from metrics import multiprocess
from metrics.observer import record_login
from worker.broker import use_broker
from worker.embedded import embedded_worker

from . import present
from .blueprint import API_PREFIX, CSRF_HEADER, create_blueprint, http_error_response
from .i18n import TEXTS, language, text
from .sessions import SealedSessionStore, ServerSession, SessionStore, session_store
from .throttle import LoginThrottle, login_throttle

if TYPE_CHECKING:
    from actors.pipeline import PipelineBroker

logger = logging.getLogger(__name__)
SESSION_COOKIE = "mailpipe_session"
LOGIN_COOKIE = "mailpipe_login"
LOGIN_FORM_SECONDS = 15 * 60
DASHBOARD_JOBS = 10
DASHBOARD_NOTIFICATIONS = 20
DASHBOARD_MAIL = 5  # latest messages shown per account
MAX_CONTENT_LENGTH = 1024 * 1024
HSTS = "max-age=31536000"
NOTICES = ("background_unavailable",)
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

    logins: SessionStore | SealedSessionStore
    sessions: sessionmaker[Session]
    pipeline: PipelineBroker
    background_grant_seconds: float
    throttle: LoginThrottle


def alert_token(settings: Settings) -> str | None:
    """The Alertmanager bearer token: `MAILPIPE_ALERT_TOKEN`, else the first line of its file."""
    token = settings.alert_token
    if not token and settings.alert_token_file:
        token = settings.alert_token_file.read_text().strip()
    return token or None


def metrics_token(settings: Settings) -> str | None:
    """The scraper's bearer token for the web app's /metrics: the first line of
    `MAILPIPE_METRICS_TOKEN_FILE` (the file Prometheus sends as credentials_file)."""
    if settings.metrics_token_file is None:
        return None
    return settings.metrics_token_file.read_text().strip() or None


def create_app(settings: Settings, *, pipeline: PipelineBroker | None = None) -> Flask:
    """The whole app on `settings`; `pipeline` (tests, embedding) overrides the one built from
    them, on the settings' database and the broker the actors are declared on."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH
    if settings.trusted_proxies:  # the client's address (for the login throttle) and scheme
        proxies = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]
    if pipeline is None:
        pipeline = _pipeline(settings)
    state = WebState(
        logins=session_store(settings),
        sessions=pipeline.sessions,
        pipeline=pipeline,
        background_grant_seconds=settings.background_grant_hours * 3600,
        throttle=login_throttle(settings, pipeline.sessions),
    )
    app.extensions["mailpipe"] = state
    app.register_blueprint(
        create_blueprint(
            current_user=lambda: g.login.user_id if g.login else None,
            current_key=lambda: g.login.key if g.login else None,
            csrf_token=lambda: g.login.csrf_token if g.login else None,
            pipeline=pipeline,
            alert_token=alert_token(settings),
            max_queued_jobs=settings.max_queued_jobs,
            oauth2_providers=settings.oauth2_providers,
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
        if settings.cookie_secure:  # served over TLS: browsers must not come back without it
            response.headers.setdefault("Strict-Transport-Security", HSTS)
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
        return _login_page(language(request), secure=settings.cookie_secure)

    @app.post("/login")
    def login() -> ResponseReturnValue:
        lang = language(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        given = request.form.get("login_token", "")
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            return _login_page(
                lang, secure=settings.cookie_secure, error="login_expired", status=400
            )
        given_name, address = request.form.get("username", ""), request.remote_addr or ""
        wait = state.throttle.retry_after(name=given_name, address=address)
        if wait is not None:  # answered before any key derivation
            record_login("throttled")
            logger.warning(
                "login throttled: user name %s from %s (retry after %d s)",
                state.throttle.name_digest(given_name)[:12],
                address,
                wait,
            )
            refused = _login_page(
                lang, secure=settings.cookie_secure, error="login_throttled", status=429
            )
            refused.headers["Retry-After"] = str(wait)
            return refused
        user = _unlock(state, given_name, request.form.get("password", ""))
        if user is None:
            state.throttle.failed(name=given_name, address=address)
            record_login("failed")
            logger.warning(
                "login failed: user name %s from %s",
                state.throttle.name_digest(given_name)[:12],
                address,
            )
            return _login_page(
                lang, secure=settings.cookie_secure, error="login_failed", status=401
            )
        state.throttle.succeeded(name=given_name)
        record_login("success")
        user_id, name, key = user
        with state.sessions.begin() as session:  # rows from before migrations 0013 and 0016
            names.convert_user(session, user_id=user_id, key=key)
            convert_user_folders(session, user_id=user_id, key=key)
        login = state.logins.create(user_id=user_id, user_name=name, key=key)
        notice = None
        if request.form.get("background"):
            notice = _grant_background(state, login)
        else:  # an earlier login's background grant ends: the user did not allow it this time
            with state.sessions.begin() as session:
                grants.revoke_background(session, user_id)
        response = redirect(_dashboard_url(notice=notice), code=303)
        response.set_cookie(
            SESSION_COOKIE,
            login.id,
            httponly=True,
            samesite="Lax",
            secure=settings.cookie_secure,
        )
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @app.post("/logout")
    def logout() -> ResponseReturnValue:
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
    def dashboard() -> ResponseReturnValue:
        login: ServerSession | None = g.login
        if login is None:
            return redirect(url_for("login_form", **_lang_arg()), code=303)
        lang = language(request)
        notice = request.args.get("notice")  # one of ours, or nothing is shown
        notice = notice if notice in NOTICES else None
        return render_template(
            "dashboard.html",
            lang=lang,
            t=TEXTS[lang],
            login=login,
            notice=text(lang, notice) if notice else None,
            **_dashboard_data(state, login, lang),
        )

    scraper_token = metrics_token(settings)

    @app.get("/metrics")
    def metrics() -> Response:
        """For the scraper only: off without a token file, else its bearer token is needed."""
        if scraper_token is None:
            abort(404)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), scraper_token.encode()
        ):
            return Response(
                "bearer token required\n",
                status=401,
                mimetype="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="mailpipe-metrics"'},
            )
        return Response(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)

    return app


def _lang_arg() -> dict[str, Any]:
    """Keep an explicit `?lang=` across redirects; otherwise the browser's language decides."""
    lang = request.args.get("lang")
    return {"lang": lang} if lang in TEXTS else {}


def _dashboard_url(*, notice: str | None = None) -> str:
    """The dashboard, with a notice key for the page after login (sessions hold no notice:
    every web process reads them alike)."""
    arguments: dict[str, Any] = {**_lang_arg(), **({"notice": notice} if notice else {})}
    return url_for("dashboard", **arguments)


def _login_page(
    lang: str, *, secure: bool, error: str | None = None, status: int = 200
) -> Response:
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
        secure=secure,
    )
    return response


def _unlock(state: WebState, name: str, password: str) -> tuple[int, str, DataKey] | None:
    """(user id, name, data key), or None for any wrong name or password alike; an old-form
    wrap of the data key is re-wrapped (bound to the user) as the login commits."""
    with state.sessions.begin() as session:
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
    health = pipeline.get_account_health(login.user_id, key=login.key)
    performance = pipeline.get_performance_metrics(login.user_id).to_json()
    with state.sessions() as session:
        labels = present.account_labels(session, login.user_id, login.key, lang=lang)
        covered = present.job_account_ids(session, [job.job_id for job in listed])
        notes = present.user_notifications(
            session, login.user_id, limit=DASHBOARD_NOTIFICATIONS, lang=lang
        )
        latest = {
            a.account_id: [
                item.to_json()
                for item in mail.list_mail(
                    session,
                    user_id=login.user_id,
                    key=login.key,
                    account_id=a.account_id,
                    limit=DASHBOARD_MAIL,
                ).mail
            ]
            for a in health
        }
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
        "mail": latest,
        "totals": present.totals_view(performance, lang=lang),
        "page_data": {
            "lang": lang,
            "texts": TEXTS[lang],
            "trend": performance["trend"],
            "running": running,
        },
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


def serve(settings: Settings, *, host: str, port: int, workers: int = 1) -> int:
    """`mailpipe web`: on the embedded broker this process also runs the jobs, like the demo;
    with `workers` above 1, gunicorn runs that many processes (the Redis broker only: they
    share sessions and the login throttle through Redis). With MAILPIPE_LOG_FORMAT=json every
    line it logs (requests, job events) is a JSON object."""
    if settings.log_format == logs.JSON:
        logs.configure(logs.JSON, stream=sys.stderr)
    if workers > 1:
        if settings.embedded:
            raise MailpipeError(
                "--workers above 1 needs MAILPIPE_BROKER_URL=redis://...: processes on the "
                "embedded broker share no sessions"
            )
        _Gunicorn(settings, bind=f"{host}:{port}", workers=workers).run()
        return 0
    pipeline = _pipeline(settings)
    app = create_app(settings, pipeline=pipeline)
    with (
        embedded_worker(settings, sessions=pipeline.sessions, broker=pipeline.broker)
        if settings.embedded
        else contextlib.nullcontext()
    ):
        run_simple(host, port, app, threaded=True)
    return 0


def _registry() -> CollectorRegistry:
    """This process's metrics, or every web process's when they share a directory."""
    if multiprocess.directory() is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


class _Gunicorn(BaseApplication):
    """gunicorn with the app built in each worker process (after the fork: its own database
    pool and Redis connections)."""

    def __init__(self, settings: Settings, *, bind: str, workers: int) -> None:
        self.settings = settings
        self.options = {"bind": bind, "workers": workers, "accesslog": "-"}
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            self.cfg.set(name, value)

    def load(self) -> Flask:
        return create_app(self.settings)


def _pipeline(settings: Settings) -> PipelineBroker:
    """A pipeline on the settings' database (migrated) and the broker the actors are on."""
    use_broker(settings)
    from actors.pipeline import PipelineBroker  # declares the actors on that broker

    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    return PipelineBroker(db.session_factory(engine), settings=settings)
