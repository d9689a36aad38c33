"""The connection a diagnosis runs its checks on, and how one check is run on it.

A check is a function of the `Probe`. `run` times it, turns an error into a failed check and,
when the connection is lost, skips every check after it with the reason why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy.orm import Session, sessionmaker

from .. import imap
from ..crypto import DataKey
from ..failures import classify
from .report import FAILED, SKIPPED, Check, clean, ms, text


@dataclass
class Probe:
    """What the checks of one connection share."""

    client: IMAPClient
    sessions: sessionmaker[Session] | None
    account_id: int | None
    key: DataKey | None  # the owner's, to read the stored folders' names
    redact: tuple[str, ...]
    round_trips: int
    lost: str | None = None  # the check during which the connection was lost
    capabilities: frozenset[str] = frozenset()
    provider: str = "other"


def run(probe: Probe, name: str, check: Callable[[Probe], Check]) -> Check:
    """Time one check; an error fails it, and a lost connection skips every check after it."""
    if probe.lost is not None:
        return skipped(name, f"the connection was lost during the {probe.lost} check")
    began = time.perf_counter()
    try:
        result = check(probe)
    except Exception as error:
        result = failed(name, error, probe.redact)
        if isinstance(error, OSError | EOFError | IMAPClientAbortError):
            probe.lost = name
    if result.duration_ms is None:
        result.duration_ms = ms(time.perf_counter() - began)
    return result


def failed(name: str, error: Exception, redact: tuple[str, ...]) -> Check:
    """The server's own words for a refused command; the core's one-line cause otherwise."""
    failure = classify(error)
    reason = failure.message
    if isinstance(error, IMAPClientError) and not isinstance(error, IMAPClientAbortError):
        reason = f"the server refused: {clean(str(error), redact)}"
    return Check(name, FAILED, reason=reason, error_class=failure.error_class)


def skipped(name: str, reason: str) -> Check:
    """A check that did not run, and why: never counted as a failure."""
    return Check(name, SKIPPED, reason=reason)


def before_login(client: IMAPClient) -> frozenset[str]:
    """Capabilities as announced before login: IMAPClient asks again after STARTTLS."""
    return frozenset(text(c).upper() for c in client.capabilities())


def logout(client: IMAPClient) -> None:
    """Log out politely, or just close: a diagnosis never raises for its own ending."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            imap.shutdown(client)
