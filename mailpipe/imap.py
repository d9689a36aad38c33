"""IMAP connections that verify TLS by default and never block longer than their timeouts."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass, field

from imapclient import IMAPClient
from imapclient.imapclient import SocketTimeout
from imapclient.response_parser import parse_fetch_response

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("auto", "login", "plain")
DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}
CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class ImapSettings:
    """Where and how to log in to one account; `repr` never shows the secret."""

    host: str
    username: str
    password: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    port: int | None = None
    security: str = "tls"
    auth: str = "auto"
    ca_file: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT

    def __post_init__(self) -> None:
        if self.security not in SECURITY_MODES:
            raise ValueError(f"security must be one of {', '.join(SECURITY_MODES)}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}")
        if self.password is None and self.access_token is None:
            raise ValueError("a password or an OAuth2 access token is needed")

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.security]


class MailClient(IMAPClient):
    """IMAPClient plus a FETCH over a UID range, which IMAPClient.fetch filters away."""

    def sizes_above(self, last_uid: int) -> dict[int, int]:
        """UIDs above `last_uid` with their sizes, in one round trip and without SEARCH."""
        tag = self._imap._command("UID", "FETCH", f"{last_uid + 1}:*", "(RFC822.SIZE)")
        typ, data = self._imap._command_complete("FETCH", tag)
        self._checkok("fetch", typ, data)
        typ, data = self._imap._untagged_response(typ, data, "FETCH")
        response = parse_fetch_response(data, self.normalise_times, True)
        # "n:*" always matches the highest UID, even when that is below n.
        return {
            uid: int(items[b"RFC822.SIZE"])
            for uid, items in response.items()
            if uid > last_uid and b"RFC822.SIZE" in items
        }


def tls_context(settings: ImapSettings) -> ssl.SSLContext:
    """Certificate and hostname verification on, TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def connect(settings: ImapSettings) -> MailClient:
    """Open, secure and authenticate a connection; the caller logs out."""
    timeout = SocketTimeout(connect=settings.connect_timeout, read=settings.command_timeout)
    implicit_tls = settings.security == "tls"
    client = MailClient(
        settings.host,
        port=settings.effective_port,
        ssl=implicit_tls,
        ssl_context=tls_context(settings) if implicit_tls else None,
        timeout=timeout,
    )
    try:
        if settings.security == "starttls":
            client.starttls(tls_context(settings))
        authenticate(client, settings)
    except BaseException:
        shutdown(client)
        raise
    return client


def authenticate(client: IMAPClient, settings: ImapSettings) -> None:
    """XOAUTH2 with a token; otherwise LOGIN, or AUTHENTICATE PLAIN when asked or required."""
    if settings.access_token is not None:
        client.oauth2_login(settings.username, settings.access_token)
        return
    mode = settings.auth
    if mode == "auto":
        mode = "plain" if client.has_capability("LOGINDISABLED") else "login"
    if mode == "plain":
        client.plain_login(settings.username, settings.password)
    else:
        client.login(settings.username, settings.password)


def shutdown(client: IMAPClient) -> None:
    """Close without waiting on a server that may be gone."""
    with contextlib.suppress(OSError):
        client.shutdown()
