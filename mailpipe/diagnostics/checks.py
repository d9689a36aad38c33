"""The named checks of one connection, each a function of the probe that returns its `Check`.

They hold no mail content and no credential: never the password or token, never the login
name, never the host name (server texts that repeat them are redacted). They do hold folder
names and, for TLS, the certificate the server presents, which names the server.
"""

from __future__ import annotations

import re
import ssl
import statistics
import time
from collections.abc import Iterable
from typing import Any

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from .. import imap
from ..failures import classify
from ..imap import ImapSettings
from ..sync import REQUIRED_CAPABILITY
from ..vocabulary import ErrorClass
from .certificates import certificate, unverified_certificate
from .probe import Probe, before_login, run, skipped
from .report import (
    CAPABILITIES,
    CONNECTION,
    FAILED,
    FOLDERS,
    INBOX,
    LOGIN,
    LOGIN_MECHANISMS,
    MAX_TEXT,
    NAMESPACE,
    OK,
    QUOTA,
    ROUND_TRIP,
    SERVER_ID,
    TLS,
    Check,
    clean,
    ms,
    text,
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
MAX_CAPABILITIES = 100
MAX_FOLDERS = 200
MAX_ID_FIELDS = 20
RESPONSE_CODE = re.compile(r"^\*\s+(OK|PREAUTH)\s+(\[[^\]]*\]\s*)?", re.IGNORECASE)


# -- before login --------------------------------------------------------------------------


def unconnected(settings: ImapSettings, error: Exception, *, seconds: float) -> list[Check]:
    """No greeting was read: say why, and what the certificate was if TLS was the trouble."""
    failure = classify(error)
    if isinstance(error, ssl.SSLError):
        return [
            Check(
                CONNECTION,
                FAILED,
                reason="the TLS handshake failed before the server's greeting (see tls)",
                error_class=failure.error_class,
                duration_ms=ms(seconds),
            ),
            Check(
                TLS,
                FAILED,
                details={"certificate": unverified_certificate(settings)},
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
            duration_ms=ms(seconds),
        )
    ]


def connection(probe: Probe, *, seconds: float | None) -> Check:
    """The greeting, without its response code (the capabilities have their own check)."""
    welcome = probe.client.welcome or b""
    greeting = RESPONSE_CODE.sub("", welcome.decode("utf-8", "replace")).strip()
    probe.provider = provider_from(probe.provider, greeting) or probe.provider
    return Check(
        CONNECTION,
        OK,
        details={"greeting": clean(greeting, probe.redact)},
        duration_ms=ms(seconds) if seconds is not None else None,
    )


def secure(probe: Probe, settings: ImapSettings) -> Check:
    """STARTTLS where asked, then what the TLS session is; a refusal stops the diagnosis."""
    if settings.security != "starttls":
        return run(probe, TLS, tls)
    began = time.perf_counter()
    if "STARTTLS" not in before_login(probe.client):
        return Check(
            TLS,
            FAILED,
            reason="the server does not offer STARTTLS: use security tls (port 993) instead",
            error_class=ErrorClass.TLS_ERROR,
            duration_ms=ms(time.perf_counter() - began),
        )
    try:
        imap.start_tls(probe.client, settings)
    except Exception as error:
        failure = classify(error)
        details = {"certificate": unverified_certificate(settings)}
        return Check(
            TLS,
            FAILED,
            details=details if isinstance(error, ssl.SSLError) else {},
            reason=failure.message,
            error_class=failure.error_class,
            duration_ms=ms(time.perf_counter() - began),
        )
    check = run(probe, TLS, tls)
    check.duration_ms = ms(time.perf_counter() - began)
    return check


def tls(probe: Probe) -> Check:
    """Protocol, cipher and the certificate, read from the live TLS socket."""
    sock = probe.client.socket()
    if not isinstance(sock, ssl.SSLSocket):
        return skipped(
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
            "certificate": certificate(sock.getpeercert(binary_form=True)),
        },
    )


