"""One account's part of a fetch job, from lease to recorded outcome; knows nothing of queues."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Table, Update, bindparam, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from . import grants, health, jobs, leases, logs
from .accounts import account_folders, account_settings, convert_folders, has_oauth2_grant
from .addresses import AddressPolicy
from .crypto import DataKey
from .errors import MailpipeError, NotFound
from .failures import Failure, classify
from .imap import ImapSettings
from .models import KeyGrant, MailAccount, PipelineJob, utcnow
from .oauth2 import TokenSource
from .observer import Observer, Observers, PhaseTimer
from .policies import CircuitPolicy
from .processors import Processor, process_backlog
from .profiler import Profiler
from .providers import Provider
from .retry import RetryPolicy
from .store import FolderPosition, folder_states
from .sync import SyncOptions, SyncResult, sync_account
from .vocabulary import ErrorClass, Gate, JobStatus, RunStatus

LEASE_MARGIN_SECONDS = 60
CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 60.0
LOCKED_MESSAGE = "not synced: log in again so mailpipe may read this account"
CIRCUIT_OPEN_MESSAGE = "skipped: fetching this account kept failing, so it is paused for a while"
LOST_MESSAGE = (
    "not synced: this run's queue message was lost (the broker lost its data, or the database "
    "was restored); the next fetch syncs the account again"
)
LOGGED_COUNTS = ("fetched", "fetched_bytes", "saved", "duplicates", "quarantined")
# A run's first read: its job, the account (None: gone) and the job's key grant (None: gone) in
# one SELECT, built once; the session's gets of the account and the grant then find them loaded.
_RUN_START = (
    select(PipelineJob, MailAccount, KeyGrant)
    .outerjoin_from(PipelineJob, MailAccount, MailAccount.id == bindparam("account_id"))
    .outerjoin(KeyGrant, KeyGrant.id == PipelineJob.grant_id)
    .where(PipelineJob.id == bindparam("job_id"))
)


class Next(StrEnum):
    """What the queue must do after a run: nothing, retry it with backoff, send it again later
    (the account or its server is busy), or drop it (a redelivered message whose run ended)."""

    DONE = "done"
    RETRY = "retry"
    BUSY = "busy"
    DUPLICATE = "duplicate"


class HostBusy(MailpipeError):
    """The mail server already has as many connections from us as it allows."""


@dataclass
class RunOutcome:
    """What the actor must do next: nothing, let Dramatiq retry, or send the message later."""

    action: Next
    failure: Failure | None = None
    attempted: bool = False  # a connection to the mail server was tried
    result: SyncResult | None = None
    finished: jobs.FinishedJob | None = None
    skipped: ErrorClass | None = None  # why a run ended skipped without trying the server
    health_recorded: bool = False  # a success, recorded on the account's health in the last step


def run_account(
    sessions: sessionmaker[Session],
    *,
    job_id: str,
    account_id: int,
    attempt: int,
    retry_policy: RetryPolicy,
    address_policy: AddressPolicy,
    private_key: X25519PrivateKey,
    observer: Observer | None = None,
    processors: Mapping[str, Processor] | None = None,
    connection_slot: Callable[[str], AbstractContextManager[bool]] | None = None,
    timeouts: tuple[type[BaseException], ...] = (),
    oauth2_providers: Mapping[str, Provider] | None = None,
    circuit: CircuitPolicy | None = None,
) -> RunOutcome:
    """Sync one account for one job and record the outcome; the last run finalises the job.

    `timeouts` are exception types (such as the queue's time-limit interrupt) that count as
    the timeout error class; `address_policy` says which servers the account may connect to.
    Each attempt ends with one `account_run` log event. An OAuth2 account's token is refreshed
    with the client secret of the configured provider (`oauth2_providers`) its grant names.
    With a `circuit`, the run's first transaction also passes the account's circuit gate (an
    open circuit ends the run skipped) and its last one records a success on the account's
    health (`RunOutcome.health_recorded`): no transactions of their own for the two.
    """
    profiler = Profiler()
    started = time.perf_counter()
    outcome = _run_account(
        sessions,
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        retry_policy=retry_policy,
        address_policy=address_policy,
        private_key=private_key,
        observer=observer,
        processors=processors,
        connection_slot=connection_slot,
        timeouts=timeouts,
        profiler=profiler,
        oauth2_providers=oauth2_providers,
        circuit=circuit,
    )
    _log_attempt(
        outcome,
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        profiler=profiler,
        seconds=time.perf_counter() - started,
    )
    return outcome


def _run_account(
    sessions: sessionmaker[Session],
    *,
    job_id: str,
    account_id: int,
    attempt: int,
    retry_policy: RetryPolicy,
    address_policy: AddressPolicy,
    private_key: X25519PrivateKey,
    observer: Observer | None,
    processors: Mapping[str, Processor] | None,
    connection_slot: Callable[[str], AbstractContextManager[bool]] | None,
    timeouts: tuple[type[BaseException], ...],
    profiler: Profiler,
    oauth2_providers: Mapping[str, Provider] | None,
    circuit: CircuitPolicy | None,
) -> RunOutcome:
    owner = f"{job_id}:{account_id}"
    start = _start(
        sessions,
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        owner=owner,
        private_key=private_key,
        address_policy=address_policy,
        circuit=circuit,
    )
    if isinstance(start, RunOutcome):
        return start
    observers = profiler if observer is None else Observers(observer, profiler)
    if start.circuit_open:
        observers.before_run(provider=start.provider)
        skipped = _finish(
            sessions,
            job_id,
            account_id,
            RunStatus.SKIPPED,
            error_class=ErrorClass.CIRCUIT_OPEN,
            message=CIRCUIT_OPEN_MESSAGE,
        )
        skipped.skipped = ErrorClass.CIRCUIT_OPEN
        return skipped
    options = start.options
    caught: tuple[type[BaseException], ...] = (Exception, *timeouts)
    started = time.perf_counter()
    started_at = utcnow()
    released = False
    observers.before_run(provider=start.provider)
    try:
        if start.problem is not None:
            raise start.problem
        if start.access is None:
            outcome = _finish(
                sessions,
                job_id,
                account_id,
                RunStatus.SKIPPED,
                lease_owner=owner,
                error_class=ErrorClass.LOCKED,
                message=LOCKED_MESSAGE,
            )
            released = True
            return outcome
        key, settings = start.access
        tokens = None
        if start.oauth2:
            tokens = TokenSource(
                sessions, account_id, key, providers=oauth2_providers or {}, observer=observers
            )
        slot = connection_slot(settings.host) if connection_slot else contextlib.nullcontext(True)
        with profiler:
            with slot as acquired:
                if not acquired:
                    raise HostBusy(
                        "too many connections to this mail server; waiting for a free one"
                    )
                result = sync_account(
                    sessions,
                    account_id=account_id,
                    key=key,
                    settings=settings,
                    options=SyncOptions(
                        folders=start.folders,
                        max_mails=options.get("max_mails"),
                        processors=processors,
                        since=start.since,
                    ),
                    observer=observers,
                    states=start.states,
                    tokens=tokens,
                )
            processed = result.processed
            if processors:
                timer = PhaseTimer(observers)
                with timer.phase("process"):
                    processed += process_backlog(
                        sessions,
                        account_id=account_id,
                        key=key,
                        processors=processors,
                        stored_before=started_at,
                    ).processed
                result.phases["process"] = (
                    result.phases.get("process", 0.0) + timer.totals["process"]
                )
        counts = {
            "fetched": result.fetched,
            "saved": result.saved,
            "duplicates": result.duplicates,
            "quarantined": result.quarantined,
            "processed": processed,
        }
        finished = _finish(
            sessions,
            job_id,
            account_id,
            RunStatus.SUCCESS,
            lease_owner=owner,
            counts=counts,
            phases=result.phases,
            profile=profiler.to_json(),
            duration=time.perf_counter() - started,
            touch_health=circuit is not None,
        )
        released = True
        noticed_at = options.get("noticed_at")  # a push run: when the watcher saw the mail come
        if noticed_at is not None and result.saved:
            observers.after_push(seconds=max(time.time() - float(noticed_at), 0.0))
        return RunOutcome(
            Next.DONE,
            result=result,
            finished=finished.finished,
            attempted=True,
            health_recorded=finished.health_recorded,
        )
    except HostBusy:
        with sessions.begin() as session:
            jobs.reopen_run(session, job_id=job_id, account_id=account_id)
        return RunOutcome(Next.BUSY)
    except caught as error:
        if isinstance(error, timeouts):
            failure = Failure(ErrorClass.TIMEOUT, "the sync took longer than the job's time limit")
        else:
            failure = classify(error)
        if retry_policy.should_retry(failure.error_class, attempt=attempt):
            with sessions.begin() as session:
                jobs.mark_retrying(
                    session,
                    job_id=job_id,
                    account_id=account_id,
                    error_class=failure.error_class,
                    message=failure.message,
                )
            return RunOutcome(Next.RETRY, failure=failure, attempted=True)
        outcome = _finish(
            sessions,
            job_id,
            account_id,
            RunStatus.FAILED,
            lease_owner=owner,
            error_class=failure.error_class,
            message=failure.message,
            profile=profiler.to_json(),
            duration=time.perf_counter() - started,
        )
        released = True
        outcome.failure = failure
        outcome.attempted = True
        return outcome
    finally:
        if not released:
            with sessions.begin() as session:
                leases.release(session, account_id, owner=owner)


def _log_attempt(
    outcome: RunOutcome,
    *,
    job_id: str,
    account_id: int,
    attempt: int,
    profiler: Profiler,
    seconds: float,
) -> None:
    """The attempt's `account_run` event; a redelivered message that found its run ended is
    no attempt and logs nothing."""
    if outcome.action == Next.DUPLICATE:
        return
    error_class = outcome.failure.error_class if outcome.failure else None
    if outcome.action == Next.RETRY:
        status = RunStatus.RETRYING
    elif outcome.action == Next.BUSY:
        status = RunStatus.PENDING
    elif outcome.failure is not None:
        status = RunStatus.FAILED
    elif outcome.result is not None:
        status = RunStatus.SUCCESS
    else:  # a skip: an open circuit, or no live key grant
        status, error_class = RunStatus.SKIPPED, outcome.skipped or ErrorClass.LOCKED
    logs.account_run(
        job_id=job_id,
        account_id=account_id,
        attempt=attempt,
        status=status,
        provider=profiler.provider,
        duration_seconds=seconds,
        phases={name: figures.wall for name, figures in profiler.phases.items()},
        counts={name: profiler.mail[name] for name in LOGGED_COUNTS},
        error_class=error_class,
    )
    if outcome.finished is not None:
        _log_finished(outcome.finished)


def _log_finished(finished: jobs.FinishedJob) -> None:
    logs.job_finished(
        job_id=finished.job_id,
        user_id=finished.user_id,
        job_type=finished.type,
        status=finished.status,
        duration_seconds=finished.metrics.get("duration"),
        metrics=finished.metrics,
        emails_fetched=finished.emails_fetched,
    )


@dataclass
class _Start:
    """What a run needs, read in the transaction that takes the lease and starts the run."""

    options: dict[str, Any]
    provider: str = "other"
    # the job's data key and the account's settings opened with it; None: no live key grant,
    # the account is LOCKED for this job
    access: tuple[DataKey, ImapSettings] | None = None
    folders: list[str] = field(default_factory=list)
    since: datetime | None = None
    states: dict[str, FolderPosition] = field(default_factory=dict)
    problem: Exception | None = None  # raised inside the run, so it is classified and recorded
    oauth2: bool = False  # the account logs in with a refreshable OAuth2 grant
    circuit_open: bool = False  # the account's circuit is open: the run ends skipped


def _start(
    sessions: sessionmaker[Session],
    *,
    job_id: str,
    account_id: int,
    attempt: int,
    owner: str,
    private_key: X25519PrivateKey,
    address_policy: AddressPolicy,
    circuit: CircuitPolicy | None,
) -> _Start | RunOutcome:
    """Pass the circuit gate, take the account's lease, mark the run started, open the key and
    read the account and its folders' positions, in one transaction; or say why the run cannot
    go ahead."""
    with sessions.begin() as session:
        loaded = session.execute(_RUN_START, {"job_id": job_id, "account_id": account_id}).first()
        if loaded is None:
            return RunOutcome(Next.DUPLICATE)
        job = loaded.PipelineJob
        found: MailAccount | None = loaded.MailAccount
        start = _Start(options=dict(job.options or {}))
        if circuit is not None and found is not None:
            gate = health.circuit_gate(
                session, account_id, circuit=circuit, state=found.circuit_state
            )
            if gate == Gate.SKIP:
                start.provider, start.circuit_open = found.provider, True
                return start
        lease_seconds = start.options.get("timeout_seconds", 120) + LEASE_MARGIN_SECONDS
        if not leases.acquire(session, account_id, owner=owner, seconds=lease_seconds):
            return RunOutcome(Next.BUSY)
        if not jobs.begin_run(
            session, job_id=job_id, account_id=account_id, attempt=attempt, job_status=job.status
        ):
            leases.release(session, account_id, owner=owner)
            return RunOutcome(Next.DUPLICATE)
        try:
            account = session.get_one(MailAccount, account_id)
            start.provider = account.provider
            key = grants.unlock_grant(session, job.grant_id, private_key)
            timeout = float(start.options.get("timeout_seconds", 120))
            settings = account_settings(
                account,
                key,
                policy=address_policy,
                connect_timeout=min(CONNECT_TIMEOUT, timeout),
                command_timeout=min(COMMAND_TIMEOUT, timeout),
            )
            start.access = key, settings
            start.oauth2 = has_oauth2_grant(account, key)
            start.folders = account_folders(account, key)
            convert_folders(account, key)  # a list in clear from before 0016: sealed now
            start.since = account.sync_since
            start.states = folder_states(session, account_id, key)
        except NotFound:
            start.access = None
        except DBAPIError:
            raise  # the transaction is lost: nothing of this attempt is recorded, it comes back
        except Exception as error:  # bad stored data: the run records it as its failure
            start.problem = error
    return start


def record_crash(
    sessions: sessionmaker[Session], *, job_id: str, account_id: int
) -> jobs.FinishedJob | None:
    """End a run whose every attempt crashed before it could record anything itself."""
    return _fail_unrun(
        sessions,
        job_id=job_id,
        account_id=account_id,
        message="the fetch failed repeatedly for an internal reason; operators have been told",
    )


def end_lost_runs(sessions: sessionmaker[Session], *, created_before: datetime) -> int:
    """End the open runs of jobs created before `created_before` as failed, so their jobs end
    and the scheduler takes their accounts again; a late message finds its run ended and is
    dropped. Returns how many were ended."""
    with sessions() as session:
        lost = jobs.lost_runs(session, created_before=created_before)
    for job_id, account_id in lost:
        _fail_unrun(sessions, job_id=job_id, account_id=account_id, message=LOST_MESSAGE)
    return len(lost)


def _fail_unrun(
    sessions: sessionmaker[Session], *, job_id: str, account_id: int, message: str
) -> jobs.FinishedJob | None:
    """End as failed (unknown) a run no attempt could record, and log it as any run's end."""
    finished = _finish(
        sessions,
        job_id,
        account_id,
        RunStatus.FAILED,
        error_class=ErrorClass.UNKNOWN,
        message=message,
    ).finished
    logs.account_run(
        job_id=job_id,
        account_id=account_id,
        status=RunStatus.FAILED,
        error_class=ErrorClass.UNKNOWN,
        duration_seconds=0.0,
    )
    if finished is not None:
        _log_finished(finished)
    return finished


def _finish(
    sessions: sessionmaker[Session],
    job_id: str,
    account_id: int,
    status: str,
    *,
    lease_owner: str | None = None,
    error_class: ErrorClass | None = None,
    message: str | None = None,
    counts: Mapping[str, int] | None = None,
    phases: dict[str, float] | None = None,
    profile: dict[str, Any] | None = None,
    duration: float | None = None,
    touch_health: bool = False,
) -> RunOutcome:
    """Record a run's end on the run and its account (giving back the account's lease when
    `lease_owner` holds it); drop the job's key if it was the last. With `touch_health`, a
    success is recorded on the account's health there too (`RunOutcome.health_recorded`), so a job
    seen final already shows its accounts' health."""
    with sessions.begin() as session:
        finished = jobs.finish_run(
            session,
            job_id=job_id,
            account_id=account_id,
            status=status,
            error_class=error_class,
            message=message,
            counts=counts,
            phases=phases,
            profile=profile,
            duration=duration,
        )
        now = utcnow()
        values: dict[str, object] = {"last_fetch_at": now}
        if status == RunStatus.SUCCESS:
            values.update(last_success_at=now, last_error_class=None, last_error_message=None)
        elif status == RunStatus.FAILED:
            values.update(last_error_class=error_class, last_error_message=message)
        health_recorded = touch_health and status == RunStatus.SUCCESS
        ended = session.execute(
            _account_ended(
                tuple(values), release=lease_owner is not None, touch_health=health_recorded
            ),
            {"account_id": account_id, "owner": lease_owner, "now": now}
            | {f"new_{name}": value for name, value in values.items()},
        )
        if health_recorded:
            touched = bool(ended.scalar())
            health.record_success(session, account_id, now=now, touched=touched).log(account_id)
        if finished is not None and finished.grant_id is not None:
            grants.drop_job_grant(session, finished.job_id)
        if finished is not None and finished.status == JobStatus.FAILED:
            job = session.get_one(PipelineJob, finished.job_id)
            causes = "; ".join(error["message"] or error["error_class"] for error in job.errors)
            health.notify(
                session,
                user_id=finished.user_id,
                job_id=finished.job_id,
                kind="job_failed",
                severity="error",
                message=health.JOB_FAILED_MESSAGE.format(
                    details=causes or "no account could be read"
                ),
                params={"error_classes": list(dict.fromkeys(e["error_class"] for e in job.errors))},
                dedupe_key=f"job_failed:{finished.job_id}",
            )
        if finished is not None and finished.status == JobStatus.PARTIAL_FAILURE:
            health.notify_retries_exhausted(
                session, user_id=finished.user_id, job_id=finished.job_id
            )
    return RunOutcome(Next.DONE, finished=finished, health_recorded=health_recorded)


@functools.cache
def _account_ended(columns: tuple[str, ...], *, release: bool, touch_health: bool) -> Update:
    """The one UPDATE that records a run's end on its account, setting `columns` (one set per
    final status), giving the lease back (`leases.RELEASED`) and recording a success on a healthy
    account (`health.TOUCHED`, returning `health.WAS_HEALTHY`) as asked; built once per variant,
    on the table: no account object in the session to bring up to date."""
    accounts = cast(Table, MailAccount.__table__)
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in columns}
    if release:
        values |= leases.RELEASED
    if touch_health:
        values |= health.TOUCHED
    statement = update(accounts).where(accounts.c.id == bindparam("account_id")).values(values)
    return statement.returning(health.WAS_HEALTHY) if touch_health else statement
