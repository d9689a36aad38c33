"""Diagnostics of one IMAP connection: what works, what does not and why, in plain words.

`diagnose(settings)` opens its own connection step by step (connect, STARTTLS, login), so a
failure names the step it happened in and the checks after it are skipped, not failed.
`run_checks(client)` runs the same suite on a connection that is already logged in. Each check
is `ok`, `failed` (with a reason and an error class) or `skipped` (with the reason why).

The output holds no mail content and no credential: never the password or token, never the
login name, never the host name (server texts that repeat them are redacted). It does hold
folder names and, for TLS, the certificate the server presents, which names the server.

Requested diagnoses (the `diagnose_account` actor) are kept in `diagnostics_results`, their
report encrypted under the owner's data key like everything else about an account.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cryptography import x509
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy.orm import Session, sessionmaker

from . import grants, imap, store
from .accounts import account_settings, guess_provider
from .crypto import DataKey
from .errors import MailpipeError, NotFound
from .failures import classify
from .imap import ImapSettings
from .models import DiagnosticsResult, MailAccount, utcnow
from .sync import REQUIRED_CAPABILITY, resolve_folders
from .vocabulary import ErrorClass

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

FEATURES = (
    "IDLE",
    "NAMESPACE",
    "ID",
    "CHILDREN",
    "UIDPLUS",
    "CONDSTORE",
    "QRESYNC",
    "MOVE",
    "SPECIAL-USE",
    "COMPRESS=DEFLATE",
    "UTF8=ACCEPT",
    "QUOTA",
)
# A feature also counts as offered under these names (RFC 6855 UTF8=ONLY implies UTF8=ACCEPT,
# RFC 9208 servers announce QUOTA=RES-<resource> beside or instead of QUOTA).
FEATURE_ALIASES = {"UTF8=ACCEPT": ("UTF8=ONLY",), "QUOTA": ("QUOTA=RES-",)}
SPECIAL_USE = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Important", "\\Junk", "\\Sent")
SPECIAL_USE_FLAGS = frozenset(flag.upper() for flag in (*SPECIAL_USE, "\\Trash"))
NOT_SELECTABLE = frozenset({"\\NOSELECT", "\\NONEXISTENT"})
# Words in a server's ID or greeting that give its provider away when the host name does not.
PROVIDER_HINTS = {
    "gmail": ("gimap", "google"),
    "outlook": ("outlook", "office365", "microsoft"),
    "yahoo": ("yahoo",),
    "gmx": ("gmx", "web.de", "united internet"),
    "icloud": ("icloud", "apple"),
}

DIAGNOSE_TIMEOUT = 15.0
ROUND_TRIPS = 5
MAX_TEXT = 200
MAX_CAPABILITIES = 100
MAX_FOLDERS = 200
MAX_ID_FIELDS = 20
MAX_CERTIFICATE_NAMES = 20
REDACTED = "[redacted]"
RESPONSE_CODE = re.compile(r"^\*\s+(OK|PREAUTH)\s+(\[[^\]]*\]\s*)?", re.IGNORECASE)

# How a folder compares between the database (folder_state) and the server (STATUS).
NOT_SYNCED = "not_synced"
IN_SYNC = "in_sync"
NEW_MAIL = "new_mail_waiting"
UIDVALIDITY_CHANGED = "uidvalidity_changed"
MISSING = "missing_on_server"

NO_CONNECTION = "no connection to the server"
NOT_SECURED = "the connection could not be secured"
NOT_LOGGED_IN = "not logged in"


@dataclass
class Check:
    """One check's outcome; `reason` says why it failed or was skipped, in plain words."""

    name: str
    status: str
    details: dict = field(default_factory=dict)
    reason: str | None = None
    error_class: str | None = None
    duration_ms: float | None = None

    def to_json(self) -> dict:
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

    def to_json(self) -> dict:
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


