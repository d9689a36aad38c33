"""The API's OpenAPI 3.1 document, kept as data beside the routes (a test checks they match)."""

from __future__ import annotations

from mailpipe import diagnostics
from mailpipe.jobs import MAX_TIMEOUT_SECONDS
from mailpipe.mail import MAX_PAGE_SIZE, PAGE_SIZE
from mailpipe.results import (
    AccountHealth,
    ChangePage,
    JobSummary,
    MailMessage,
    MailPage,
    Performance,
    RunReport,
)
from mailpipe.vocabulary import DiagnosisStatus

from .schemas import object_schema

MAX_ID = 2**31 - 1
MAX_MAILS = 10_000
DEFAULT_MAX_MAILS = 100
DEFAULT_TIMEOUT_SECONDS = 120
DEFAULT_HISTORY = 20
MAX_HISTORY = 100
DEFAULT_NOTIFICATIONS = 50
MAX_NOTIFICATIONS = 200
MAX_ALERTS = 1000
MAX_FINGERPRINT = 200
MAX_LABEL = 1000
MAX_HOST = 253
MAX_PORT = 65535
MAX_LOGIN = 320
MAX_PASSWORD = 1000
MAX_FOLDERS = 50
MAX_FOLDER = 1000
MIN_INTERVAL_SECONDS = 60
MAX_INTERVAL_SECONDS = 86400
DEFAULT_INTERVAL_SECONDS = 300
HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
NULLABLE_STRING = {"type": ["string", "null"]}
INSTANT = {"type": "string", "format": "date-time"}
NULLABLE_INSTANT = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_NUMBER = {"type": ["number", "null"]}
NULLABLE_INTEGER = {"type": ["integer", "null"]}
SESSION: list[dict[str, list[str]]] = [{"session": []}]
SESSION_POST: list[dict[str, list[str]]] = [{"session": [], "csrf": []}]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response: dict = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict:
    return {"$ref": f"#/components/responses/{description}"}


def _id_parameter(name: str, description: str) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    }


def _limit(default: int, maximum: int) -> dict:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
    }


LANG = {
    "name": "lang",
    "in": "query",
    "required": False,
    "description": "language of the texts meant for users (default: Accept-Language, then de)",
    "schema": {"type": "string", "enum": ["de", "en"]},
}

JOB_SUMMARY = object_schema(
    JobSummary,
    overrides={"created_at": {"description": "ISO 8601 with its offset, as every instant"}},
    extra={
        "status_text": {"type": "string", "description": "the status in user words"},
        "reason_text": {
            **NULLABLE_STRING,
            "description": "why the job did not fetch every account (no account, skips)",
        },
        "duration": {**NULLABLE_NUMBER, "description": "seconds from start to end"},
        "account_ids": {"type": "array", "items": {"type": "integer"}},
        "accounts_label": {"type": "string", "description": '"alle"/"all" or account names'},
    },
)

ACCOUNT_RUN = object_schema(
    RunReport,
    overrides={"error": {"description": "the technical cause, one line, no secret"}},
    extra={
        "label": {"type": "string"},
        "status_text": {"type": "string"},
        "message": {**NULLABLE_STRING, "description": "what went wrong, in user words"},
    },
)

ACCOUNT_HEALTH = object_schema(
    AccountHealth,
    extra={
        "label": {"type": "string"},
        "health_text": {"type": "string"},
        "last_error_text": NULLABLE_STRING,
        "recent_text": {
            **NULLABLE_STRING,
            "description": '"N Fehler in den letzten 5 Versuchen", null before the first run',
        },
        "fetch_mode_text": {"type": "string"},
    },
)

PERFORMANCE = object_schema(Performance, overrides={"trend": {"description": "the last 7 days"}})

MAIL_PAGE = object_schema(
    MailPage,
    overrides={"next_before": {"description": "pass as `before` for the next, older page"}},
)
MAIL_MESSAGE = object_schema(MailMessage)
CHANGE_PAGE = object_schema(ChangePage)

NOTIFICATION = {
    "type": "object",
    "required": ["id", "kind", "severity", "message", "text", "created_at", "read_at"],
    "properties": {
        "id": {"type": "integer"},
        "kind": {"type": "string"},
        "severity": {"type": "string"},
        "message": {"type": "string", "description": "in English, as stored"},
        "text": {"type": "string", "description": "in the language asked for (`lang`)"},
        "params": {
            "type": ["object", "null"],
            "description": "what the kind needs to be said in any language: provider, "
            "error_class or error_classes, minutes",
        },
        "account_id": NULLABLE_INTEGER,
        "job_id": NULLABLE_STRING,
        "created_at": INSTANT,
        "read_at": NULLABLE_INSTANT,
    },
}

