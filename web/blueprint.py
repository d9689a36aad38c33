"""The JSON API a host app mounts: start fetches, follow them, see accounts and notifications.

The host provides who is logged in, that user's data key and the CSRF token of their session
(all from its own server-side session) and a `PipelineBroker` (from `actors.pipeline`, imported
once `worker.broker.use_broker(settings)` has set the broker the actors are declared on):

    app.register_blueprint(create_blueprint(
        current_user=lambda: session_user_id_or_none(),
        current_key=lambda: session_data_key_or_none(),
        csrf_token=lambda: session_csrf_token_or_none(),
        pipeline=PipelineBroker(sessions, settings=settings),
        alert_token=settings.alert_token,
    ))

Every route lives under `/api`. Session-authenticated POST, PATCH and DELETE requests need the
session's CSRF token in the `X-CSRF-Token` header; the Alertmanager webhook authenticates with a
bearer token instead, and the OAuth2 callback with the state sealed in its own cookie.
Anything that is not the caller's own (a job, an account, a notification) is "not found".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeGuard

from flask import Blueprint, Response, jsonify, redirect, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from mailpipe import db, health, mail, oauth2
from mailpipe.accounts import (
    PRESETS,
    account_settings,
    add_account,
    owned_account,
    set_credentials,
    set_folders,
    set_push,
)
from mailpipe.addresses import AddressPolicy
from mailpipe.crypto import DataKey
from mailpipe.errors import DecryptionFailed, NotFound, TooManyRequests
from mailpipe.grants import WorkerKeyError
from mailpipe.imap import SECURITY_MODES, ImapSettings
from mailpipe.jobs import MAX_TIMEOUT_SECONDS
from mailpipe.login import verify_login
from mailpipe.mail import MAX_PAGE_SIZE, PAGE_SIZE
from mailpipe.models import MailAccount, Notification, User, utcnow
from mailpipe.providers import Provider
from mailpipe.vocabulary import AuthKind

from . import diagnostics, present
from .i18n import TEXTS, language, text
from .openapi import (
    DEFAULT_HISTORY,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_MAX_MAILS,
    DEFAULT_NOTIFICATIONS,
    DEFAULT_TIMEOUT_SECONDS,
    HOST_PATTERN,
    MAX_ALERTS,
    MAX_FINGERPRINT,
    MAX_FOLDER,
    MAX_FOLDERS,
    MAX_HISTORY,
    MAX_HOST,
    MAX_ID,
    MAX_INTERVAL_SECONDS,
    MAX_LABEL,
    MAX_LOGIN,
    MAX_MAILS,
    MAX_NOTIFICATIONS,
    MAX_PASSWORD,
    MAX_PORT,
    MIN_INTERVAL_SECONDS,
    OPENAPI,
)

if TYPE_CHECKING:  # the host hands one in; importing actors here would need a broker first
    from actors.pipeline import PipelineBroker

BLUEPRINT_NAME = "mailpipe_api"
API_PREFIX = "/api"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = ("POST", "PATCH", "DELETE")
OAUTH2_COOKIE = "mailpipe_oauth2"
OAUTH2_PENDING_SECONDS = 600
DEFAULT_MAX_QUEUED_JOBS = 3
ID = f"int(min=1, max={MAX_ID})"
FETCH_FIELDS = ("account_id", "max_mails", "timeout_seconds")
ADD_FIELDS = ("host", "port", "security", "login", "password", "folders", "interval")
UPDATE_FIELDS = ("password", "folders", "interval", "enabled")
ALERT_STATUSES = ("firing", "resolved")
ALERT_SEVERITIES = ("critical", "warning", "info")
ALERT_KIND = "operator_alert"
MAX_MESSAGE = 1000


class ApiError(Exception):
    """An answer other than success: status, a stable code, a message and the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        error_class: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.error_class = error_class
        self.retry_after = retry_after


def error_response(error: ApiError) -> Response:
    """The one error shape of the API, so clients branch on `code` and show `field`."""
    body = {"error": error.message, "code": error.code}
    if error.field is not None:
        body["field"] = error.field
    if error.error_class is not None:
        body["error_class"] = error.error_class
    response = jsonify(body)
    response.status_code = error.status
    if error.status == 401 and error.code == "alert_token":
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailpipe-alerts"'
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def http_error_response(error: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 413 …) in the API's JSON shape."""
    code = (error.name or "error").lower().replace(" ", "_")
    return error_response(ApiError(error.code or 500, code, error.description or error.name))


