"""IMAP connections that verify TLS by default and never block longer than their timeouts."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass, field

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import SocketTimeout
from imapclient.tls import IMAP4_TLS, wrap_socket

from .addresses import AddressPolicy

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("auto", "login", "plain")
DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}
CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0


class TokenRefused(LoginError):  # type: ignore[misc]  # imapclient ships no types
    """The server refused an OAuth2 access token (expired, withdrawn, or for another user)."""


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
    # where it may connect: settings of a stored account always carry one
    # (accounts.account_settings); None is an operator's own explicit --host
    policy: AddressPolicy | None = field(default=None, repr=False, compare=False)

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
    return _Client(
        settings,
        port=settings.effective_port,
        ssl=implicit_tls,
        ssl_context=tls_context(settings) if implicit_tls else None,
        timeout=timeout,
    )


def open_socket(settings: ImapSettings, timeout: float | None = None) -> socket.socket:
    """The one way to the account's server: with a policy, to the checked addresses only."""
    timeout = settings.connect_timeout if timeout is None else timeout
    address = (settings.host, settings.effective_port)
    if settings.policy is None:
        return socket.create_connection(address, timeout=timeout)
    last: OSError | None = None
    for family, kind, proto, _name, sockaddr in settings.policy.addresses(*address):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as error:
            sock.close()
            last = error
            continue
        return sock
    raise last or OSError(f"{settings.host} has no address")


class _Plain(IMAP4WithTimeout):  # type: ignore[misc]  # imapclient ships no types
    """imapclient's plain connection, through `open_socket`."""

    def __init__(self, settings: ImapSettings, timeout: float | None) -> None:
        self.mailpipe_settings = settings
        super().__init__(settings.host, settings.effective_port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return open_socket(self.mailpipe_settings, timeout)


class _Tls(IMAP4_TLS):  # type: ignore[misc]
    """imapclient's implicit-TLS connection, through `open_socket` (the name still verified)."""

    def __init__(
        self, settings: ImapSettings, context: ssl.SSLContext | None, timeout: float | None
    ) -> None:
        self.mailpipe_settings = settings
        super().__init__(settings.host, settings.effective_port, context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = open_socket(self.mailpipe_settings, timeout)
        return wrap_socket(sock, self.ssl_context, self.host)  # type: ignore[no-any-return]


class _Client(IMAPClient):  # type: ignore[misc]
    """IMAPClient whose socket comes from `open_socket` (imapclient 4.1's `_create_IMAP4`)."""

    def __init__(self, settings: ImapSettings, **options: object) -> None:
        self.mailpipe_settings = settings
        super().__init__(settings.host, **options)

    def _create_IMAP4(self) -> IMAP4WithTimeout:
        timeout = self._timeout.connect
        if self.ssl:
            return _Tls(self.mailpipe_settings, self.ssl_context, timeout)
        return _Plain(self.mailpipe_settings, timeout)


def start_tls(client: IMAPClient, settings: ImapSettings) -> None:
    """Upgrade a plain connection with STARTTLS when the settings ask for it."""
    if settings.security == "starttls":
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
