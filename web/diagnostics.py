"""A quick connection check a user can run on one account, answered while they wait.

It is deliberately small: connect, log in, one NOOP, log out. The answer says whether that
worked, how long it took and what the server offers; never the host, login, secret or any mail.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

from mailpipe import imap
from mailpipe.failures import classify
from mailpipe.imap import ImapSettings

CHECK_TIMEOUT_SECONDS = 10.0
MAX_CAPABILITIES = 64
MAX_CAPABILITY_LENGTH = 64
REQUIRED_CAPABILITY = "IMAP4REV1"


def quick_check(settings: ImapSettings, *, timeout: float = CHECK_TIMEOUT_SECONDS) -> dict:
    """Log in and measure one round trip, so a user sees at once whether an account works."""
    settings = replace(
        settings,
        connect_timeout=min(settings.connect_timeout, timeout),
        command_timeout=min(settings.command_timeout, timeout),
    )
    report: dict = {
        "ok": False,
        "security": settings.security,
        "connect_seconds": None,
        "round_trip_seconds": None,
        "capabilities": [],
        "imap4rev1": False,
        "error_class": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        client = imap.connect(settings)
    except Exception as error:
        return _failed(report, error)
    try:
        report["connect_seconds"] = round(time.perf_counter() - started, 4)
        capabilities = [_text(c) for c in client.capabilities()][:MAX_CAPABILITIES]
        report["capabilities"] = sorted(c[:MAX_CAPABILITY_LENGTH] for c in capabilities)
        report["imap4rev1"] = REQUIRED_CAPABILITY in (c.upper() for c in capabilities)
        begun = time.perf_counter()
        client.noop()
        report["round_trip_seconds"] = round(time.perf_counter() - begun, 4)
        if not report["imap4rev1"]:
            return {
                **report,
                "error_class": "unknown",
                "error": "the server does not offer IMAP4rev1",
            }
        report["ok"] = True
    except Exception as error:
        return _failed(report, error)
    finally:
        _logout(client)
    return report


def _failed(report: dict, error: Exception) -> dict:
    """Only the error class and the core's one-line cause, which hold no secret by design."""
    failure = classify(error)
    return {**report, "ok": False, "error_class": failure.error_class, "error": failure.message}


def _text(capability: bytes | str) -> str:
    return capability.decode("ascii", "replace") if isinstance(capability, bytes) else capability


def _logout(client) -> None:
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            imap.shutdown(client)