@dataclass(frozen=True)
class _Api:
    """The views, bound to what the host app provides."""

    current_user: Callable[[], int | None]
    current_key: Callable[[], DataKey | None]
    csrf_token: Callable[[], str | None]
    pipeline: PipelineBroker
    sessions: sessionmaker[Session]
    alert_token: str | None
    max_queued_jobs: int
    oauth2_providers: Mapping[str, Provider]
    home_url: str

    # -- guards ----------------------------------------------------------------------------

    def guard(self) -> None:
        """Log-in first, then CSRF on POST, PATCH and DELETE; the public routes check what they need themselves."""
        if request.endpoint in (f"{BLUEPRINT_NAME}.openapi", f"{BLUEPRINT_NAME}.alertmanager"):
            return
        if self.current_user() is None:
            raise ApiError(401, "unauthorized", "log in first")
        if request.method in UNSAFE_METHODS:
            expected = self.csrf_token()
            given = request.headers.get(CSRF_HEADER, "")
            if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                raise ApiError(403, "csrf", f"missing or wrong {CSRF_HEADER} header")

    def user(self) -> int:
        user_id = self.current_user()
        if user_id is None:  # the guard ran, but a host's session may end between two calls
            raise ApiError(401, "unauthorized", "log in first")
        return user_id

    def key(self) -> DataKey:
        """The user's data key from the host's session; fetching without it is impossible."""
        key = self.current_key()
        if key is None:
            raise ApiError(401, "key_required", "log in again to unlock your data key")
        return key

    # -- jobs ------------------------------------------------------------------------------

    def fetch(self) -> tuple[Response, int, dict]:
        user_id = self.user()
        data = _json_object()
        unknown = sorted(set(data) - set(FETCH_FIELDS))
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field {unknown[0]!r}", field=unknown[0])
        account_id = _int(data, "account_id", default=None, maximum=MAX_ID)
        max_mails = _int(data, "max_mails", default=DEFAULT_MAX_MAILS, maximum=MAX_MAILS)
        timeout = _int(
            data, "timeout_seconds", default=DEFAULT_TIMEOUT_SECONDS, maximum=MAX_TIMEOUT_SECONDS
        )
        assert timeout is not None  # it has a default
        key = self.key()
        with self.sessions() as session:
            queued = present.open_user_jobs(
                session, user_id, window_seconds=self.pipeline.settings.job_grant_ttl_seconds
            )
        if queued >= self.max_queued_jobs:
            raise ApiError(
                429,
                "too_many_jobs",
                f"{queued} of your fetches are still queued or running; wait for one to finish",
            )
        try:
            job_id = self.pipeline.enqueue_fetch_job(
                user_id, account_id, key=key, max_mails=max_mails, timeout_seconds=timeout
            )
        except NotFound:
            raise ApiError(404, "not_found", "account not found", field="account_id") from None
        except WorkerKeyError:
            raise ApiError(503, "unavailable", "the workers' key is not configured") from None
        location = url_for(f"{BLUEPRINT_NAME}.job_status", job_id=job_id)
        return jsonify({"job_id": job_id, "status_url": location}), 202, {"Location": location}

    def job_status(self, job_id: str) -> Response:
        user_id = self.user()
        try:
            status = self.pipeline.get_job_status(job_id, user_id)
        except NotFound:
            raise ApiError(404, "not_found", "job not found") from None
        labels = self._labels(user_id)
        return jsonify(present.job_status_view(status, labels=labels, lang=language(request)))

    def history(self) -> Response:
        user_id = self.user()
        limit = _query_int("limit", default=DEFAULT_HISTORY, maximum=MAX_HISTORY)
        listed = self.pipeline.list_jobs(user_id, limit)
        with self.sessions() as session:
            covered = present.job_account_ids(session, [job.job_id for job in listed])
            labels = present.account_labels(
                session, user_id, self.current_key(), lang=language(request)
            )
        lang = language(request)
        return jsonify(
            {
                "jobs": [
                    present.job_summary_view(
                        job, account_ids=covered.get(job.job_id, []), labels=labels, lang=lang
                    )
                    for job in listed
                ]
            }
        )

    # -- accounts --------------------------------------------------------------------------

    def health(self) -> Response:
        user_id = self.user()
        labels = self._labels(user_id)
        lang = language(request)
        accounts = self.pipeline.get_account_health(user_id, key=self.current_key())
        return jsonify(
            {"accounts": [present.account_view(a, labels=labels, lang=lang) for a in accounts]}
        )

    def presets(self) -> Response:
        connect = [
            {"name": name, "display": provider.display}
            for name, provider in self.oauth2_providers.items()
            if provider.configured
        ]
        return jsonify({"presets": [asdict(preset) for preset in PRESETS], "oauth2": connect})

    # -- OAuth2: authorization code with PKCE ----------------------------------------------

    def oauth2_start(self, provider: str) -> Response:
        """Begin "Mit Google verbinden": the state and PKCE verifier go, sealed under the user's
        key, into a short-lived cookie; the browser is sent to the provider."""
        user_id = self.user()
        key = self.key()
        chosen = self._provider(provider)
        data = _json_object()
        _known_fields(data, ("login",))
        login = _string(data, "login", maximum=MAX_LOGIN)
        state = secrets.token_urlsafe(24)
        verifier, challenge = oauth2.pkce_pair()
        redirect_uri = url_for(f"{BLUEPRINT_NAME}.oauth2_callback", _external=True)
        pending = {
            "state": state,
            "verifier": verifier,
            "provider": provider,
            "login": login,
            "expires": time.time() + OAUTH2_PENDING_SECONDS,
        }
        sealed = key.encrypt(
            json.dumps(pending).encode(), table="oauth2", column="pending", row=user_id
        )
        url = oauth2.authorization_url(
            chosen,
            redirect_uri=redirect_uri,
            state=state,
            code_challenge=challenge,
            login_hint=login,
        )
        response = jsonify({"authorization_url": url})
        response.set_cookie(
            OAUTH2_COOKIE,
            base64.urlsafe_b64encode(sealed).decode(),
            max_age=OAUTH2_PENDING_SECONDS,
            path=f"{API_PREFIX}/oauth2",
            httponly=True,
            samesite="Lax",  # the provider's redirect back is a top-level navigation
            secure=request.is_secure,
        )
        return response

    def oauth2_callback(self) -> ResponseReturnValue:
        """Back on the dashboard either way: connected, or with `#oauth2-error=<text key>`, which
        the page says in the reader's language (this is a browser's navigation, not a fetch)."""
        user_id = self.user()
        key = self.key()
        try:
            self._connect(user_id, key)
        except ApiError as error:
            said = error.code
            if error.error_class is not None:
                said = f"error_{error.error_class}_{AuthKind.OAUTH2}"
                if said not in TEXTS["en"]:
                    said = f"error_{error.error_class}"
            elif f"oauth2_{said}" in TEXTS["en"]:
                said = f"oauth2_{said}"
            if said not in TEXTS["en"]:
                said = "error_generic"
            response = redirect(f"{self.home_url}#oauth2-error={said}", code=303)
        else:
            response = redirect(self.home_url, code=303)
        response.delete_cookie(OAUTH2_COOKIE, path=f"{API_PREFIX}/oauth2")
        return response

    def _connect(self, user_id: int, key: DataKey) -> None:
        """Check the state, trade the code (with the PKCE verifier) for tokens, check the IMAP
        login, and store the account with its refresh token encrypted (or reconnect it)."""
        lang = language(request)
        pending = self._pending(user_id, key)
        if request.args.get("error"):
            raise ApiError(400, "oauth2_denied", text(lang, "oauth2_denied"))
        chosen = self._provider(pending["provider"])
        try:
            tokens = oauth2.exchange_code(
                chosen,
                code=request.args.get("code", ""),
                redirect_uri=url_for(f"{BLUEPRINT_NAME}.oauth2_callback", _external=True),
                code_verifier=pending["verifier"],
            )
        except oauth2.TokenEndpointDown:
            raise ApiError(503, "unavailable", text(lang, "oauth2_unavailable")) from None
        except (oauth2.GrantRefused, oauth2.TokenRequestRefused):
            raise ApiError(400, "oauth2_refused", text(lang, "oauth2_refused")) from None
        if not tokens.refresh_token:
            raise ApiError(400, "oauth2_refused", text(lang, "oauth2_refused"))
        settings = ImapSettings(
            host=chosen.imap_host,
            port=chosen.imap_port,
            username=pending["login"],
            access_token=tokens.access_token,
            security=chosen.imap_security,
        )
        failure = verify_login(replace(settings, policy=self.policy))
        if failure is not None:
            message = present.error_text(failure.error_class, lang, auth=AuthKind.OAUTH2)
            raise ApiError(
                422, "login_failed", message or failure.message, error_class=failure.error_class
            )
        grant = oauth2.grant(
            token_url=chosen.token_url,
            client_id=chosen.client_id,
            refresh_token=tokens.refresh_token,
            tokens=tokens,
        )
        with self.sessions.begin() as session:
            account = _same_login(session, user_id, key, settings, policy=self.policy)
            if account is None:
                user = session.get_one(User, user_id)
                account = add_account(session, user, key, settings, oauth2=grant)
                account.next_sync_at = utcnow()
            else:  # connected again: the new grant replaces the refused one
                set_credentials(account, key, settings, oauth2=grant)
                health.reset(account)

    def _provider(self, name: str) -> Provider:
        provider = self.oauth2_providers.get(name)
        if provider is None or not provider.configured:
            raise ApiError(404, "not_found", "no such OAuth2 provider is configured")
        return provider

    def _pending(self, user_id: int, key: DataKey) -> dict[str, Any]:
        """The flow this browser started, if the state matches and it has not expired."""
        lang = language(request)
        given = request.args.get("state", "")
        try:
            sealed = base64.urlsafe_b64decode(request.cookies.get(OAUTH2_COOKIE, "").encode())
            pending: dict[str, Any] = json.loads(
                key.decrypt(sealed, table="oauth2", column="pending", row=user_id)
            )
        except (ValueError, DecryptionFailed):
            raise ApiError(400, "oauth2_state", text(lang, "oauth2_state")) from None
        if not hmac.compare_digest(given.encode(), str(pending["state"]).encode()) or (
            pending["expires"] < time.time()
        ):
            raise ApiError(400, "oauth2_state", text(lang, "oauth2_state"))
        return pending

    def add_account(self) -> tuple[Response, int, dict]:
        """Store an account only after its server accepted the login."""
        user_id = self.user()
        data = _json_object()
        _known_fields(data, ADD_FIELDS)
        for name in ("host", "login", "password"):
            if name not in data:
                raise ApiError(400, "bad_request", f"{name} is required", field=name)
        security = data.get("security", "tls")
        if security not in SECURITY_MODES:
            raise ApiError(
                400,
                "bad_request",
                f"security must be one of {', '.join(SECURITY_MODES)}",
                field="security",
            )
        settings = ImapSettings(
            host=_host(data),
            port=_int(data, "port", default=None, maximum=MAX_PORT),
            username=_string(data, "login", maximum=MAX_LOGIN),
            password=_string(data, "password", maximum=MAX_PASSWORD),
            security=security,
        )
        folders = _folders(data)
        interval = _interval(data)
        key = self.key()
        self._verify(settings)
        with self.sessions.begin() as session:
            user = session.get_one(User, user_id)
            account = add_account(session, user, key, settings, folders=folders)
            account.sync_interval_seconds = interval or DEFAULT_INTERVAL_SECONDS
            account.next_sync_at = utcnow()
            account_id = account.id
        location = url_for(f"{BLUEPRINT_NAME}.account", account_id=account_id)
        return jsonify(self._account(user_id, account_id)), 201, {"Location": location}

    def account(self, account_id: int) -> ResponseReturnValue:
        """PATCH changes the account, DELETE removes it."""
        if request.method == "DELETE":
            return self.remove_account(account_id)
        return self.update_account(account_id)

    def update_account(self, account_id: int) -> Response:
        """A new password (checked first, then BROKEN and the circuit cleared), folders, interval,
        enabled."""
        user_id = self.user()
        data = _json_object()
        _known_fields(data, UPDATE_FIELDS)
        folders = _folders(data)
        interval = _interval(data)
        enabled = data.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise ApiError(400, "bad_request", "enabled must be true or false", field="enabled")
        password = _string(data, "password", maximum=MAX_PASSWORD) if "password" in data else None
        key = self.key() if password is not None or folders is not None else None
        with self.sessions() as session:
            account = self._owned(session, account_id, user_id)
            settings = None
            if key is not None and password is not None:
                if account.auth_kind == AuthKind.OAUTH2:
                    raise ApiError(
                        400,
                        "oauth2_account",
                        text(language(request), "oauth2_no_password"),
                        field="password",
                    )
                stored = account_settings(account, key, policy=self.policy)
                settings = replace(stored, password=password)
        if settings is not None:
            self._verify(settings)
        with self.sessions.begin() as session:
            account = self._owned(session, account_id, user_id)
            if key is not None and settings is not None:
                set_credentials(account, key, settings)
                health.reset(account)
            if key is not None and folders is not None:
                set_folders(account, key, folders)
            if interval is not None:
                account.sync_interval_seconds = interval
            if enabled is not None:
                account.enabled = enabled
        return jsonify(self._account(user_id, account_id))

    def remove_account(self, account_id: int) -> tuple[str, int]:
        """Remove the account with its stored mail (the page asks for a confirmation first)."""
        user_id = self.user()
        with self.sessions.begin() as session:
            session.delete(self._owned(session, account_id, user_id))
        return "", 204

    def _owned(self, session: Session, account_id: int, user_id: int) -> MailAccount:
        try:
            return owned_account(session, account_id, user_id)
        except NotFound:
            raise ApiError(404, "not_found", "account not found") from None

    @property
    def policy(self) -> AddressPolicy:
        """Which servers accounts may reach (`MAILPIPE_ALLOW_PRIVATE_HOSTS` and the like)."""
        return self.pipeline.settings.address_policy

    def _verify(self, settings: ImapSettings) -> None:
        """Answer 422 with the reason in the user's words when the server refuses the login
        (or the address policy refuses the server)."""
        failure = verify_login(replace(settings, policy=self.policy))
        if failure is not None:
            message = present.error_text(
                failure.error_class, language(request), auth=AuthKind.PASSWORD
            )
            raise ApiError(
                422,
                "login_failed",
                message or failure.message,
                error_class=failure.error_class,
            )

    def _account(self, user_id: int, account_id: int) -> dict:
        labels = self._labels(user_id)
        lang = language(request)
        for health_row in self.pipeline.get_account_health(user_id, key=self.current_key()):
            if health_row.account_id == account_id:
                return present.account_view(health_row, labels=labels, lang=lang)
        raise ApiError(404, "not_found", "account not found")

    def diagnostics(self, account_id: int) -> tuple[Response, int, dict]:
        """Queue a check of the account: a worker connects to the server, never this request."""
        user_id = self.user()
        key = self.key()
        try:
            request_id = self.pipeline.request_diagnosis(user_id, account_id, key=key)
        except NotFound:
            raise ApiError(404, "not_found", "account not found") from None
        except TooManyRequests as error:
            raise ApiError(
                429, "too_many_checks", str(error), retry_after=error.retry_after
            ) from None
        except WorkerKeyError:
            raise ApiError(503, "unavailable", "the workers' key is not configured") from None
        location = url_for(f"{BLUEPRINT_NAME}.diagnosis", request_id=request_id)
        body = {"request_id": request_id, "status_url": location}
        return jsonify(body), 202, {"Location": location}

    def push(self, account_id: int) -> Response:
        """Push (IMAP IDLE) on or off for one of the user's accounts; its card's data back."""
        user_id = self.user()
        data = _json_object()
        unknown = sorted(set(data) - {"enabled"})
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field {unknown[0]!r}", field=unknown[0])
        enabled = data.get("enabled")
        if type(enabled) is not bool:
            raise ApiError(400, "bad_request", "enabled must be true or false", field="enabled")
        with self.sessions.begin() as session:
            try:
                set_push(session, account_id, user_id, enabled=enabled)
            except NotFound:
                raise ApiError(404, "not_found", "account not found") from None
        [account] = [
            a
            for a in self.pipeline.get_account_health(user_id, key=self.current_key())
            if a.account_id == account_id
        ]
        view = present.account_view(account, labels=self._labels(user_id), lang=language(request))
        return jsonify(view)

    def diagnosis(self, request_id: str) -> Response:
        user_id = self.user()
        key = self.key()
        with self.sessions() as session:
            try:
                view = diagnostics.check_view(
                    session, request_id, user_id=user_id, key=key, lang=language(request)
                )
            except NotFound:
                raise ApiError(404, "not_found", "check not found") from None
        return jsonify(view)

    def performance(self) -> Response:
        return jsonify(self.pipeline.get_performance_metrics(self.user()).to_json())

    # -- mail ------------------------------------------------------------------------------

    def mail(self) -> Response:
        user_id = self.user()
        key = self.key()
        limit = _query_int("limit", default=PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        account_id = None
        if "account_id" in request.args:
            account_id = _query_int("account_id", default=1, maximum=MAX_ID)
        since = None
        if "since" in request.args:
            since = _query_instant("since")
        with self.sessions() as session:
            try:
                page = mail.list_mail(
                    session,
                    user_id=user_id,
                    key=key,
                    account_id=account_id,
                    folder=request.args.get("folder"),
                    since=since,
                    before=request.args.get("before"),
                    limit=limit,
                )
            except NotFound:
                raise ApiError(
                    400,
                    "bad_request",
                    "before must be a next_before you were given",
                    field="before",
                ) from None
        return jsonify(page.to_json())

    def mail_changes(self) -> Response:
        user_id = self.user()
        key = self.key()
        limit = _query_int("limit", default=PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        with self.sessions() as session:
            try:
                page = mail.mail_changes(
                    session,
                    user_id=user_id,
                    key=key,
                    cursor=request.args.get("cursor"),
                    limit=limit,
                )
            except ValueError:
                raise ApiError(
                    400, "bad_request", "cursor must be one this feed gave", field="cursor"
                ) from None
        return jsonify(page.to_json())

    def mail_message(self, mail_id: str) -> Response:
        user_id = self.user()
        key = self.key()
        with self.sessions() as session:
            try:
                message = mail.read_mail(session, user_id=user_id, key=key, mail_id=mail_id)
            except NotFound:
                raise ApiError(404, "not_found", "mail not found") from None
        return jsonify(message.to_json())

    # -- notifications ---------------------------------------------------------------------

    def notifications(self) -> Response:
        user_id = self.user()
        limit = _query_int("limit", default=DEFAULT_NOTIFICATIONS, maximum=MAX_NOTIFICATIONS)
        with self.sessions() as session:
            return jsonify(
                present.user_notifications(session, user_id, limit=limit, lang=language(request))
            )

    def mark_read(self, notification_id: int) -> Response:
        user_id = self.user()
        with self.sessions.begin() as session:
            row = session.scalar(
                select(Notification).where(
                    Notification.id == notification_id, Notification.user_id == user_id
                )
            )
            if row is None:
                raise ApiError(404, "not_found", "notification not found")
            if row.read_at is None:
                row.read_at = utcnow()
            return jsonify(present.notification_view(row, language(request)))

    def mark_all_read(self) -> Response:
        user_id = self.user()
        with self.sessions.begin() as session:
            marked = db.rowcount(
                session.execute(
                    update(Notification)
                    .where(Notification.user_id == user_id, Notification.read_at.is_(None))
                    .values(read_at=utcnow())
                )
            )
        return jsonify({"marked": marked})

    # -- operators -------------------------------------------------------------------------

    def alertmanager(self) -> Response:
        """Alertmanager's webhook: each alert becomes one operator notification, stored once."""
        if not self.alert_token:
            raise ApiError(503, "unavailable", "no alert token is configured")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.alert_token.encode()
        ):
            raise ApiError(401, "alert_token", "missing or wrong bearer token")
        rows = _alert_rows(_json_object())
        try:
            stored = self._store_alerts(rows)
        except IntegrityError:  # the same alert arrived twice at once: the other request won
            stored = self._store_alerts(rows)
        return jsonify({"received": len(rows), "stored": stored})

    def _store_alerts(self, rows: list[dict]) -> int:
        keys = list({row["dedupe_key"] for row in rows})
        with self.sessions.begin() as session:
            known = set(
                session.scalars(
                    select(Notification.dedupe_key).where(Notification.dedupe_key.in_(keys))
                )
            )
            fresh: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["dedupe_key"] not in known:
                    fresh.setdefault(row["dedupe_key"], row)
            session.add_all(Notification(**row) for row in fresh.values())
        return len(fresh)

    def openapi(self) -> Response:
        return jsonify(OPENAPI)

    def _labels(self, user_id: int) -> dict[int, str]:
        with self.sessions() as session:
            return present.account_labels(
                session, user_id, self.current_key(), lang=language(request)
            )


def create_blueprint(
    *,
    current_user: Callable[[], int | None],
    current_key: Callable[[], DataKey | None],
    csrf_token: Callable[[], str | None],
    pipeline: PipelineBroker,
    sessions: sessionmaker[Session] | None = None,
    alert_token: str | None = None,
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS,
    oauth2_providers: Mapping[str, Provider] | None = None,
    home_url: str = "/",
) -> Blueprint:
    """The API bound to the host's session; `sessions` defaults to the pipeline's database.
    `oauth2_providers` (`Settings.oauth2_providers`) offer "connect with ..."; the flow ends
    on `home_url`."""
    api = _Api(
        current_user=current_user,
        current_key=current_key,
        csrf_token=csrf_token,
        pipeline=pipeline,
        sessions=sessions or pipeline.sessions,
        alert_token=alert_token,
        max_queued_jobs=max_queued_jobs,
        oauth2_providers=oauth2_providers or {},
        home_url=home_url,
    )
    blueprint = Blueprint(BLUEPRINT_NAME, __name__, url_prefix=API_PREFIX)
    blueprint.before_request(api.guard)
    blueprint.register_error_handler(ApiError, error_response)
    blueprint.register_error_handler(HTTPException, http_error_response)
    blueprint.after_request(_no_store)
    routes: list[tuple[str, str, Callable[..., ResponseReturnValue], str]] = [  # methods: spaced
        ("/jobs/fetch", "fetch", api.fetch, "POST"),
        ("/jobs/history", "history", api.history, "GET"),
        ("/jobs/<job_id>", "job_status", api.job_status, "GET"),
        ("/accounts/health", "health", api.health, "GET"),
        ("/accounts/presets", "presets", api.presets, "GET"),
        ("/accounts", "add_account", api.add_account, "POST"),
        (f"/accounts/<{ID}:account_id>", "account", api.account, "PATCH DELETE"),
        (f"/accounts/<{ID}:account_id>/diagnostics", "diagnostics", api.diagnostics, "POST"),
        (f"/accounts/<{ID}:account_id>/push", "push", api.push, "POST"),
        ("/diagnostics/<request_id>", "diagnosis", api.diagnosis, "GET"),
        ("/oauth2/<provider>/start", "oauth2_start", api.oauth2_start, "POST"),
        ("/oauth2/callback", "oauth2_callback", api.oauth2_callback, "GET"),
        ("/metrics/performance", "performance", api.performance, "GET"),
        ("/mail", "mail", api.mail, "GET"),
        ("/mail/changes", "mail_changes", api.mail_changes, "GET"),
        ("/mail/<mail_id>", "mail_message", api.mail_message, "GET"),
        ("/notifications", "notifications", api.notifications, "GET"),
        (f"/notifications/<{ID}:notification_id>/read", "mark_read", api.mark_read, "POST"),
        ("/notifications/read-all", "mark_all_read", api.mark_all_read, "POST"),
        ("/alerts/alertmanager", "alertmanager", api.alertmanager, "POST"),
        ("/openapi.json", "openapi", api.openapi, "GET"),
    ]
    for rule, endpoint, view, methods in routes:  # one rule per path: a bad id is then a 404
        blueprint.add_url_rule(rule, endpoint, view, methods=methods.split())
    return blueprint


def _no_store(response: Response) -> Response:
    """Job and account data are personal: no shared cache may keep them."""
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _json_object() -> dict:
    """The request body as a JSON object; an empty body counts as `{}`."""
    if not request.get_data(cache=True):
        return {}
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # nested deeper than the parser goes: not a body we take
        data = None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object", field="body")
    return data


def _int(data: dict, name: str, *, default: int | None, maximum: int) -> int | None:
    """A whole number from 1 to `maximum`; booleans and fractions are refused by name."""
    if name not in data:
        return default
    value = data[name]
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 5.0 as an integer
        value = int(value)
    if type(value) is not int or not 1 <= value <= maximum:
        raise ApiError(
            400, "bad_request", f"{name} must be a whole number from 1 to {maximum}", field=name
        )
    return value


def _same_login(
    session: Session, user_id: int, key: DataKey, settings: ImapSettings, *, policy: AddressPolicy
) -> MailAccount | None:
    """The user's account on this server with this login, which a new grant reconnects."""
    for account in session.scalars(select(MailAccount).where(MailAccount.user_id == user_id)):
        try:
            stored = account_settings(account, key, policy=policy)
        except (DecryptionFailed, ValueError, TypeError):
            continue
        if (stored.host, stored.effective_port, stored.username) == (
            settings.host,
            settings.effective_port,
            settings.username,
        ):
            return account
    return None


def _string(data: dict, name: str, *, maximum: int) -> str:
    """A non-empty string of at most `maximum` characters, without control characters."""
    value = data.get(name)
    if (
        not _text(value)
        or not 0 < len(value) <= maximum
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ApiError(
            400,
            "bad_request",
            f"{name} must be a non-empty string of at most {maximum} characters",
            field=name,
        )
    return value


def _host(data: dict) -> str:
    host = _string(data, "host", maximum=MAX_HOST)
    if not re.fullmatch(HOST_PATTERN, host):
        raise ApiError(400, "bad_request", "host must be a host name or address", field="host")
    return host


def _folders(data: dict) -> list[str] | None:
    if "folders" not in data:
        return None
    folders = data["folders"]
    if (
        not isinstance(folders, list)
        or not 0 < len(folders) <= MAX_FOLDERS
        or not all(isinstance(f, str) and 0 < len(f) <= MAX_FOLDER for f in folders)
    ):
        raise ApiError(
            400,
            "bad_request",
            f"folders must be a list of 1 to {MAX_FOLDERS} folder names",
            field="folders",
        )
    return list(dict.fromkeys(folders))


def _interval(data: dict) -> int | None:
    interval = _int(data, "interval", default=None, maximum=MAX_INTERVAL_SECONDS)
    if interval is not None and interval < MIN_INTERVAL_SECONDS:
        raise ApiError(
            400,
            "bad_request",
            f"interval must be from {MIN_INTERVAL_SECONDS} to {MAX_INTERVAL_SECONDS} seconds",
            field="interval",
        )
    return interval


def _known_fields(data: dict, fields: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ApiError(400, "bad_request", f"unknown field {unknown[0]!r}", field=unknown[0])


def _query_int(name: str, *, default: int, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise ApiError(
            400, "bad_request", f"{name} must be a whole number from 1 to {maximum}", field=name
        )
    return int(raw)


def _text(value: object) -> TypeGuard[str]:
    """A string that UTF-8 can hold (JSON lets a lone surrogate through, "\\ud800")."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _query_instant(name: str) -> datetime:
    """An instant from the query string: ISO 8601 with its offset (a time without one names no
    instant)."""
    try:
        moment = datetime.fromisoformat(request.args[name])
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise ApiError(
            400, "bad_request", f"{name} must be ISO 8601 with an offset, e.g. +00:00", field=name
        )
    return moment


def _alert_rows(payload: dict) -> list[dict]:
    """Validate Alertmanager's webhook payload (version 4) into notification rows."""
    alerts = payload.get("alerts")
    if not isinstance(alerts, list) or len(alerts) > MAX_ALERTS:
        raise ApiError(
            400, "bad_request", f"alerts must be a list of at most {MAX_ALERTS}", field="alerts"
        )
    rows = []
    for index, alert in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(alert, dict):
            raise ApiError(400, "bad_request", f"{where} must be an object", field=where)
        status = alert.get("status")
        fingerprint = alert.get("fingerprint")
        starts_at = alert.get("startsAt")
        labels = alert.get("labels", {})
        annotations = alert.get("annotations", {})
        if status not in ALERT_STATUSES:
            raise ApiError(
                400, "bad_request", "status must be firing or resolved", field=f"{where}.status"
            )
        for name, value in (("fingerprint", fingerprint), ("startsAt", starts_at)):
            if not _text(value) or not 0 < len(value) <= MAX_FINGERPRINT:
                raise ApiError(
                    400,
                    "bad_request",
                    f"{name} must be a non-empty string of at most {MAX_FINGERPRINT}",
                    field=f"{where}.{name}",
                )
        for name, mapping in (("labels", labels), ("annotations", annotations)):
            if not isinstance(mapping, dict) or not all(
                _text(v) and len(v) <= MAX_LABEL for v in mapping.values()
            ):
                raise ApiError(
                    400,
                    "bad_request",
                    f"{name} must map names to strings",
                    field=f"{where}.{name}",
                )
        identity = f"{fingerprint}|{starts_at}|{status}".encode()
        summary = annotations.get("summary") or annotations.get("description") or ""
        name = labels.get("alertname", "alert")
        severity = labels.get("severity")
        rows.append(
            {
                "user_id": None,
                "kind": ALERT_KIND,
                "severity": severity if severity in ALERT_SEVERITIES else "warning",
                "message": f"{name} ({status}): {summary}".strip(": ")[:MAX_MESSAGE],
                "dedupe_key": "alert:" + hashlib.sha256(identity).hexdigest(),
            }
        )
    return rows
