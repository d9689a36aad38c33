"""Every failure maps to one error class, from exception types and the server's response codes."""

import socket
import ssl

import pytest
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from mailpipe.addresses import AddressRefused
from mailpipe.errors import DecryptionFailed
from mailpipe.failures import classify
from mailpipe.retry import BREAKING, TRANSIENT
from mailpipe.vocabulary import FAILURES

# (what the server or the network did, the exception IMAPClient raises for it, the class)
CASES = [
    # Dovecot 2.3, wrong password
    (
        "dovecot-auth",
        LoginError("b'[AUTHENTICATIONFAILED] Authentication failed.'"),
        "invalid_credentials",
    ),
    # Gmail, app password required
    (
        "gmail-app-password",
        LoginError("b'[AUTHENTICATIONFAILED] Invalid credentials (Failure)'"),
        "invalid_credentials",
    ),
    # Outlook.com: no response code at all
    ("outlook-login-no", LoginError("b'LOGIN failed.'"), "invalid_credentials"),
    # RFC 5530 codes
    ("authorizationfailed", LoginError("b'[AUTHORIZATIONFAILED] Not allowed'"), "auth_failed"),
    ("expired", LoginError("b'[EXPIRED] Password expired'"), "invalid_credentials"),
    ("contactadmin", LoginError("b'[CONTACTADMIN] Account locked'"), "account_disabled"),
    ("privacyrequired", LoginError("b'[PRIVACYREQUIRED] Use TLS'"), "tls_error"),
    ("unavailable-login", LoginError("b'[UNAVAILABLE] Backend down'"), "temporarily_unavailable"),
    (
        "inuse",
        IMAPClientError("select failed: b'[INUSE] Mailbox in use'"),
        "temporarily_unavailable",
    ),
    ("limit", IMAPClientError("fetch failed: b'[LIMIT] Too much'"), "temporarily_unavailable"),
    ("serverbug", IMAPClientError("fetch failed: b'[SERVERBUG] Oops'"), "temporarily_unavailable"),
    # GMX and others: [ALERT] with a connection limit in its text
    (
        "gmx-too-many",
        LoginError("b'[ALERT] Too many simultaneous connections. (Failure)'"),
        "temporarily_unavailable",
    ),
    (
        "alert-maximum",
        IMAPClientError("b'[ALERT] Maximum number of connections from user+IP exceeded'"),
        "temporarily_unavailable",
    ),
    # BYE mid-command arrives as an abort
    ("bye", IMAPClientAbortError("command: FETCH => Server shutting down."), "connection_reset"),
    ("eof", IMAPClientAbortError("socket error: EOF"), "connection_reset"),
    ("econnreset", ConnectionResetError(104, "Connection reset by peer"), "connection_reset"),
    ("broken-pipe", BrokenPipeError(32, "Broken pipe"), "connection_reset"),
    ("refused", ConnectionRefusedError(111, "Connection refused"), "temporarily_unavailable"),
    ("dns", socket.gaierror(-2, "Name or service not known"), "temporarily_unavailable"),
    # the address policy refused the account's server before connecting
    (
        "internal-address",
        AddressRefused("host 10.0.0.1 is not on the public internet"),
        "address_not_allowed",
    ),
    ("timeout", TimeoutError("timed out"), "timeout"),
    ("socket-timeout", TimeoutError("timed out"), "timeout"),
    (
        "untrusted-cert",
        ssl.SSLCertVerificationError(
            1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
        ),
        "tls_error",
    ),
    (
        "tls-handshake",
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        "tls_error",
    ),
    ("bad-command", IMAPClientError("select failed: b'Unknown command'"), "unknown"),
    ("damaged-credentials", DecryptionFailed("credentials damaged"), "unknown"),
    ("bug", KeyError("x"), "unknown"),
]


@pytest.mark.parametrize(("error", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classification(error, expected):
    failure = classify(error, host="imap.example.org")
    assert failure.error_class == expected
    assert "\n" not in failure.message


def test_every_failure_class_is_either_transient_or_breaking():
    # Given the classes classify() gives and every failure class there is
    classes = {c[2] for c in CASES}
    # Then each is retried or breaks the account, never both, and the skips are neither
    assert classes <= set(FAILURES) == TRANSIENT | BREAKING
    assert TRANSIENT.isdisjoint(BREAKING)
    assert {
        "auth_failed",
        "invalid_credentials",
        "account_disabled",
        "tls_error",
        "address_not_allowed",
    } == BREAKING


def test_messages_never_repeat_server_text_that_may_quote_secrets():
    failure = classify(LoginError("b'[AUTHENTICATIONFAILED] user hunter2 rejected'"))
    assert "hunter2" not in failure.message
    assert failure.message == "login failed: wrong user name or password"
