"""Every way an account run can fail, mapped to one error class and a one-line cause."""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from .addresses import AddressRefused
from .errors import DecryptionFailed, MailpipeError
from .imap import NoStartTls, TokenRefused
from .oauth2 import GrantRefused, TokenEndpointDown, TokenRequestRefused
from .retry import transient
from .vocabulary import ErrorClass

RESPONSE_CODE = re.compile(rb"\[([A-Z][A-Z0-9-]*)")
# RFC 5530 response codes, by the class they put a failure in.
CODE_CLASSES = {
    b"AUTHENTICATIONFAILED": ErrorClass.INVALID_CREDENTIALS,
    b"AUTHORIZATIONFAILED": ErrorClass.AUTH_FAILED,
    b"EXPIRED": ErrorClass.INVALID_CREDENTIALS,
    b"PRIVACYREQUIRED": ErrorClass.TLS_ERROR,
    b"CONTACTADMIN": ErrorClass.ACCOUNT_DISABLED,
    b"NOPERM": ErrorClass.ACCOUNT_DISABLED,
    b"UNAVAILABLE": ErrorClass.TEMPORARILY_UNAVAILABLE,
    b"INUSE": ErrorClass.TEMPORARILY_UNAVAILABLE,
    b"LIMIT": ErrorClass.TEMPORARILY_UNAVAILABLE,
    b"SERVERBUG": ErrorClass.TEMPORARILY_UNAVAILABLE,
}


@dataclass(frozen=True)
class Failure:
    """An error class and a message fit for a user: one line, no secret, no mail content."""

    error_class: ErrorClass
    message: str

    @property
    def transient(self) -> bool:
        return transient(self.error_class)


def classify(error: BaseException, *, host: str | None = None) -> Failure:
    """Map an exception (and the server's response code in it) to an error class."""
    where = f" {host}" if host else ""
    to = f" to {host}" if host else ""
    server = f"server {host}" if host else "the server"
    if isinstance(error, AddressRefused):
        return Failure(ErrorClass.ADDRESS_NOT_ALLOWED, str(error))
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = getattr(error, "verify_message", None) or "certificate verify failed"
        return Failure(ErrorClass.TLS_ERROR, f"TLS certificate of {server} not trusted: {reason}")
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, "reason", None) or "error"
        return Failure(ErrorClass.TLS_ERROR, f"TLS handshake with {server} failed ({reason})")
    if isinstance(error, TimeoutError | socket.timeout):
        return Failure(ErrorClass.TIMEOUT, f"server{where} did not answer in time")
    if isinstance(error, socket.gaierror):
        return Failure(ErrorClass.TEMPORARILY_UNAVAILABLE, f"host{where} not found (DNS)")
    if isinstance(error, ConnectionRefusedError):
        return Failure(ErrorClass.TEMPORARILY_UNAVAILABLE, f"connection{to} refused")
    if isinstance(error, ConnectionResetError | BrokenPipeError | EOFError):
        return Failure(ErrorClass.CONNECTION_RESET, f"connection{to} was reset")
    if isinstance(error, NoStartTls):
        return Failure(
            ErrorClass.TLS_ERROR, f"{server} does not offer STARTTLS (use TLS, or no encryption)"
        )
    if isinstance(error, LoginError):
        code = _response_code(error)
        if code == b"ALERT" and _too_many_connections(error):
            error_class = ErrorClass.TEMPORARILY_UNAVAILABLE
        else:
            error_class = CODE_CLASSES.get(code, ErrorClass.INVALID_CREDENTIALS)
        if isinstance(error, TokenRefused) and error_class == ErrorClass.INVALID_CREDENTIALS:
            return Failure(error_class, f"login{to} failed: the access token was refused")
        return Failure(error_class, _login_message(error_class, f" to {host}" if host else ""))
    if isinstance(error, IMAPClientAbortError):
        return Failure(ErrorClass.CONNECTION_RESET, f"server{where} closed the connection")
    if isinstance(error, IMAPClientError):
        code = _response_code(error)
        if code == b"ALERT" and _too_many_connections(error):
            return Failure(
                ErrorClass.TEMPORARILY_UNAVAILABLE, f"server{where} has too many connections open"
            )
        if code in CODE_CLASSES:
            return Failure(CODE_CLASSES[code], f"server{where} refused: {code.decode()}")
        return Failure(ErrorClass.UNKNOWN, f"server{where} answered with an error")
    if isinstance(error, OSError):
        return Failure(ErrorClass.CONNECTION_RESET, f"network error talking{to}: {error.strerror}")
    if isinstance(error, GrantRefused):
        return Failure(
            ErrorClass.INVALID_CREDENTIALS, f"{error}: the account must be connected again"
        )
    if isinstance(error, TokenEndpointDown):
        return Failure(ErrorClass.TEMPORARILY_UNAVAILABLE, str(error))
    if isinstance(error, TokenRequestRefused):
        return Failure(ErrorClass.AUTH_FAILED, str(error))
    if isinstance(error, DecryptionFailed):
        return Failure(ErrorClass.UNKNOWN, str(error))
    if isinstance(error, MailpipeError):
        return Failure(ErrorClass.UNKNOWN, str(error))
    return Failure(ErrorClass.UNKNOWN, f"unexpected {type(error).__name__}")


def _response_code(error: BaseException) -> bytes:
    """The RFC 5530 response code the error quotes; empty when it quotes none."""
    text = str(error).encode("utf-8", "replace")
    match = RESPONSE_CODE.search(text)
    return match.group(1) if match else b""


def _too_many_connections(error: BaseException) -> bool:
    """[ALERT] carries free text; providers use it for connection limits (GMX, Gmail, iCloud)."""
    text = str(error).lower()
    return "too many" in text or "maximum number of connections" in text


def _login_message(error_class: ErrorClass, where: str) -> str:
    if error_class == ErrorClass.INVALID_CREDENTIALS:
        return f"login{where} failed: wrong user name or password"
    if error_class == ErrorClass.ACCOUNT_DISABLED:
        return f"login{where} refused: the account is disabled at the provider"
    if error_class == ErrorClass.TLS_ERROR:
        return f"login{where} refused without TLS"
    if error_class == ErrorClass.TEMPORARILY_UNAVAILABLE:
        return f"login{where} temporarily unavailable"
    return f"login{where} not permitted"
