"""The whole suite in order: `diagnose` opens its own connection, `run_checks` uses one open.

`diagnose(settings)` connects, secures and logs in step by step, so a failure names the step
it happened in and the checks after it are skipped, not failed. `run_checks(client)` runs the
same suite on a connection that is already logged in. Each check is `ok`, `failed` (with a
reason and an error class) or `skipped` (with the reason why).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial

from imapclient import IMAPClient
from sqlalchemy.orm import Session, sessionmaker

from .. import imap
from ..accounts import guess_provider
from ..crypto import DataKey
from ..imap import ImapSettings
from ..models import utcnow
from . import checks
from .database import database
from .probe import Probe, logout, run, skipped
from .report import (
    CAPABILITIES,
    CHECKS,
    DATABASE,
    FAILED,
    FOLDERS,
    INBOX,
    LOGIN,
    LOGIN_MECHANISMS,
    NAMESPACE,
    QUOTA,
    ROUND_TRIP,
    SERVER_ID,
    TLS,
    Check,
    Diagnosis,
    ms,
)

DIAGNOSE_TIMEOUT = 15.0
ROUND_TRIPS = 5

NO_CONNECTION = "no connection to the server"
NOT_SECURED = "the connection could not be secured"
NOT_LOGGED_IN = "not logged in"
ALREADY_LOGGED_IN = "already logged in: the mechanisms offered before login are no longer known"


def diagnose(
    settings: ImapSettings,
    *,
    sessions: sessionmaker[Session] | None = None,
    account_id: int | None = None,
    key: DataKey | None = None,
    timeout: float = DIAGNOSE_TIMEOUT,
    round_trips: int = ROUND_TRIPS,
) -> Diagnosis:
    """Connect, secure and log in step by step, then run every check; never raises for IMAP."""
    settings = replace(
        settings,
        connect_timeout=min(settings.connect_timeout, timeout),
        command_timeout=min(settings.command_timeout, timeout),
    )
    started_at, began = utcnow(), time.perf_counter()
    done: list[Check] = []

    def report(provider: str, *, skip_reason: str | None = None) -> Diagnosis:
        """The checks so far, and the rest skipped for `skip_reason` (a step failed)."""
        names = {check.name for check in done}
        done.extend(skipped(name, skip_reason or "not run") for name in CHECKS if name not in names)
        return Diagnosis(
            checks=done,
            provider=provider,
            security=settings.security,
            port=settings.effective_port,
            started_at=started_at,
            duration_ms=ms(time.perf_counter() - began),
        )

    try:
        client = imap.open_connection(settings)
    except Exception as error:
        done.extend(checks.unconnected(settings, error, seconds=time.perf_counter() - began))
        return report(guess_provider(settings.host), skip_reason=NO_CONNECTION)
    probe = Probe(
        client=client,
        sessions=sessions,
        account_id=account_id,
        key=key,
        redact=tuple(
            word
            for word in (settings.username, settings.host, settings.password, settings.access_token)
            if word
        ),
        round_trips=round_trips,
        provider=guess_provider(settings.host),
    )
    try:
        done.append(checks.connection(probe, seconds=time.perf_counter() - began))
        done.append(checks.secure(probe, settings))
        if done[-1].status == FAILED:
            return report(probe.provider, skip_reason=NOT_SECURED)
        done.append(
            run(probe, LOGIN_MECHANISMS, partial(checks.login_mechanisms, settings=settings))
        )
        done.append(checks.login(probe, settings))
        if done[-1].status == FAILED:
            return report(probe.provider, skip_reason=NOT_LOGGED_IN)
        done.extend(_after_login(probe))
        return report(probe.provider)
    finally:
        logout(client)


def run_checks(
    client: IMAPClient,
    *,
    sessions: sessionmaker[Session] | None = None,
    account_id: int | None = None,
    key: DataKey | None = None,
    redact: Sequence[str] = (),
    round_trips: int = ROUND_TRIPS,
) -> Diagnosis:
    """The suite on a connection that is already logged in (the caller logs out).

    The greeting and TLS come from what the connection kept; the mechanisms offered before
    login are gone by now, so that check is skipped. `redact` names words to keep out of the
    output, such as the login name.
    """
    started_at, began = utcnow(), time.perf_counter()
    probe = Probe(
        client=client,
        sessions=sessions,
        account_id=account_id,
        key=key,
        redact=tuple(word for word in (*redact, client.host) if word),
        round_trips=round_trips,
        provider=guess_provider(client.host),
    )
    done = [
        checks.connection(probe, seconds=None),
        run(probe, TLS, checks.tls),
        skipped(LOGIN_MECHANISMS, ALREADY_LOGGED_IN),
        run(probe, LOGIN, checks.logged_in),
        *_after_login(probe),
    ]
    return Diagnosis(
        checks=done,
        provider=probe.provider,
        security=None,
        port=client.port,
        started_at=started_at,
        duration_ms=ms(time.perf_counter() - began),
    )


def _after_login(probe: Probe) -> list[Check]:
    return [
        run(probe, CAPABILITIES, checks.capabilities),
        run(probe, NAMESPACE, checks.namespace),
        run(probe, INBOX, checks.inbox),
        run(probe, FOLDERS, checks.folders),
        run(probe, SERVER_ID, checks.server_id),
        run(probe, ROUND_TRIP, checks.round_trip),
        run(probe, QUOTA, checks.quota),
        run(probe, DATABASE, database),
    ]
