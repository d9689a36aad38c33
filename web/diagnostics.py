"""The account check a user runs from the dashboard, answered while they wait.

It is the core's full diagnostics suite (`mailpipe.diagnostics`) with a short timeout, plus the
few summary figures the dashboard shows. The answer never holds the host, login, secret or any
mail: the suite leaves them out and redacts server texts that repeat them.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from mailpipe.diagnostics import CAPABILITIES, CONNECTION, LOGIN, OK, ROUND_TRIP, TLS, diagnose
from mailpipe.imap import ImapSettings

CHECK_TIMEOUT_SECONDS = 10.0
CONNECT_STEPS = (CONNECTION, TLS, LOGIN)  # connect, secure, log in: what "connect" means here


def check_account(
    settings: ImapSettings,
    *,
    sessions: sessionmaker[Session],
    account_id: int,
    timeout: float = CHECK_TIMEOUT_SECONDS,
) -> dict:
    """Every check, and first the figures the dashboard shows (connect time, round trip)."""
    diagnosis = diagnose(settings, sessions=sessions, account_id=account_id, timeout=timeout)
    report = diagnosis.to_json()
    connect = [diagnosis.check(name) for name in CONNECT_STEPS]
    capabilities = diagnosis.check(CAPABILITIES)
    round_trip = diagnosis.check(ROUND_TRIP)
    logged_in = diagnosis.check(LOGIN).status == OK
    return {
        "ok": report["ok"],
        "security": report["security"],
        "connect_seconds": (
            round(sum(check.duration_ms or 0.0 for check in connect) / 1000, 6)
            if logged_in
            else None
        ),
        "round_trip_seconds": (
            round(round_trip.details["median_ms"] / 1000, 6) if round_trip.status == OK else None
        ),
        "capabilities": capabilities.details.get("offered", []),
        "imap4rev1": bool(capabilities.details.get("imap4rev1")),
        "error_class": report["error_class"],
        "error": report["reason"],
        "provider_guess": report["provider"],
        "duration_ms": report["duration_ms"],
        "checks": report["checks"],
    }
