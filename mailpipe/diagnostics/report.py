"""What a diagnosis says: each check's outcome, the whole report, and one line per check.

Server texts reach the report only through `clean`, which takes the host, the login and any
secret out of them, so a report can be shown, printed and stored as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"

CONNECTION = "connection"
TLS = "tls"
LOGIN_MECHANISMS = "login_mechanisms"
LOGIN = "login"
CAPABILITIES = "capabilities"
NAMESPACE = "namespace"
INBOX = "inbox"
FOLDERS = "folders"
SERVER_ID = "server_id"
ROUND_TRIP = "round_trip"
QUOTA = "quota"
DATABASE = "database"
CHECKS = (
    CONNECTION,
    TLS,
    LOGIN_MECHANISMS,
    LOGIN,
    CAPABILITIES,
    NAMESPACE,
    INBOX,
    FOLDERS,
    SERVER_ID,
    ROUND_TRIP,
    QUOTA,
    DATABASE,
)

MAX_TEXT = 200
REDACTED = "[redacted]"


@dataclass
class Check:
    """One check's outcome; `reason` says why it failed or was skipped, in plain words."""

    name: str
    status: str
    details: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    error_class: str | None = None
    duration_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "error_class": self.error_class,
            "duration_ms": self.duration_ms,
            "details": self.details,
        }


@dataclass
class Diagnosis:
    """Every check of one connection in order, and what they add up to."""

    checks: list[Check]
    provider: str
    security: str | None
    port: int | None
    started_at: datetime
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def failure(self) -> Check | None:
        """The first failed check: the one to act on."""
        return next((check for check in self.checks if check.status == FAILED), None)

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    def to_json(self) -> dict[str, Any]:
        failure = self.failure
        return {
            "ok": self.ok,
            "provider": self.provider,
            "security": self.security,
            "port": self.port,
            "started_at": self.started_at.isoformat(),
            "duration_ms": self.duration_ms,
            "error_class": failure.error_class if failure else None,
            "reason": failure.reason if failure else None,
            "checks": [check.to_json() for check in self.checks],
        }


def summarise(check: Check) -> str:
    """One line for people: the reason when it did not pass, the main figures when it did."""
    if check.status != OK:
        return check.reason or ""
    d = check.details
    describe: dict[str, Callable[[], str]] = {
        CONNECTION: lambda: f"greeting {d['greeting']!r}",
        TLS: lambda: _tls_summary(d),
        LOGIN_MECHANISMS: lambda: (
            f"{', '.join(d['mechanisms']) or 'no AUTH='}"
            + ("" if d["login_command"] else ", LOGIN disabled")
            + f"; uses {d['will_use']}"
        ),
        LOGIN: lambda: "logged in",
        CAPABILITIES: lambda: (
            f"has {' '.join(n for n, on in d['features'].items() if on) or 'none of the checked'}"
            f"; lacks {' '.join(n for n, on in d['features'].items() if not on) or 'nothing'}"
        ),
        NAMESPACE: lambda: ", ".join(
            f"{kind} {entry['prefix']!r} ({entry['delimiter']})"
            for kind in ("personal", "other", "shared")
            for entry in d[kind]
        ),
        INBOX: lambda: (
            f"{d['exists']} messages, UIDVALIDITY {d['uidvalidity']}, UIDNEXT {d['uidnext']}"
        ),
        FOLDERS: lambda: (
            f"{d['count']} folder(s); special use: "
            + (", ".join(f"{use} {name!r}" for use, name in d["special_use"].items()) or "none")
        ),
        SERVER_ID: lambda: (
            (
                " ".join(f"{key}={value}" for key, value in d["fields"].items())
                or "the server does not say what it is (ID NIL)"
            )
            + f"; provider {d['provider']}"
        ),
        ROUND_TRIP: lambda: (
            f"{d['command']} x{d['count']}: min {d['min_ms']:.2f}, "
            f"median {d['median_ms']:.2f}, max {d['max_ms']:.2f} ms"
        ),
        QUOTA: lambda: (
            ", ".join(f"{r['resource']} {r['usage']} of {r['limit']}" for r in d["resources"])
            or "no limits"
        ),
        DATABASE: lambda: (
            ", ".join(f"{n} {state}" for state, n in d["counts"].items()) or "no folders"
        ),
    }
    return describe[check.name]()


def _tls_summary(details: dict[str, Any]) -> str:
    certificate = details["certificate"] or {}
    return (
        f"{details['protocol']} {details['cipher']}; certificate {certificate.get('subject')} "
        f"from {certificate.get('issuer')}, {certificate.get('expires_in_days')} days left"
    )


def clean(text: str, redact: tuple[str, ...]) -> str:
    """One line of server text, capped, with the host, login and secrets taken out."""
    text = " ".join(text.split())
    for word in redact:
        whole = rf"(?<![\w.-]){re.escape(word)}(?![\w.-])"
        text = re.sub(whole, REDACTED, text, flags=re.IGNORECASE)
    return text[:MAX_TEXT]


def text(value: bytes | str) -> str:
    """A server's word as text, whether IMAPClient handed it over as bytes or as str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def ms(seconds: float) -> float:
    """Milliseconds as the report keeps them."""
    return round(seconds * 1000, 3)