FOLDERS = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_FOLDERS,
    "items": {"type": "string", "minLength": 1, "maxLength": MAX_FOLDER},
    "description": "folders to fetch (default INBOX)",
}
INTERVAL = {
    "type": "integer",
    "minimum": MIN_INTERVAL_SECONDS,
    "maximum": MAX_INTERVAL_SECONDS,
    "description": "seconds between background fetches",
}

OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "mailpipe web API",
        "version": "1",
        "description": (
            "Start mail fetches, follow them, and see account health, performance and "
            "notifications; add, change and remove accounts, or connect them with OAuth2. "
            "Session-authenticated POST, PATCH and DELETE requests need the session's CSRF "
            "token in the X-CSRF-Token header. Anything that is not the caller's own answers 404."
        ),
    },
    "paths": {
        "/api/jobs/fetch": {
            "post": {
                "operationId": "fetch",
                "summary": "Start a fetch of one account or all of the user's accounts",
                "security": SESSION_POST,
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("FetchRequest")}},
                },
                "responses": {
                    "202": _json(
                        _ref("JobAccepted"),
                        "the job is queued",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                    "429": _error("TooManyJobs"),
                    "503": _error("Unavailable"),
                },
            }
        },
        "/api/jobs/history": {
            "get": {
                "operationId": "history",
                "summary": "The user's last jobs, newest first",
                "security": SESSION,
                "parameters": [_limit(DEFAULT_HISTORY, MAX_HISTORY), LANG],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["jobs"],
                            "properties": {"jobs": {"type": "array", "items": _ref("JobSummary")}},
                        },
                        "the jobs",
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/jobs/{job_id}": {
            "get": {
                "operationId": "job_status",
                "summary": "One job: status, per-account progress, phases, counts, errors",
                "security": SESSION,
                "parameters": [
                    {
                        "name": "job_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    LANG,
                ],
                "responses": {
                    "200": _json(_ref("JobStatus"), "the job"),
                    "401": _error("Unauthorized"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/accounts/health": {
            "get": {
                "operationId": "health",
                "summary": "Each account's health, last check and last error in plain words",
                "security": SESSION,
                "parameters": [LANG],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["accounts"],
                            "properties": {
                                "accounts": {"type": "array", "items": _ref("AccountHealth")}
                            },
                        },
                        "the accounts",
                    ),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/accounts/presets": {
            "get": {
                "operationId": "presets",
                "summary": "Common providers' IMAP servers, to fill host, port and security",
                "security": SESSION,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["presets", "oauth2"],
                            "properties": {
                                "presets": {"type": "array", "items": _ref("Preset")},
                                "oauth2": {
                                    "type": "array",
                                    "description": "the OAuth2 providers one can connect with",
                                    "items": {
                                        "type": "object",
                                        "required": ["name", "display"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "display": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                        "the presets",
                    ),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/accounts": {
            "post": {
                "operationId": "add_account",
                "summary": "Add an account; the server must accept the login first, or nothing "
                "is stored",
                "security": SESSION_POST,
                "parameters": [LANG],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewAccount")}},
                },
                "responses": {
                    "201": _json(
                        _ref("AccountHealth"),
                        "the account is stored",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "422": _error("LoginFailed"),
                },
            }
        },
        "/api/accounts/{account_id}": {
            "patch": {
                "operationId": "update_account",
                "summary": "Change the password (checked first; clears BROKEN and the circuit), "
                "folders, interval or enabled",
                "security": SESSION_POST,
                "parameters": [_id_parameter("account_id", "the account to change"), LANG],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AccountChange")}},
                },
                "responses": {
                    "200": _json(_ref("AccountHealth"), "the account as it is now"),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                    "422": _error("LoginFailed"),
                },
            },
            "delete": {
                "operationId": "remove_account",
                "summary": "Remove the account and its stored mail",
                "security": SESSION_POST,
                "parameters": [_id_parameter("account_id", "the account to remove")],
                "responses": {
                    "204": {"description": "removed"},
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                },
            },
        },
        "/api/oauth2/{provider}/start": {
            "post": {
                "operationId": "oauth2_start",
                "summary": "Start connecting an account with a configured OAuth2 provider "
                "(authorization code with PKCE): the answer says where to send the browser",
                "security": SESSION_POST,
                "parameters": [
                    {
                        "name": "provider",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "google, microsoft or generic, as configured",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["login"],
                                "properties": {
                                    "login": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": MAX_LOGIN,
                                        "description": "the mail address at the provider",
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["authorization_url"],
                            "properties": {"authorization_url": {"type": "string"}},
                        },
                        "send the browser there; a short-lived cookie holds the sealed state",
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/oauth2/callback": {
            "get": {
                "operationId": "oauth2_callback",
                "summary": "Where the provider sends the browser back: the code is traded for "
                "tokens, the IMAP login checked and the refresh token stored encrypted",
                "security": SESSION,
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                    for name in ("code", "state", "error")
                ]
                + [LANG],
                "responses": {
                    "303": {
                        "description": "back to the dashboard: connected, or with "
                        "`#oauth2-error=<text key>` saying why not (state expired or forged, "
                        "consent declined, token or IMAP login refused, provider down)"
                    },
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/accounts/{account_id}/diagnostics": {
            "post": {
                "operationId": "diagnostics",
                "summary": "Queue a check of the account's connection; a worker runs it",
                "security": SESSION_POST,
                "parameters": [_id_parameter("account_id", "the account to check")],
                "responses": {
                    "202": _json(
                        _ref("DiagnosisAccepted"),
                        "the check is queued: poll status_url",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                    "429": _error("TooManyChecks"),
                    "503": _error("Unavailable"),
                },
            }
        },
        "/api/accounts/{account_id}/push": {
            "post": {
                "operationId": "push",
                "summary": "Turn push (IMAP IDLE) on or off for one account",
                "security": SESSION_POST,
                "parameters": [_id_parameter("account_id", "the account"), LANG],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("PushRequest")}},
                },
                "responses": {
                    "200": _json(_ref("AccountHealth"), "the account, as its card shows it"),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/diagnostics/{request_id}": {
            "get": {
                "operationId": "diagnosis",
                "summary": "One requested check: pending, not run, or its figures and checks",
                "security": SESSION,
                "parameters": [
                    {
                        "name": "request_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    LANG,
                ],
                "responses": {
                    "200": _json(_ref("Diagnosis"), "the check (see status, then ok)"),
                    "401": _error("Unauthorized"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/metrics/performance": {
            "get": {
                "operationId": "performance",
                "summary": "Phase timings, durations, throughput and a 7-day trend",
                "security": SESSION,
                "responses": {
                    "200": _json(_ref("Performance"), "the user's performance figures"),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/mail": {
            "get": {
                "operationId": "mail",
                "summary": "The user's stored mail, newest first, a page at a time",
                "security": SESSION,
                "parameters": [
                    {
                        "name": "account_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                    },
                    {
                        "name": "folder",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "description": "received at or after this instant (ISO 8601 with offset)",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "before",
                        "in": "query",
                        "required": False,
                        "description": "the `next_before` of the previous page",
                        "schema": {"type": "string"},
                    },
                    _limit(PAGE_SIZE, MAX_PAGE_SIZE),
                ],
                "responses": {
                    "200": _json(_ref("MailPage"), "one page of mail"),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/mail/changes": {
            "get": {
                "operationId": "mail_changes",
                "summary": "What is new, changed or vanished in the user's mail since a cursor",
                "security": SESSION,
                "parameters": [
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "the `cursor` of the previous answer; left out: from the start",
                        "schema": {"type": "string"},
                    },
                    _limit(PAGE_SIZE, MAX_PAGE_SIZE),
                ],
                "responses": {
                    "200": _json(_ref("ChangePage"), "changes, oldest first, and the next cursor"),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/mail/{mail_id}": {
            "get": {
                "operationId": "mail_message",
                "summary": "One message with its parsed fields and annotations",
                "security": SESSION,
                "parameters": [
                    {
                        "name": "mail_id",
                        "in": "path",
                        "required": True,
                        "description": "a message's id, as the list gives it",
                        "schema": {"type": "string", "pattern": "^[0-9a-f-]{32,36}$"},
                    }
                ],
                "responses": {
                    "200": _json(_ref("MailMessage"), "the message"),
                    "401": _error("Unauthorized"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/notifications": {
            "get": {
                "operationId": "notifications",
                "summary": "The user's notifications, newest first, and the unread count",
                "security": SESSION,
                "parameters": [_limit(DEFAULT_NOTIFICATIONS, MAX_NOTIFICATIONS), LANG],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["notifications", "unread"],
                            "properties": {
                                "notifications": {
                                    "type": "array",
                                    "items": _ref("Notification"),
                                },
                                "unread": {"type": "integer"},
                            },
                        },
                        "the notifications",
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                },
            }
        },
        "/api/notifications/{notification_id}/read": {
            "post": {
                "operationId": "mark_read",
                "summary": "Mark one notification as read",
                "security": SESSION_POST,
                "parameters": [_id_parameter("notification_id", "the notification"), LANG],
                "responses": {
                    "200": _json(_ref("Notification"), "the notification, now read"),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                    "404": _error("NotFound"),
                },
            }
        },
        "/api/notifications/read-all": {
            "post": {
                "operationId": "mark_all_read",
                "summary": "Mark all of the user's notifications as read",
                "security": SESSION_POST,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["marked"],
                            "properties": {"marked": {"type": "integer"}},
                        },
                        "how many were unread",
                    ),
                    "401": _error("Unauthorized"),
                    "403": _error("Forbidden"),
                },
            }
        },
        "/api/alerts/alertmanager": {
            "post": {
                "operationId": "alertmanager",
                "summary": "Alertmanager webhook: store each alert once as an operator notification",
                "security": [{"alertToken": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AlertmanagerPayload")}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["received", "stored"],
                            "properties": {
                                "received": {"type": "integer"},
                                "stored": {"type": "integer"},
                            },
                        },
                        "alerts received and newly stored (the rest were duplicates)",
                    ),
                    "400": _error("BadRequest"),
                    "401": _error("Unauthorized"),
                    "503": _error("Unavailable"),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
            }
        },
    },
    "components": {
        "securitySchemes": {
            "session": {"type": "apiKey", "in": "cookie", "name": "mailpipe_session"},
            "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
            "alertToken": {"type": "http", "scheme": "bearer"},
        },
        "responses": {
            name: _json(_ref("Error"), description)
            for name, description in {
                "BadRequest": "bad input; `field` names the field at fault",
                "Unauthorized": "not logged in, data key missing, or wrong bearer token",
                "Forbidden": "missing or wrong X-CSRF-Token",
                "NotFound": "no such job, account, check, notification or mail of this user",
                "TooManyJobs": "too many of the user's jobs are still queued or running",
                "TooManyChecks": "too many connection checks within a minute; the Retry-After "
                "header says when to ask again",
                "Unavailable": "the workers' key or the alert token is not configured, or the "
                "OAuth2 provider cannot be reached",
                "LoginFailed": "the server refused the login or could not be reached; `error` "
                "says why in the user's language, `error_class` is the cause",
            }.items()
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "code"],
                "properties": {
                    "error": {"type": "string"},
                    "code": {"type": "string"},
                    "field": {"type": "string"},
                    "error_class": {"type": "string"},
                },
            },
            "Preset": {
                "type": "object",
                "required": ["id", "name", "host", "port", "security", "provider", "oauth2"],
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "host": {"type": "string"},
                    "port": {"type": "integer"},
                    "security": {"type": "string", "enum": ["tls", "starttls", "none"]},
                    "provider": {"type": "string"},
                    "oauth2": {
                        **NULLABLE_STRING,
                        "description": "the OAuth2 provider this server wants, if any",
                    },
                },
            },
            "NewAccount": {
                "type": "object",
                "additionalProperties": False,
                "required": ["host", "login", "password"],
                "properties": {
                    "host": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_HOST,
                        "pattern": HOST_PATTERN,
                    },
                    "port": {"type": "integer", "minimum": 1, "maximum": MAX_PORT},
                    "security": {
                        "type": "string",
                        "enum": ["tls", "starttls", "none"],
                        "default": "tls",
                    },
                    "login": {"type": "string", "minLength": 1, "maxLength": MAX_LOGIN},
                    "password": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD},
                    "folders": FOLDERS,
                    "interval": INTERVAL,
                },
            },
            "AccountChange": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "password": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD},
                    "folders": FOLDERS,
                    "interval": INTERVAL,
                    "enabled": {"type": "boolean"},
                },
            },
            "PushRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["enabled"],
                "properties": {"enabled": {"type": "boolean"}},
            },
            "FetchRequest": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "account_id": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_ID,
                        "description": "one account; all enabled accounts when left out",
                    },
                    "max_mails": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_MAILS,
                        "default": DEFAULT_MAX_MAILS,
                    },
                    "timeout_seconds": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_TIMEOUT_SECONDS,
                        "default": DEFAULT_TIMEOUT_SECONDS,
                    },
                },
            },
            "JobAccepted": {
                "type": "object",
                "required": ["job_id", "status_url"],
                "properties": {"job_id": {"type": "string"}, "status_url": {"type": "string"}},
            },
            "JobSummary": JOB_SUMMARY,
            "JobStatus": {
                "allOf": [
                    JOB_SUMMARY,
                    {
                        "type": "object",
                        "required": ["accounts", "progress"],
                        "properties": {
                            "accounts": {"type": "array", "items": ACCOUNT_RUN},
                            "progress": {
                                "type": "object",
                                "required": ["done", "total"],
                                "properties": {
                                    "done": {"type": "integer"},
                                    "total": {"type": "integer"},
                                },
                            },
                        },
                    },
                ]
            },
            "AccountHealth": ACCOUNT_HEALTH,
            "DiagnosisAccepted": {
                "type": "object",
                "required": ["request_id", "status_url"],
                "properties": {
                    "request_id": {"type": "string"},
                    "status_url": {"type": "string"},
                },
            },
            "Diagnosis": {
                "type": "object",
                "required": ["request_id", "account_id", "status"],
                "description": "while pending, only the request's fields; when failed, why the "
                "check could not run; when done, the figures and every check",
                "properties": {
                    "request_id": {"type": "string"},
                    "account_id": {"type": "integer"},
                    "provider": {"type": "string"},
                    "status": {
                        "type": "string",
                        "enum": list(DiagnosisStatus),
                        "description": "failed: the check could not run (see error, message)",
                    },
                    "created_at": INSTANT,
                    "finished_at": NULLABLE_INSTANT,
                    "ok": {"type": "boolean", "description": "the check ran and none failed"},
                    "security": {"type": "string", "enum": ["tls", "starttls", "none"]},
                    "connect_seconds": {
                        **NULLABLE_NUMBER,
                        "description": "connect, secure and log in",
                    },
                    "round_trip_seconds": {**NULLABLE_NUMBER, "description": "median NOOP"},
                    "capabilities": {"type": "array", "items": {"type": "string"}},
                    "imap4rev1": {"type": "boolean"},
                    "error_class": {**NULLABLE_STRING, "description": "of the first failed check"},
                    "error": {
                        **NULLABLE_STRING,
                        "description": "why the first check failed, or why none ran",
                    },
                    "message": {**NULLABLE_STRING, "description": "the error in user words"},
                    "provider_guess": {
                        "type": "string",
                        "description": "from the host name, the server's ID or its greeting",
                    },
                    "duration_ms": {"type": "number"},
                    "checks": {"type": "array", "items": _ref("DiagnosticCheck")},
                },
            },
            "DiagnosticCheck": {
                "type": "object",
                "required": ["name", "status", "details"],
                "properties": {
                    "name": {"type": "string", "enum": list(diagnostics.CHECKS)},
                    "status": {
                        "type": "string",
                        "enum": [diagnostics.OK, diagnostics.FAILED, diagnostics.SKIPPED],
                    },
                    "reason": {
                        **NULLABLE_STRING,
                        "description": "why it failed or was skipped, in plain words",
                    },
                    "error_class": NULLABLE_STRING,
                    "duration_ms": NULLABLE_NUMBER,
                    "details": {"type": "object", "description": "what the check found"},
                },
            },
            "Performance": PERFORMANCE,
            "Notification": NOTIFICATION,
            "MailPage": MAIL_PAGE,
            "MailMessage": MAIL_MESSAGE,
            "ChangePage": CHANGE_PAGE,
            "AlertmanagerPayload": {
                "type": "object",
                "required": ["alerts"],
                "properties": {
                    "version": {"type": "string"},
                    "status": {"type": "string"},
                    "receiver": {"type": "string"},
                    "alerts": {
                        "type": "array",
                        "maxItems": MAX_ALERTS,
                        "items": {
                            "type": "object",
                            "required": ["status", "fingerprint", "startsAt"],
                            "properties": {
                                "status": {"type": "string", "enum": ["firing", "resolved"]},
                                "fingerprint": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": MAX_FINGERPRINT,
                                },
                                "startsAt": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": MAX_FINGERPRINT,
                                },
                                "endsAt": {"type": "string"},
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "string",
                                        "maxLength": MAX_LABEL,
                                    },
                                },
                                "annotations": {
                                    "type": "object",
                                    "additionalProperties": {
                                        "type": "string",
                                        "maxLength": MAX_LABEL,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
