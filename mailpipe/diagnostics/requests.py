"""Diagnoses asked for by a user and run by a worker (the `diagnose_account` actor).

Each request is a row of `diagnostics_results`: pending until a worker ran it, then its report
encrypted under the owner's data key like everything else about an account. The worker opens
the account with a key grant sealed for that request alone and dropped when it is done.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from .. import grants
from ..accounts import account_settings, has_oauth2_grant, owned_account
from ..addresses import AddressPolicy
from ..crypto import DataKey
from ..db import rowcount
from ..errors import MailpipeError, NotFound, TooManyRequests
from ..models import DiagnosticsResult, MailAccount, utcnow
from ..oauth2 import TokenSource
from ..providers import Provider
from ..results import DiagnosisRequest
from ..vocabulary import DiagnosisStatus
from .report import Diagnosis
from .suite import DIAGNOSE_TIMEOUT, diagnose

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

REPORT_TABLE = "diagnostics_results"
# a check holds a worker and an outbound connection for up to its timeout: a few per user
RATE_LIMIT = 5
RATE_WINDOW_SECONDS = 60


def request_diagnosis(
    session: Session,
    *,
    user_id: int,
    account_id: int,
    key: DataKey,
    public_key: bytes,
    ttl_seconds: float,
) -> str:
    """Record a pending diagnosis and seal the user's key to the workers for it alone; at most
    RATE_LIMIT per user within RATE_WINDOW_SECONDS (else TooManyRequests)."""
    owned_account(session, account_id, user_id)
    since = utcnow() - timedelta(seconds=RATE_WINDOW_SECONDS)
    count, oldest = session.execute(
        select(func.count(), func.min(DiagnosticsResult.created_at)).where(
            DiagnosticsResult.user_id == user_id, DiagnosticsResult.created_at > since
        )
    ).one()
    if count >= RATE_LIMIT:
        wait = (oldest - since).total_seconds() if oldest is not None else RATE_WINDOW_SECONDS
        raise TooManyRequests(
            f"{count} connection checks in the last minute; wait before the next one",
            retry_after=math.ceil(wait),
        )
    request_id = uuid.uuid4().hex
    grant = grants.grant_for_job(
        session,
        user_id=user_id,
        job_id=request_id,
        key=key,
        public_key=public_key,
        ttl_seconds=ttl_seconds,
    )
    session.add(
        DiagnosticsResult(id=request_id, user_id=user_id, account_id=account_id, grant_id=grant.id)
    )
    session.flush()
    return request_id


def run_requested(
    sessions: sessionmaker[Session],
    request_id: str,
    *,
    private_key: X25519PrivateKey,
    policy: AddressPolicy,
    timeout: float = DIAGNOSE_TIMEOUT,
    oauth2_providers: Mapping[str, Provider] | None = None,
) -> Diagnosis | None:
    """Run a pending diagnosis with its sealed key, store the report encrypted, drop the key;
    the account's server is reached only as `policy` allows.

    An OAuth2 account is checked with a fresh access token (refreshed as a fetch would). Returns
    None when there was nothing to run (a redelivered message, an expired grant).
    """
    with sessions() as session:
        row = session.get(DiagnosticsResult, request_id)
        if row is None or row.status != DiagnosisStatus.PENDING:
            return None
        account_id = row.account_id
        unusable: str | None
        refreshable = False
        try:
            key = grants.unlock_grant(session, row.grant_id, private_key)
            account = session.get_one(MailAccount, account_id)
            settings = account_settings(account, key, policy=policy)
            refreshable = has_oauth2_grant(account, key)
        except MailpipeError as error:
            unusable = str(error)
        except (ValueError, TypeError):
            unusable = "the account's stored settings do not open"
        else:
            unusable = None
    if unusable is None and refreshable:
        tokens = TokenSource(sessions, account_id, key, providers=oauth2_providers or {})
        try:
            settings = replace(settings, access_token=tokens.token())
        except MailpipeError as error:  # refused or unreachable: the report says so
            unusable = str(error)
    if unusable is not None:
        _finish_request(sessions, request_id, error=unusable)
        return None
    diagnosis = None
    try:
        diagnosis = diagnose(
            settings, sessions=sessions, account_id=account_id, key=key, timeout=timeout
        )
    finally:
        _finish_request(sessions, request_id, key=key, diagnosis=diagnosis)
    return diagnosis


def _finish_request(
    sessions: sessionmaker[Session],
    request_id: str,
    *,
    key: DataKey | None = None,
    diagnosis: Diagnosis | None = None,
    error: str = "the diagnosis was interrupted",
) -> None:
    """Store the outcome once and drop the request's key grant, whatever happened."""
    with sessions.begin() as session:
        row = session.get(DiagnosticsResult, request_id)
        if row is not None and row.status == DiagnosisStatus.PENDING:
            row.finished_at = utcnow()
            if diagnosis is None or key is None:
                row.status, row.ok, row.error_message = DiagnosisStatus.FAILED, False, error
            else:
                row.status, row.ok = DiagnosisStatus.DONE, diagnosis.ok
                row.error_class = diagnosis.failure.error_class if diagnosis.failure else None
                row.report_enc = key.encrypt(
                    json.dumps(diagnosis.to_json()).encode(),
                    table=REPORT_TABLE,
                    column="report",
                    row=request_id,
                )
        grants.drop_job_grant(session, request_id)


def purge_finished(session: Session, *, before: datetime) -> int:
    """Delete diagnoses that ended before `before`: a report is read once, right after it ran;
    pending requests stay (their grant's expiry ends them)."""
    deleted = session.execute(
        delete(DiagnosticsResult).where(
            DiagnosticsResult.finished_at < before,
            DiagnosticsResult.status != DiagnosisStatus.PENDING,
        )
    )
    return rowcount(deleted)


def diagnosis_result(
    session: Session, request_id: str, *, user_id: int, key: DataKey
) -> DiagnosisRequest:
    """A requested diagnosis as its owner sees it: pending, failed, or the report decrypted."""
    row = session.get(DiagnosticsResult, request_id)
    if row is None or row.user_id != user_id:
        raise NotFound(f"diagnosis {request_id} not found")
    report = None
    if row.report_enc is not None:
        report = json.loads(
            key.decrypt(row.report_enc, table=REPORT_TABLE, column="report", row=request_id)
        )
    return DiagnosisRequest(
        id=row.id,
        account_id=row.account_id,
        status=DiagnosisStatus(row.status),
        ok=row.ok,
        error_class=row.error_class,
        error=row.error_message,
        created_at=row.created_at,
        finished_at=row.finished_at,
        report=report,
    )