def login_mechanisms(probe: Probe, settings: ImapSettings) -> Check:
    """What the server lets us log in with before login, and whether mailpipe can use it."""
    before = before_login(probe.client)
    mechanisms = sorted(c.removeprefix("AUTH=") for c in before if c.startswith("AUTH="))
    login_command = "LOGINDISABLED" not in before
    offered = {"LOGIN": login_command, "PLAIN": "PLAIN" in mechanisms}
    offered["XOAUTH2"] = "XOAUTH2" in mechanisms
    details = {
        "mechanisms": mechanisms,
        "login_command": login_command,
        "starttls_offered": "STARTTLS" in before,
    }
    wanted = _wanted_mechanism(settings, login_command=login_command)
    details["will_use"] = wanted
    if offered[wanted]:
        return Check(LOGIN_MECHANISMS, OK, details=details)
    encrypted = isinstance(probe.client.socket(), ssl.SSLSocket)
    if not login_command and not encrypted:
        reason = "the server refuses logins on an unencrypted connection: use starttls or tls"
        return Check(
            LOGIN_MECHANISMS, FAILED, details, reason=reason, error_class=ErrorClass.TLS_ERROR
        )
    reason = f"the server does not offer {wanted}, which this account logs in with"
    return Check(LOGIN_MECHANISMS, FAILED, details, reason=reason, error_class=ErrorClass.UNKNOWN)


def _wanted_mechanism(settings: ImapSettings, *, login_command: bool) -> str:
    """The mechanism `imap.authenticate` will pick for these settings."""
    if settings.access_token is not None:
        return "XOAUTH2"
    if settings.auth == "plain" or (settings.auth == "auto" and not login_command):
        return "PLAIN"
    return "LOGIN"


def login(probe: Probe, settings: ImapSettings) -> Check:
    """Log in as the fetch will; a refusal is said in the core's words and stops the suite."""
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
            duration_ms=ms(time.perf_counter() - began),
        )
    return Check(LOGIN, OK, duration_ms=ms(time.perf_counter() - began))


def logged_in(probe: Probe) -> Check:
    """`LIST "" ""` (the hierarchy delimiter) is allowed only once logged in, so it tells."""
    try:
        probe.client.list_folders(pattern="")
    except IMAPClientAbortError:
        raise
    except IMAPClientError:  # imaplib refuses it before sending when the state is wrong
        return Check(
            LOGIN, FAILED, reason="the connection is not logged in", error_class=ErrorClass.UNKNOWN
        )
    return Check(LOGIN, OK)


# -- after login ---------------------------------------------------------------------------


def capabilities(probe: Probe) -> Check:
    """The capabilities after login (the ones that count), and the features mailpipe uses."""
    offered = sorted({text(c).upper() for c in probe.client.capabilities()})
    probe.capabilities = frozenset(offered)
    features = {name: offers(probe, name) for name in FEATURES}
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


def namespace(probe: Probe) -> Check:
    """Where the personal, other users' and shared folders live, and their delimiters."""
    if not offers(probe, "NAMESPACE"):
        return skipped(NAMESPACE, "the server does not offer NAMESPACE")
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


def inbox(probe: Probe) -> Check:
    """EXAMINE (read-only: no flag changes), then leave the mailbox as it was."""
    selected = probe.client.select_folder("INBOX", readonly=True)
    _leave_mailbox(probe)
    details = {
        "exists": selected.get(b"EXISTS"),
        "uidvalidity": selected.get(b"UIDVALIDITY"),
        "uidnext": selected.get(b"UIDNEXT"),
    }
    if b"HIGHESTMODSEQ" in selected:
        details["highestmodseq"] = selected[b"HIGHESTMODSEQ"]
    return Check(INBOX, OK, details=details)


