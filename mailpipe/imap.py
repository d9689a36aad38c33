"""IMAP connections that verify TLS by default and never block longer than their timeouts."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Literal

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, LoginError
from imapclient.imap4 import IMAP4WithTimeout
from imapclient.imapclient import SocketTimeout
from imapclient.tls import IMAP4_TLS, wrap_socket

from .addresses import AddressPolicy

SECURITY_MODES = ("tls", "starttls", "none")
AUTH_MODES = ("auto", "login", "plain")
DEFAULT_PORTS = {"tls": 993, "starttls": 143, "none": 143}
CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
SASL_IR = "SASL-IR"
# the client's waits in a TLS handshake: a 1.3 one is answered once and ends with the client's
# Finished (so the next read waits again); a 1.2 one takes two and ends with the server's
HANDSHAKE_TURNS = {"TLSv1.3": (1, True)}
HANDSHAKE_TURNS_BEFORE_1_3 = (2, False)


class TokenRefused(LoginError):  # type: ignore[misc]  # imapclient ships no types
    """The server refused an OAuth2 access token (expired, withdrawn, or for another user);
    `round_trips` are the refused connection's, for a retry to count them too."""

    round_trips = 0


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


class _Turns(imaplib.IMAP4):
    """An imaplib connection that counts its round trips: each time the client waits for the
    server after sending (opening the connection is the first, the greeting comes with it),
    and takes the capabilities from the greeting when it carries them (no CAPABILITY asked)."""

    turns = 0
    _sent = False

    def send(self, data: bytes) -> None:  # type: ignore[override]  # imaplib sends bytes only
        self._sent = True
        super().send(data)

    def readline(self) -> bytes:
        self._wait()
        return super().readline()

    def read(self, size: int) -> bytes:
        self._wait()
        return super().read(size)

    def _wait(self) -> None:
        if self._sent:
            self.turns += 1
            self._sent = False

    def _connected(self, sock: socket.socket) -> socket.socket:
        """Count the connect, and with implicit TLS the handshake's waits."""
        self.turns += 1
        if isinstance(sock, ssl.SSLSocket):
            self._sent = self._handshaken(sock)
        return sock

    def _handshaken(self, sock: ssl.SSLSocket) -> bool:
        """Count a TLS handshake's waits by its version; True when the client spoke last."""
        turns, client_last = HANDSHAKE_TURNS.get(sock.version() or "", HANDSHAKE_TURNS_BEFORE_1_3)
        self.turns += turns
        return client_last

    def _get_capabilities(self) -> None:
        greeted = self.untagged_responses.pop("CAPABILITY", None)
        line = greeted[-1] if greeted else None
        if isinstance(line, bytes) and not self._tls_established:
            self.capabilities = tuple(line.decode("ascii", "replace").upper().split())
            return
        super()._get_capabilities()  # type: ignore[misc]  # imaplib's own, not in typeshed

    def starttls(
        self, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[Literal["OK"], list[None]]:
        result = super().starttls(ssl_context)
        if isinstance(self.sock, ssl.SSLSocket):  # CAPABILITY, asked again, followed it at once
            self._handshaken(self.sock)
        return result


class _Plain(_Turns, IMAP4WithTimeout):  # type: ignore[misc]  # imapclient ships no types
    """imapclient's plain connection, through `open_socket`."""

    def __init__(self, settings: ImapSettings, timeout: float | None) -> None:
        self.mailpipe_settings = settings
        IMAP4WithTimeout.__init__(self, settings.host, settings.effective_port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return self._connected(open_socket(self.mailpipe_settings, timeout))


class _Tls(_Turns, IMAP4_TLS):  # type: ignore[misc]
    """imapclient's implicit-TLS connection, through `open_socket` (the name still verified)."""

    def __init__(
        self, settings: ImapSettings, context: ssl.SSLContext | None, timeout: float | None
    ) -> None:
        self.mailpipe_settings = settings
        IMAP4_TLS.__init__(self, settings.host, settings.effective_port, context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = open_socket(self.mailpipe_settings, timeout)
        return self._connected(wrap_socket(sock, self.ssl_context, self.host))


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
        if not client.has_capability("STARTTLS"):
            raise NoStartTls("the server does not offer STARTTLS")
        client.starttls(tls_context(settings))


def authenticate(client: IMAPClient, settings: ImapSettings) -> None:
    """XOAUTH2 with a token; otherwise LOGIN, or AUTHENTICATE PLAIN when asked or required.
    With SASL-IR announced, AUTHENTICATE carries its response: one round trip, not two."""
    try:
        _authenticate(client, settings)
    except LoginError as error:
        lost = error.__context__  # imapclient makes a connection lost in the login a LoginError
        if isinstance(lost, IMAPClientAbortError):
            raise lost from None
        if settings.access_token is not None:
            refused = TokenRefused(str(error))
            refused.round_trips = round_trips(client)
            raise refused from None
        raise


def _authenticate(client: IMAPClient, settings: ImapSettings) -> None:
    initial = client.has_capability(SASL_IR)
    if settings.access_token is not None:
        if initial:
            response = f"user={settings.username}\1auth=Bearer {settings.access_token}\1\1"
            _authenticate_ir(client, "XOAUTH2", response)
        else:
            client.oauth2_login(settings.username, settings.access_token)
        return
    mode = settings.auth
    if mode == "auto":
        mode = "plain" if client.has_capability("LOGINDISABLED") else "login"
    if mode == "plain" and initial:
        _authenticate_ir(client, "PLAIN", f"\0{settings.username}\0{settings.password}")
    elif mode == "plain":
        client.plain_login(settings.username, settings.password)
    else:
        client.login(settings.username, settings.password)


def _authenticate_ir(client: IMAPClient, mechanism: str, response: str) -> None:
    """AUTHENTICATE with the initial response (RFC 4959); a challenge after it (XOAUTH2's
    reason for a refusal) gets the empty answer that ends the exchange with NO."""
    connection = client._imap
    tag = connection._new_tag()
    encoded = base64.b64encode(response.encode()).decode("ascii")
    connection.send(b"%s AUTHENTICATE %s %s\r\n" % (tag, mechanism.encode(), encoded.encode()))
    while connection.tagged_commands[tag] is None:
        if connection._get_response() is None:
            connection.send(b"\r\n")
    status, data = connection.tagged_commands.pop(tag)
    if status != "OK":
        raise LoginError(f"AUTHENTICATE command error: {status} {data!r}")
    connection.state = "AUTH"


def round_trips(client: IMAPClient) -> int:
    """How often the connection has waited for the server so far (0 if it does not count)."""
    return int(getattr(client._imap, "turns", 0))


def logout(client: IMAPClient) -> None:
    """Say LOGOUT and close without waiting for the answer: nothing in it is needed."""
    connection = client._imap
    with contextlib.suppress(OSError):
        connection.state = "LOGOUT"
        connection.send(b"%s LOGOUT\r\n" % connection._new_tag())
    shutdown(client)


def shutdown(client: IMAPClient) -> None:
    """Close without waiting on a server that may be gone."""
    with contextlib.suppress(OSError):
        client.shutdown()
