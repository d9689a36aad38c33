"""A login tried before an account is stored or its password replaced, so nothing wrong is kept.

This is the one IMAP connection a web request makes: connect, secure, log in, log out, with
short timeouts. The full check (`mailpipe.diagnostics`) stays on the workers.
"""

from __future__ import annotations

from dataclasses import replace

from . import imap
from .failures import Failure, classify
from .imap import ImapSettings

VERIFY_TIMEOUT_SECONDS = 10.0


def verify_login(
    settings: ImapSettings, *, timeout: float = VERIFY_TIMEOUT_SECONDS
) -> Failure | None:
    """None when the server accepts the login; otherwise why not, classified like any failure."""
    settings = replace(
        settings,
        connect_timeout=min(settings.connect_timeout, timeout),
        command_timeout=min(settings.command_timeout, timeout),
    )
    try:
        client = imap.connect(settings)
    except Exception as error:  # every way a login can fail is a classified answer
        return classify(error, host=settings.host)
    imap.logout(client)  # not waited for: the login succeeded, whatever the server says now
    return None