def _leave_mailbox(probe: Probe) -> None:
    """UNSELECT where offered (RFC 3691), else CLOSE, which expunges nothing when read-only;
    some servers (pymap) answer CLOSE on a read-only mailbox with NO [READ-ONLY], which leaves
    the mailbox just as well."""
    if offers(probe, "UNSELECT"):
        probe.client.unselect_folder()
        return
    try:
        probe.client.close_folder()
    except IMAPClientError as error:
        if "READ-ONLY" not in str(error).upper():
            raise


def folders(probe: Probe) -> Check:
    """LIST, with the special-use attributes (RFC 6154) that servers offering SPECIAL-USE send."""
    listed = probe.client.list_folders()
    found = []
    special_use: dict[str, str] = {}
    for flags, delimiter, name in listed:
        names = [text(flag) for flag in flags]
        uses = [flag for flag in names if flag.upper() in SPECIAL_USE_FLAGS]
        for use in uses:
            special_use.setdefault(use, name)
        found.append(
            {
                "name": name,
                "delimiter": text(delimiter) if delimiter is not None else None,
                "selectable": not any(flag.upper() in NOT_SELECTABLE for flag in names),
                "special_use": uses,
            }
        )
    return Check(
        FOLDERS,
        OK,
        details={
            "count": len(found),
            "special_use": special_use,
            "folders": found[:MAX_FOLDERS],
            "truncated": len(found) > MAX_FOLDERS,
        },
    )


def server_id(probe: Probe) -> Check:
    """What the server says it is (RFC 2971 ID), which may tell the provider."""
    if not offers(probe, "ID"):
        check = skipped(SERVER_ID, "the server does not offer ID")
        check.details = {"provider": probe.provider}
        return check
    answer = probe.client.id_()
    pairs = list(answer[0]) if answer and isinstance(answer[0], tuple) else []
    fields = {
        text(key).lower()[:MAX_TEXT]: clean(text(value), probe.redact)
        for key, value in zip(pairs[::2], pairs[1::2], strict=False)
        if value is not None
    }
    probe.provider = provider_from(probe.provider, " ".join(fields.values())) or probe.provider
    return Check(
        SERVER_ID,
        OK,
        details={"fields": dict(list(fields.items())[:MAX_ID_FIELDS]), "provider": probe.provider},
    )


def round_trip(probe: Probe) -> Check:
    """A few NOOPs: how long one command takes, without the server doing any work."""
    times = []
    for _ in range(probe.round_trips):
        began = time.perf_counter()
        probe.client.noop()
        times.append(ms(time.perf_counter() - began))
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


def quota(probe: Probe) -> Check:
    """How full the mailbox is (RFC 9208), where the server says."""
    if not offers(probe, "QUOTA"):
        return skipped(QUOTA, "the server does not offer QUOTA")
    roots, quotas = probe.client.get_quota_root("INBOX")
    resources = [
        {
            "root": entry.quota_root,
            "resource": entry.resource,
            "usage": entry.usage,
            "limit": entry.limit,
            "percent": round(100 * entry.usage / entry.limit, 1) if entry.limit else None,
        }
        for entry in quotas
    ]
    return Check(QUOTA, OK, details={"roots": list(roots.quota_roots), "resources": resources})


# -- helpers -------------------------------------------------------------------------------


def offers(probe: Probe, feature: str) -> bool:
    """Whether the capabilities read after login name the feature, under any of its names."""
    names = (feature, *FEATURE_ALIASES.get(feature, ()))
    return any(
        offered == name or (name.endswith("-") and offered.startswith(name))
        for offered in probe.capabilities
        for name in names
    )


def provider_from(current: str, words: str) -> str | None:
    """A provider named by the server's own words, when the host name did not tell."""
    if current != "other":
        return None
    lowered = words.lower()
    for provider, hints in PROVIDER_HINTS.items():
        if any(hint in lowered for hint in hints):
            return provider
    return None


def _namespaces(entries: Iterable[Any] | None) -> list[dict[str, Any]]:
    return [
        {"prefix": text(prefix), "delimiter": text(delimiter) if delimiter else None}
        for prefix, delimiter in entries or ()
    ]