@dataclass
class _Probe:
    """What the checks of one connection share."""

    client: IMAPClient
    settings: ImapSettings | None
    sessions: sessionmaker[Session] | None
    account_id: int | None
    redact: tuple[str, ...]
    round_trips: int
    lost: str | None = None  # the check during which the connection was lost
    capabilities: frozenset[str] = frozenset()
    provider: str = "other"


def diagnose(
    settings: ImapSettings,
    *,
    sessions: sessionmaker[Session] | None = None,
    account_id: int | None = None,
    timeout: float = DIAGNOSE_TIMEOUT,
    round_trips: int = ROUND_TRIPS,
) -> Diagnosis:
    """Connect, secure and log in step by step, then run every check; never raises for IMAP."""
    settings = replace(
        settings,
        connect_timeout=min(settings.connect_timeout, timeout),
        command_timeout=min(settings.command_timeout, timeout),
    )
    started_at, began = utcnow(), time.perf_counter()
    checks: list[Check] = []

    def report(provider: str, *, skip_reason: str | None = None) -> Diagnosis:
        """The checks so far, and the rest skipped for `skip_reason` (a step failed)."""
        done = {check.name for check in checks}
        checks.extend(_skipped(name, skip_reason) for name in CHECKS if name not in done)
        return Diagnosis(
            checks=checks,
            provider=provider,
            security=settings.security,
            port=settings.effective_port,
            started_at=started_at,
            duration_ms=_ms(time.perf_counter() - began),
        )

    try:
        client = imap.open_connection(settings)
    except Exception as error:
        checks.extend(_unconnected(settings, error, seconds=time.perf_counter() - began))
        return report(guess_provider(settings.host), skip_reason=NO_CONNECTION)
    probe = _Probe(
        client=client,
        settings=settings,
        sessions=sessions,
        account_id=account_id,
        redact=tuple(
            word
            for word in (settings.username, settings.host, settings.password, settings.access_token)
            if word
        ),
        round_trips=round_trips,
        provider=guess_provider(settings.host),
    )
    try:
        checks.append(_connection(probe, seconds=time.perf_counter() - began))
        checks.append(_secure(probe, settings))
        if checks[-1].status == FAILED:
            return report(probe.provider, skip_reason=NOT_SECURED)
        checks.append(_run(probe, LOGIN_MECHANISMS, _login_mechanisms))
        checks.append(_login(probe, settings))
        if checks[-1].status == FAILED:
            return report(probe.provider, skip_reason=NOT_LOGGED_IN)
        checks.extend(_after_login(probe))
        return report(probe.provider)
    finally:
        _logout(client)


def run_checks(
    client: IMAPClient,
    *,
    sessions: sessionmaker[Session] | None = None,
    account_id: int | None = None,
    redact: Sequence[str] = (),
    round_trips: int = ROUND_TRIPS,
) -> Diagnosis:
    """The suite on a connection that is already logged in (the caller logs out).

    The greeting, TLS and the mechanisms offered before login come from what the connection
    kept; `redact` names words to keep out of the output, such as the login name.
    """
    started_at, began = utcnow(), time.perf_counter()
    probe = _Probe(
        client=client,
        settings=None,
        sessions=sessions,
        account_id=account_id,
        redact=tuple(word for word in (*redact, client.host) if word),
        round_trips=round_trips,
        provider=guess_provider(client.host),
    )
    checks = [
        _connection(probe, seconds=None),
        _run(probe, TLS, _tls),
        _run(probe, LOGIN_MECHANISMS, _login_mechanisms),
        _run(probe, LOGIN, _logged_in),
        *_after_login(probe),
    ]
    return Diagnosis(
        checks=checks,
        provider=probe.provider,
        security=None,
        port=client.port,
        started_at=started_at,
        duration_ms=_ms(time.perf_counter() - began),
    )


