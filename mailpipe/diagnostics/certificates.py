"""The certificate a server presents: read from the live TLS session, or by hand when the
handshake failed, to say what is wrong with it."""

from __future__ import annotations

import re
import socket
import ssl
from datetime import UTC, datetime
from typing import Any

from ..addresses import AddressRefused
from ..imap import ImapSettings, open_socket

MAX_CERTIFICATE_NAMES = 20


def certificate(der: bytes | None) -> dict[str, Any] | None:
    """Subject, issuer, validity and names of a DER certificate."""
    if not der:
        return None
    from cryptography import x509  # here: every CLI command would pay for loading it otherwise

    loaded = x509.load_der_x509_certificate(der)
    try:
        alternative = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [
            *alternative.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in alternative.get_values_for_type(x509.IPAddress)),
        ]
    except x509.ExtensionNotFound:
        names = []
    not_after = loaded.not_valid_after_utc
    return {
        "subject": loaded.subject.rfc4514_string(),
        "issuer": loaded.issuer.rfc4514_string(),
        "not_before": loaded.not_valid_before_utc.isoformat(),
        "not_after": not_after.isoformat(),
        "expires_in_days": (not_after - datetime.now(UTC)).days,
        "names": names[:MAX_CERTIFICATE_NAMES],
    }


def unverified_certificate(settings: ImapSettings) -> dict[str, Any] | None:
    """The certificate the server shows, read without trusting it, to say what is wrong with it;
    only from a server the settings' address policy allows."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with open_socket(settings) as raw:
            raw.settimeout(settings.command_timeout)
            if settings.security == "starttls" and not _plain_starttls(raw):
                return None
            with context.wrap_socket(raw, server_hostname=settings.host) as tls:
                return certificate(tls.getpeercert(binary_form=True))
    except (OSError, ValueError, AddressRefused):
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
