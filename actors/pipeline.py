"""PipelineBroker: the facade web code uses to start fetch jobs and follow them."""

from __future__ import annotations

import uuid

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from sqlalchemy.orm import Session, sessionmaker

from actors.diagnose import diagnose_account
from actors.fetch import DEFAULT_TIME_LIMIT_MS, fetch_account
from mailpipe import diagnostics, grants, jobs, logs, reports
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError, NotFound
from mailpipe.models import KeyGrant
from mailpipe.results import AccountHealth, JobReport, JobSummary, Performance
from mailpipe.settings import Settings
from mailpipe.vocabulary import JobType

TIME_LIMIT_MARGIN_MS = 30_000


class PipelineBroker:
    """Enqueue fetches and read their outcome; every read checks that the user owns the job.

    `settings` give the workers' public key (unless `public_key` is given) and the lifetime of
    a job's key grant; `broker` defaults to the one the actors are declared on.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        settings: Settings,
        public_key: bytes | None = None,
        broker: dramatiq.Broker | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self._public_key = public_key
        self.broker = broker or fetch_account.broker

    @property
    def public_key(self) -> bytes:
        if self._public_key is None:
            self._public_key = grants.worker_public_key(
                self.settings.worker_key_path, configured=self.settings.worker_public_key
            )
        return self._public_key

    def enqueue_fetch_job(
        self,
        user_id: int,
        account_id: int | None = None,
        *,
        key: DataKey | None = None,
        max_mails: int | None = 100,
        timeout_seconds: int = 120,
    ) -> str:
        """Create the job and send one message per account; returns at once with the job id.

        With `key` (the logged-in user's data key) the key is sealed to the workers for this job
        only; without it, the user's background grant is used (scheduled fetches).
        """
        options = _job_options(max_mails, timeout_seconds)
        job_id = jobs.new_job_id()
        with self.sessions.begin() as session:
            account_ids = jobs.owned_accounts(session, user_id, account_id)
            if key is not None:
                grant = grants.grant_for_job(
                    session,
                    user_id=user_id,
                    job_id=job_id,
                    key=key,
                    public_key=self.public_key,
                    ttl_seconds=self.settings.job_grant_ttl_seconds,
                )
                job_type = JobType.ACCOUNT if account_id is not None else JobType.ALL
            else:
                grant = _background_grant(session, user_id)
                job_type = JobType.SCHEDULED
            jobs.create_job(
                session,
                job_id=job_id,
                user_id=user_id,
                account_ids=account_ids,
                type=job_type,
                options=options,
                grant_id=grant.id,
            )
        self._send(job_id, account_ids, timeout_seconds)
        logs.job_enqueued(
            job_id=job_id, user_id=user_id, job_type=job_type, accounts=len(account_ids)
        )
        return job_id

    def enqueue_scheduled_job(
        self,
        user_id: int,
        account_ids: list[int],
        *,
        max_mails: int | None = None,
        timeout_seconds: int = 120,
        job_type: JobType = JobType.SCHEDULED,
        noticed_at: float | None = None,
    ) -> str:
        """One job for the accounts of a user that the scheduler found due, under the user's
        background grant; accounts the user does not own (or that are disabled) are left out."""
        options = _job_options(max_mails, timeout_seconds)
        if noticed_at is not None:
            options["noticed_at"] = noticed_at
        with self.sessions.begin() as session:
            grant = _background_grant(session, user_id)
            owned = set(jobs.owned_accounts(session, user_id))
            account_ids = [account for account in account_ids if account in owned]
            job_id = jobs.create_job(
                session,
                user_id=user_id,
                account_ids=account_ids,
                type=job_type,
                options=options,
                grant_id=grant.id,
            ).id
        self._send(job_id, account_ids, timeout_seconds)
        logs.job_enqueued(
            job_id=job_id, user_id=user_id, job_type=JobType.SCHEDULED, accounts=len(account_ids)
        )
        return job_id

    def enqueue_push_job(
        self, user_id: int, account_ids: list[int], *, noticed_at: float | None = None
    ) -> str:
        """A watcher saw new mail (at `noticed_at`, Unix time): one job (type push, as job
        history shows it) for these accounts, under the user's background grant, like a
        scheduled one; the run measures push latency from `noticed_at`."""
        return self.enqueue_scheduled_job(
            user_id, account_ids, job_type=JobType.PUSH, noticed_at=noticed_at
        )

    def _send(self, job_id: str, account_ids: list[int], timeout_seconds: int) -> None:
        time_limit = min(DEFAULT_TIME_LIMIT_MS, timeout_seconds * 1000 + TIME_LIMIT_MARGIN_MS)
        messages = [
            fetch_account.message_with_options(args=(job_id, account_id), time_limit=time_limit)
            for account_id in account_ids
        ]
        if isinstance(self.broker, RedisBroker):
            enqueue_pipelined(self.broker, messages)
        else:
            for message in messages:
                self.broker.enqueue(message)

    def request_diagnosis(self, user_id: int, account_id: int, *, key: DataKey) -> str:
        """Queue a full check of the user's account: its key is sealed to the workers for this
        request alone, and a worker connects (never the caller's thread); returns its id."""
        with self.sessions.begin() as session:
            request_id = diagnostics.request_diagnosis(
                session,
                user_id=user_id,
                account_id=account_id,
                key=key,
                public_key=self.public_key,
                ttl_seconds=self.settings.job_grant_ttl_seconds,
            )
        self.broker.enqueue(diagnose_account.message(request_id))
        return request_id

    def get_job_status(self, job_id: str, user_id: int) -> JobReport:
        with self.sessions() as session:
            return jobs.job_status(session, job_id, user_id)

    def list_jobs(self, user_id: int, limit: int = 20) -> list[JobSummary]:
        with self.sessions() as session:
            return jobs.list_jobs(session, user_id, limit)

    def get_account_health(
        self, user_id: int, *, key: DataKey | None = None
    ) -> list[AccountHealth]:
        """With the owner's key, each account's folders too (they are encrypted)."""
        with self.sessions() as session:
            return reports.account_health(session, user_id, key=key)

    def get_performance_metrics(self, user_id: int) -> Performance:
        with self.sessions() as session:
            return reports.performance(session, user_id)


def _job_options(max_mails: int | None, timeout_seconds: int) -> dict:
    """The options a job keeps, checked before anything is written."""
    if not 1 <= timeout_seconds <= jobs.MAX_TIMEOUT_SECONDS:
        raise MailpipeError(f"timeout_seconds must be between 1 and {jobs.MAX_TIMEOUT_SECONDS}")
    if max_mails is not None and max_mails < 1:
        raise MailpipeError("max_mails must be at least 1")
    return {"max_mails": max_mails, "timeout_seconds": timeout_seconds}


def _background_grant(session: Session, user_id: int) -> KeyGrant:
    """The user's live background grant, or "not found": scheduled fetches need one."""
    grant = grants.background_grant(session, user_id)
    if grant is None:
        raise NotFound("no background grant: the user must log in to fetch mail")
    return grant


def enqueue_pipelined(broker: RedisBroker, messages: list[dramatiq.Message]) -> None:
    """RedisBroker.enqueue for many messages in one Redis round trip instead of one each.

    Does what RedisBroker.enqueue (dramatiq 2.2.1) does per message, middleware hooks included,
    but sends the dispatch script calls through one pipeline.
    """
    dispatch = broker.scripts["dispatch"]
    keys = [broker.namespace]
    ready = []
    with broker.client.pipeline(transaction=False) as pipe:
        for message in messages:
            message = message.copy(options={"redis_message_id": str(uuid.uuid4())})
            broker.emit_before("enqueue", message, None)
            args = [
                "enqueue",
                current_millis(),
                message.queue_name,
                broker.broker_id,
                broker.heartbeat_timeout,
                broker.dead_message_ttl,
                0,  # no maintenance inside a batch
                broker._max_unpack_size(),
                message.options["redis_message_id"],
                message.encode(),
            ]
            dispatch(keys=keys, args=args, client=pipe)
            ready.append(message)
        pipe.execute()
    for message in ready:
        broker.emit_after("enqueue", message, None)