def summarise(check: Check) -> str:
    """One line for people: the reason when it did not pass, the main figures when it did."""
    if check.status != OK:
        return check.reason or ""
    d = check.details
    describe = {
        CONNECTION: lambda: f"greeting {d['greeting']!r}",
        TLS: lambda: _tls_summary(d),
        LOGIN_MECHANISMS: lambda: (
            f"{', '.join(d['mechanisms']) or 'no AUTH='}"
            + ("" if d["login_command"] else ", LOGIN disabled")
            + (f"; uses {d['will_use']}" if "will_use" in d else "")
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
            " ".join(f"{key}={value}" for key, value in d["fields"].items())
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


def _tls_summary(details: dict) -> str:
    certificate = details["certificate"] or {}
    return (
        f"{details['protocol']} {details['cipher']}; certificate {certificate.get('subject')} "
        f"from {certificate.get('issuer')}, {certificate.get('expires_in_days')} days left"
    )


# -- steps before login --------------------------------------------------------------------


def _unconnected(settings: ImapSettings, error: Exception, *, seconds: float) -> list[Check]:
    """No greeting was read: say why, and what the certificate was if TLS was the trouble."""
    failure = classify(error)
    if isinstance(error, ssl.SSLError):
        return [
            Check(
                CONNECTION,
                FAILED,
                reason="the TLS handshake failed before the server's greeting (see tls)",
                error_class=failure.error_class,
                duration_ms=_ms(seconds),
            ),
            Check(
                TLS,
                FAILED,
                details={"certificate": _unverified_certificate(settings)},
                reason=failure.message,
                error_class=failure.error_class,
            ),
        ]
    return [
        Check(
            CONNECTION,
            FAILED,
            reason=failure.message,
            error_class=failure.error_class,
            duration_ms=_ms(seconds),
        )
    ]


def _connection(probe: _Probe, *, seconds: float | None) -> Check:
    """The greeting, without its response code (the capabilities have their own check)."""
    welcome = probe.client.welcome or b""
    greeting = RESPONSE_CODE.sub("", welcome.decode("utf-8", "replace")).strip()
    probe.provider = _provider_from(probe.provider, greeting) or probe.provider
    return Check(
        CONNECTION,
        OK,
        details={"greeting": _clean(greeting, probe.redact)},
        duration_ms=_ms(seconds) if seconds is not None else None,
    )


def _secure(probe: _Probe, settings: ImapSettings) -> Check:
    """STARTTLS where asked, then what the TLS session is; a refusal stops the diagnosis."""
    if settings.security != "starttls":
        return _run(probe, TLS, _tls)
    began = time.perf_counter()
    if "STARTTLS" not in _before_login(probe.client):
        return Check(
            TLS,
            FAILED,
            reason="the server does not offer STARTTLS: use security tls (port 993) instead",
            error_class=ErrorClass.TLS_ERROR,
            duration_ms=_ms(time.perf_counter() - began),
        )
    try:
        imap.start_tls(probe.client, settings)
    except Exception as error:
        failure = classify(error)
        details = {"certificate": _unverified_certificate(settings)}
        return Check(
            TLS,
            FAILED,
            details=details if isinstance(error, ssl.SSLError) else {},
            reason=failure.message,
            error_class=failure.error_class,
            duration_ms=_ms(time.perf_counter() - began),
        )
    check = _run(probe, TLS, _tls)
    check.duration_ms = _ms(time.perf_counter() - began)
    return check


def _tls(probe: _Probe) -> Check:
    """Protocol, cipher and the certificate, read from the live TLS socket."""
    sock = probe.client._imap.sock
    if not isinstance(sock, ssl.SSLSocket):
        return _skipped(
            TLS, "the connection is not encrypted (security none): the password travels in clear"
        )
    cipher, _protocol, bits = sock.cipher() or (None, None, None)
    return Check(
        TLS,
        OK,
        details={
            "protocol": sock.version(),
            "cipher": cipher,
            "bits": bits,
            "certificate": _certificate(sock.getpeercert(binary_form=True)),
        },
    )


def _login_mechanisms(probe: _Probe) -> Check:
    """What the server lets us log in with before login, and whether mailpipe can use it."""
    before = _before_login(probe.client)
    mechanisms = sorted(c.removeprefix("AUTH=") for c in before if c.startswith("AUTH="))
    login_command = "LOGINDISABLED" not in before
    offered = {"LOGIN": login_command, "PLAIN": "PLAIN" in mechanisms}
    offered["XOAUTH2"] = "XOAUTH2" in mechanisms
    details = {
        "mechanisms": mechanisms,
        "login_command": login_command,
        "starttls_offered": "STARTTLS" in before,
    }
    wanted = _wanted_mechanism(probe.settings, login_command=login_command)
    if wanted is not None:
        details["will_use"] = wanted
    usable = offered[wanted] if wanted is not None else any(offered.values())
    if usable:
        return Check(LOGIN_MECHANISMS, OK, details=details)
    encrypted = isinstance(probe.client._imap.sock, ssl.SSLSocket)
    if not login_command and not encrypted:
        reason = "the server refuses logins on an unencrypted connection: use starttls or tls"
        return Check(
            LOGIN_MECHANISMS, FAILED, details, reason=reason, error_class=ErrorClass.TLS_ERROR
        )
    reason = (
        f"the server does not offer {wanted}, which this account logs in with"
        if wanted is not None
        else "the server offers no login mailpipe speaks (LOGIN, AUTH=PLAIN, AUTH=XOAUTH2)"
    )
    return Check(LOGIN_MECHANISMS, FAILED, details, reason=reason, error_class=ErrorClass.UNKNOWN)


def _wanted_mechanism(settings: ImapSettings | None, *, login_command: bool) -> str | None:
    """The mechanism `imap.authenticate` will pick for these settings (None: not known)."""
    if settings is None:
        return None
    if settings.access_token is not None:
        return "XOAUTH2"
    if settings.auth == "plain" or (settings.auth == "auto" and not login_command):
        return "PLAIN"
    return "LOGIN"


def _login(probe: _Probe, settings: ImapSettings) -> Check:
    began = time.perf_counter()
    try:
        imap.authenticate(probe.client, settings)
    except Exception as error:
        failure = classify(error)
        return Check(
            LOGIN,
            FAILED,
            reason=failure.message,
            error_class=failure.error_class,
            duration_ms=_ms(time.perf_counter() - began),
        )
    return Check(LOGIN, OK, duration_ms=_ms(time.perf_counter() - began))


def _logged_in(probe: _Probe) -> Check:
    state = probe.client._imap.state
    if state in ("AUTH", "SELECTED"):
        return Check(LOGIN, OK, details={"state": state})
    return Check(
        LOGIN, FAILED, reason="the connection is not logged in", error_class=ErrorClass.UNKNOWN
    )


# -- checks after login --------------------------------------------------------------------


def _after_login(probe: _Probe) -> list[Check]:
    return [
        _run(probe, CAPABILITIES, _capabilities),
        _run(probe, NAMESPACE, _namespace),
        _run(probe, INBOX, _inbox),
        _run(probe, FOLDERS, _folders),
        _run(probe, SERVER_ID, _server_id),
        _run(probe, ROUND_TRIP, _round_trip),
        _run(probe, QUOTA, _quota),
        _run(probe, DATABASE, _database),
    ]


def _capabilities(probe: _Probe) -> Check:
    offered = sorted({_text(c).upper() for c in probe.client.capabilities()})
    probe.capabilities = frozenset(offered)
    features = {name: _offers(probe, name) for name in FEATURES}
    imap4rev1 = REQUIRED_CAPABILITY in probe.capabilities
    details = {
        "imap4rev1": imap4rev1,
        "features": features,
        "offered": [c[:MAX_TEXT] for c in offered[:MAX_CAPABILITIES]],
    }
    if not imap4rev1:
        reason = "the server does not offer IMAP4rev1, which mailpipe needs"
        return Check(CAPABILITIES, FAILED, details, reason=reason, error_class=ErrorClass.UNKNOWN)
    return Check(CAPABILITIES, OK, details)


def _namespace(probe: _Probe) -> Check:
    if not _offers(probe, "NAMESPACE"):
        return _skipped(NAMESPACE, "the server does not offer NAMESPACE")
    personal, other, shared = probe.client.namespace()
    return Check(
        NAMESPACE,
        OK,
        details={
            "personal": _namespaces(personal),
            "other": _namespaces(other),
            "shared": _namespaces(shared),
        },
    )


def _inbox(probe: _Probe) -> Check:
    """EXAMINE (read-only: no flag changes), then CLOSE, which expunges nothing when read-only."""
    selected = probe.client.select_folder("INBOX", readonly=True)
    probe.client.close_folder()
    details = {
        "exists": selected.get(b"EXISTS"),
        "uidvalidity": selected.get(b"UIDVALIDITY"),
        "uidnext": selected.get(b"UIDNEXT"),
    }
    if b"HIGHESTMODSEQ" in selected:
        details["highestmodseq"] = selected[b"HIGHESTMODSEQ"]
    return Check(INBOX, OK, details=details)


def _folders(probe: _Probe) -> Check:
    """LIST, asking for special-use flags explicitly where the server lets us (RFC 6154)."""
    extended = _offers(probe, "SPECIAL-USE") and _offers(probe, "LIST-EXTENDED")
    listed = _list_special_use(probe.client) if extended else probe.client.list_folders()
    folders = []
    special_use: dict[str, str] = {}
    for flags, delimiter, name in listed:
        names = [_text(flag) for flag in flags]
        uses = [flag for flag in names if flag.upper() in SPECIAL_USE_FLAGS]
        for use in uses:
            special_use.setdefault(use, name)
        folders.append(
            {
                "name": name,
                "delimiter": _text(delimiter) if delimiter is not None else None,
                "selectable": not any(flag.upper() in NOT_SELECTABLE for flag in names),
                "special_use": uses,
            }
        )
    return Check(
        FOLDERS,
        OK,
        details={
            "count": len(folders),
            "special_use": special_use,
            "listed_with": "LIST RETURN (SPECIAL-USE)" if extended else "LIST",
            "folders": folders[:MAX_FOLDERS],
            "truncated": len(folders) > MAX_FOLDERS,
        },
    )


def _list_special_use(client: IMAPClient) -> list[tuple]:
    """`LIST "" "*" RETURN (SPECIAL-USE)`, parsed as IMAPClient parses a plain LIST."""
    typ, data = client._imap._simple_command("LIST", '""', '"*"', "RETURN (SPECIAL-USE)")
    client._checkok("list", typ, data)
    typ, data = client._imap._untagged_response(typ, data, "LIST")
    return client._proc_folder_list(data)


def _server_id(probe: _Probe) -> Check:
    if not _offers(probe, "ID"):
        check = _skipped(SERVER_ID, "the server does not offer ID")
        check.details = {"provider": probe.provider}
        return check
    answer = probe.client.id_()
    pairs = list(answer[0]) if answer and isinstance(answer[0], tuple) else []
    fields = {
        _text(key).lower()[:MAX_TEXT]: _clean(_text(value), probe.redact)
        for key, value in zip(pairs[::2], pairs[1::2], strict=False)
        if value is not None
    }
    probe.provider = _provider_from(probe.provider, " ".join(fields.values())) or probe.provider
    return Check(
        SERVER_ID,
        OK,
        details={"fields": dict(list(fields.items())[:MAX_ID_FIELDS]), "provider": probe.provider},
    )


def _round_trip(probe: _Probe) -> Check:
    times = []
    for _ in range(probe.round_trips):
        began = time.perf_counter()
        probe.client.noop()
        times.append(_ms(time.perf_counter() - began))
    return Check(
        ROUND_TRIP,
        OK,
        details={
            "command": "NOOP",
            "count": len(times),
            "min_ms": min(times),
            "median_ms": round(statistics.median(times), 3),
            "max_ms": max(times),
        },
    )


def _quota(probe: _Probe) -> Check:
    if not _offers(probe, "QUOTA"):
        return _skipped(QUOTA, "the server does not offer QUOTA")
    roots, quotas = probe.client.get_quota_root("INBOX")
    resources = [
        {
            "root": quota.quota_root,
            "resource": quota.resource,
            "usage": quota.usage,
            "limit": quota.limit,
            "percent": round(100 * quota.usage / quota.limit, 1) if quota.limit else None,
        }
        for quota in quotas
    ]
    return Check(QUOTA, OK, details={"roots": list(roots.quota_roots), "resources": resources})


def _database(probe: _Probe) -> Check:
    """Each folder's stored position (folder_state) against the server's STATUS."""
    if probe.sessions is None or probe.account_id is None:
        return _skipped(DATABASE, "no stored account to compare with")
    with probe.sessions() as session:
        account = session.get(MailAccount, probe.account_id)
        if account is None:
            return _skipped(DATABASE, "the account is not in the database")
        configured = list(account.folders or [])
        states = store.folder_states(session, probe.account_id)
    wanted = resolve_folders(probe.client, configured)
    names = list(dict.fromkeys([*wanted, *states]))[:MAX_FOLDERS]
    folders = [_compare(probe.client, name, states.get(name)) for name in names]
    counts: dict[str, int] = {}
    for folder in folders:
        counts[folder["state"]] = counts.get(folder["state"], 0) + 1
    details = {"counts": counts, "folders": folders}
    gone = [f["folder"] for f in folders if f["state"] == MISSING and f["folder"] in wanted]
    if gone:
        reason = f"folder {gone[0]!r} is not on the server, so fetching it fails"
        return Check(DATABASE, FAILED, details, reason=reason, error_class=ErrorClass.UNKNOWN)
    return Check(DATABASE, OK, details)


def _compare(client: IMAPClient, folder: str, stored: store.FolderPosition | None) -> dict:
    """In sync when the server's UIDNEXT is no further than what the last sync took."""
    database = (
        {"uidvalidity": stored.uidvalidity, "last_uid": stored.last_uid, "uidnext": stored.uidnext}
        if stored is not None
        else None
    )
    try:
        status = client.folder_status(folder, ("MESSAGES", "UIDNEXT", "UIDVALIDITY"))
    except IMAPClientAbortError:
        raise
    except IMAPClientError:
        return {"folder": folder, "state": MISSING, "database": database, "server": None}
    server = {
        "uidvalidity": status.get(b"UIDVALIDITY"),
        "uidnext": status.get(b"UIDNEXT"),
        "messages": status.get(b"MESSAGES"),
    }
    if stored is None:
        state = NOT_SYNCED
    elif stored.uidvalidity != server["uidvalidity"]:
        state = UIDVALIDITY_CHANGED
    elif (server["uidnext"] or 0) > max(stored.uidnext, stored.last_uid + 1):
        state = NEW_MAIL
    else:
        state = IN_SYNC
    return {"folder": folder, "state": state, "database": database, "server": server}


# -- helpers -------------------------------------------------------------------------------


def _run(probe: _Probe, name: str, check: Callable[[_Probe], Check]) -> Check:
    """Time one check; an error fails it, and a lost connection skips every check after it."""
    if probe.lost is not None:
        return _skipped(name, f"the connection was lost during the {probe.lost} check")
    began = time.perf_counter()
    try:
        result = check(probe)
    except Exception as error:
        result = _failed(name, error, probe.redact)
        if isinstance(error, OSError | EOFError | IMAPClientAbortError):
            probe.lost = name
    if result.duration_ms is None:
        result.duration_ms = _ms(time.perf_counter() - began)
    return result


def _failed(name: str, error: Exception, redact: tuple[str, ...]) -> Check:
    """The server's own words for a refused command; the core's one-line cause otherwise."""
    failure = classify(error)
    reason = failure.message
    if isinstance(error, IMAPClientError) and not isinstance(error, IMAPClientAbortError):
        reason = f"the server refused: {_clean(str(error), redact)}"
    return Check(name, FAILED, reason=reason, error_class=failure.error_class)


def _skipped(name: str, reason: str) -> Check:
    return Check(name, SKIPPED, reason=reason)


def _before_login(client: IMAPClient) -> frozenset[str]:
    """Capabilities as announced before login (imaplib keeps them, renewed after STARTTLS)."""
    return frozenset(c.upper() for c in client._imap.capabilities)


def _offers(probe: _Probe, feature: str) -> bool:
    names = (feature, *FEATURE_ALIASES.get(feature, ()))
    return any(
        offered == name or (name.endswith("-") and offered.startswith(name))
        for offered in probe.capabilities
        for name in names
    )


def _namespaces(entries: Iterable | None) -> list[dict]:
    return [
        {"prefix": _text(prefix), "delimiter": _text(delimiter) if delimiter else None}
        for prefix, delimiter in entries or ()
    ]


def _provider_from(current: str, text: str) -> str | None:
    """A provider named by the server's own words, when the host name did not tell."""
    if current != "other":
        return None
    lowered = text.lower()
    for provider, hints in PROVIDER_HINTS.items():
        if any(hint in lowered for hint in hints):
            return provider
    return None


def _certificate(der: bytes | None) -> dict | None:
    """Subject, issuer, validity and names of a DER certificate."""
    if not der:
        return None
    certificate = x509.load_der_x509_certificate(der)
    try:
        alternative = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        names = [
            *alternative.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in alternative.get_values_for_type(x509.IPAddress)),
        ]
    except x509.ExtensionNotFound:
        names = []
    not_after = certificate.not_valid_after_utc
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": not_after.isoformat(),
        "expires_in_days": (not_after - datetime.now(UTC)).days,
        "names": names[:MAX_CERTIFICATE_NAMES],
    }


