"""IMAP connections that verify TLS by default and never block longer than their timeouts."""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass, field

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from imapclient.imapclient import SocketTimeout

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("auto", "login", "plain")
DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}
CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0


class TokenRefused(LoginError):  # type: ignore[misc]  # imapclient ships no types
    """The server refused an OAuth2 access token (expired, withdrawn, or for another user)."""


class NoStartTls(Exception):
    """The settings ask for STARTTLS and the server does not offer it: a setting to fix."""


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


def tls_context(settings: ImapSettings) -> ssl.SSLContext:
    """Certificate and hostname verification on, TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def connect(settings: ImapSettings) -> IMAPClient:
    """Open, secure and authenticate a connection; the caller logs out."""
    client = open_connection(settings)
    try:
        start_tls(client, settings)
        authenticate(client, settings)
    except BaseException:
        shutdown(client)
        raise
    return client


def open_connection(settings: ImapSettings) -> IMAPClient:
    """Connect and read the greeting (TLS already, when implicit), so each step can be diagnosed."""
    timeout = SocketTimeout(connect=settings.connect_timeout, read=settings.command_timeout)
    implicit_tls = settings.security == "tls"
    return IMAPClient(
        settings.host,
        port=settings.effective_port,
        ssl=implicit_tls,
        ssl_context=tls_context(settings) if implicit_tls else None,
        timeout=timeout,
    )


def start_tls(client: IMAPClient, settings: ImapSettings) -> None:
    """Upgrade a plain connection with STARTTLS when the settings ask for it."""
    if settings.security == "starttls":
        if not client.has_capability("STARTTLS"):
            raise NoStartTls("the server does not offer STARTTLS")
        client.starttls(tls_context(settings))


def authenticate(client: IMAPClient, settings: ImapSettings) -> None:
    """XOAUTH2 with a token; otherwise LOGIN, or AUTHENTICATE PLAIN when asked or required."""
    if settings.access_token is not None:
        try:
            client.oauth2_login(settings.username, settings.access_token)
        except LoginError as error:
            raise TokenRefused(str(error)) from None
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
