"""The account check a user starts from the dashboard, as the poll of its request answers it.

A worker runs the core's full diagnostics suite (`mailpipe.diagnostics`) and stores the report
encrypted for the owner; this turns it into the few figures the dashboard shows, in the
reader's language. The answer never holds the host, login, secret or any mail: the suite
leaves them out and redacts server texts that repeat them.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from mailpipe.crypto import DataKey
from mailpipe.diagnostics import (
    CAPABILITIES,
    CONNECTION,
    LOGIN,
    OK,
    ROUND_TRIP,
    TLS,
    diagnosis_result,
)
from mailpipe.models import MailAccount, iso
from mailpipe.vocabulary import DiagnosisStatus

from .i18n import text
from .present import error_text

CONNECT_STEPS = (CONNECTION, TLS, LOGIN)  # connect, secure, log in: what "connect" means here


def check_view(session: Session, request_id: str, *, user_id: int, key: DataKey, lang: str) -> dict:
    """A requested check of the owner's: pending, not run (and why), or its figures and checks.

    Raises NotFound for a request that is not the user's.
    """
    result = diagnosis_result(session, request_id, user_id=user_id, key=key)
    account = session.get_one(MailAccount, result.account_id)
    view = {
        "request_id": result.id,
        "account_id": result.account_id,
        "provider": account.provider,
        "status": result.status,
        "created_at": iso(result.created_at),
        "finished_at": iso(result.finished_at),
    }
    if result.status == DiagnosisStatus.PENDING:
        return view
    if result.status == DiagnosisStatus.FAILED or result.report is None:
        return {
            **view,
            "ok": False,
            "error_class": None,
            "error": result.error,
            "message": text(lang, "check_not_run"),
        }
    figures = summary(result.report)
    message = error_text(figures["error_class"], lang, auth=account.auth_kind)
    return {**view, **figures, "message": message}


def summary(report: dict) -> dict:
    """The figures the dashboard shows (connect time, round trip), then every check."""
    checks = {check["name"]: check for check in report["checks"]}
    capabilities = checks[CAPABILITIES]["details"]
    round_trip = checks[ROUND_TRIP]
    logged_in = checks[LOGIN]["status"] == OK
    connect_ms = sum(checks[name]["duration_ms"] or 0.0 for name in CONNECT_STEPS)
    return {
        "ok": report["ok"],
        "security": report["security"],
        "connect_seconds": round(connect_ms / 1000, 6) if logged_in else None,
        "round_trip_seconds": (
            round(round_trip["details"]["median_ms"] / 1000, 6)
            if round_trip["status"] == OK
            else None
        ),
        "capabilities": capabilities.get("offered", []),
        "imap4rev1": bool(capabilities.get("imap4rev1")),
        "error_class": report["error_class"],
        "error": report["reason"],
        "provider_guess": report["provider"],
        "duration_ms": report["duration_ms"],
        "checks": report["checks"],
    }