def _unverified_certificate(settings: ImapSettings) -> dict | None:
    """The certificate the server shows, read without trusting it, to say what is wrong with it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(
            (settings.host, settings.effective_port), timeout=settings.connect_timeout
        ) as raw:
            raw.settimeout(settings.command_timeout)
            if settings.security == "starttls" and not _plain_starttls(raw):
                return None
            with context.wrap_socket(raw, server_hostname=settings.host) as tls:
                return _certificate(tls.getpeercert(binary_form=True))
    except (OSError, ValueError):
        return None


def _plain_starttls(sock: socket.socket) -> bool:
    """Read the greeting and ask for STARTTLS by hand; True when the server agreed."""
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        reply += chunk
    sock.sendall(b"D1 STARTTLS\r\n")
    reply = b""
    while not re.search(rb"(^|\r\n)D1 [^\r\n]*\r\n", reply):
        chunk = sock.recv(4096)
        if not chunk:
            return False
        reply += chunk
    return re.search(rb"(^|\r\n)D1 OK", reply) is not None


def _clean(text: str, redact: tuple[str, ...]) -> str:
    """One line of server text, capped, with the host, login and secrets taken out."""
    text = " ".join(text.split())
    for word in redact:
        whole = rf"(?<![\w.-]){re.escape(word)}(?![\w.-])"
        text = re.sub(whole, REDACTED, text, flags=re.IGNORECASE)
    return text[:MAX_TEXT]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            imap.shutdown(client)


# -- requested diagnoses, for the worker and the web ---------------------------------------

REQUEST_PENDING = "pending"
REQUEST_DONE = "done"
REQUEST_FAILED = "failed"
REPORT_TABLE = "diagnostics_results"


def request_diagnosis(
    session: Session,
    *,
    user_id: int,
    account_id: int,
    key: DataKey,
    public_key: bytes,
    ttl_seconds: float,
) -> str:
    """Record a pending diagnosis and seal the user's key to the workers for it alone."""
    account = session.get(MailAccount, account_id)
    if account is None or account.user_id != user_id:
        raise NotFound(f"account {account_id} not found")
    request_id = uuid.uuid4().hex
    grant = grants.grant_for_job(
        session,
        user_id=user_id,
        job_id=request_id,
        key=key,
        public_key=public_key,
        ttl_seconds=ttl_seconds,
    )
    session.add(
        DiagnosticsResult(id=request_id, user_id=user_id, account_id=account_id, grant_id=grant.id)
    )
    session.flush()
    return request_id


def run_requested(
    sessions: sessionmaker[Session],
    request_id: str,
    *,
    private_key,
    timeout: float = DIAGNOSE_TIMEOUT,
) -> Diagnosis | None:
    """Run a pending diagnosis with its sealed key, store the report encrypted, drop the key.

    Returns None when there was nothing to run (a redelivered message, an expired grant).
    """
    with sessions() as session:
        row = session.get(DiagnosticsResult, request_id)
        if row is None or row.status != REQUEST_PENDING:
            return None
        account_id = row.account_id
        try:
            key = grants.unlock_grant(session, row.grant_id, private_key)
            settings = account_settings(session.get_one(MailAccount, account_id), key)
        except MailpipeError as error:
            unusable = str(error)
        except (ValueError, TypeError):
            unusable = "the account's stored settings do not open"
        else:
            unusable = None
    if unusable is not None:
        _finish_request(sessions, request_id, error=unusable)
        return None
    diagnosis = None
    try:
        diagnosis = diagnose(settings, sessions=sessions, account_id=account_id, timeout=timeout)
    finally:
        _finish_request(sessions, request_id, key=key, diagnosis=diagnosis)
    return diagnosis


def _finish_request(
    sessions: sessionmaker[Session],
    request_id: str,
    *,
    key: DataKey | None = None,
    diagnosis: Diagnosis | None = None,
    error: str = "the diagnosis was interrupted",
) -> None:
    """Store the outcome once and drop the request's key grant, whatever happened."""
    with sessions.begin() as session:
        row = session.get(DiagnosticsResult, request_id)
        if row is not None and row.status == REQUEST_PENDING:
            row.finished_at = utcnow()
            if diagnosis is None or key is None:
                row.status, row.ok, row.error_message = REQUEST_FAILED, False, error
            else:
                row.status, row.ok = REQUEST_DONE, diagnosis.ok
                row.error_class = diagnosis.failure.error_class if diagnosis.failure else None
                row.report_enc = key.encrypt(
                    json.dumps(diagnosis.to_json()).encode(),
                    table=REPORT_TABLE,
                    column="report",
                    row=request_id,
                )
        grants.drop_job_grant(session, request_id)


def diagnosis_result(session: Session, request_id: str, *, user_id: int, key: DataKey) -> dict:
    """A requested diagnosis as its owner sees it: pending, failed, or the report decrypted."""
    row = session.get(DiagnosticsResult, request_id)
    if row is None or row.user_id != user_id:
        raise NotFound(f"diagnosis {request_id} not found")
    report = None
    if row.report_enc is not None:
        report = json.loads(
            key.decrypt(row.report_enc, table=REPORT_TABLE, column="report", row=request_id)
        )
    return {
        "id": row.id,
        "account_id": row.account_id,
        "status": row.status,
        "ok": row.ok,
        "error_class": row.error_class,
        "error": row.error_message,
        "created_at": _iso(row.created_at),
        "finished_at": _iso(row.finished_at),
        "report": report,
    }


def _iso(moment: datetime | None) -> str | None:
    """Instants come back from SQLite without their offset; they are stored in UTC."""
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()
