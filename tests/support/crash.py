"""Crash drills on a running cluster: SIGKILL worker processes mid-sync, then count what is stored.

Shared by tests/test_crash.py (a few kills) and bench/crash.py (20 and more), so both measure the
same thing the same way: every message in the mailboxes stored exactly once, every job final,
no run left open.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from mailpipe import names
from mailpipe.accounts import add_account
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, Email, PipelineJob, User
from mailpipe.vocabulary import JOB_FINAL, RUN_FINAL
from tests.support.messages import plain_message

# Redelivery of a killed worker's messages within seconds instead of a minute: every broker
# command may run maintenance, and a worker silent for 1.5 s counts as dead. A killed worker's
# connection slot lapses after 8 s (a round's sync takes about 2 s), so with the default cap of
# 10 slots per host the drill also proves that leaked slots come back.
CRASH_ENV = {
    "MAILPIPE_REDIS_HEARTBEAT_MS": "1500",
    "MAILPIPE_REDIS_MAINTENANCE_CHANCE": "1000000",
    "MAILPIPE_HOST_SLOT_TTL_MS": "8000",
}
MESSAGE_PADDING = 200_000  # bytes of body per message: a round's sync spans two 8 MB batches
PER_ROUND = 45
SYNC_WAIT_SECONDS = 30.0
SETTLE_SECONDS = 120.0
POLL_SECONDS = 0.02


@dataclass
class Mailbox:
    """One Dovecot user behind one mailpipe account, and the Message-IDs put into it."""

    account_id: int
    login: str
    password: str
    message_ids: set[str] = field(default_factory=set)


@dataclass
class CrashReport:
    """What a drill did and what it left: the figures the issue asks for."""

    kills: int = 0  # kill rounds, each SIGKILLing every worker process while a sync ran
    processes_killed: int = 0
    jobs: int = 0
    final_jobs: int = 0
    open_runs: int = 0
    expected: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """One line for logs and the benchmark's output."""
        kills = (
            f"kills survived {self.kills} ({self.processes_killed} worker processes), "
            if self.kills
            else ""
        )
        return (
            f"{kills}jobs {self.final_jobs}/{self.jobs} final {self.statuses}, "
            f"open runs {self.open_runs}, "
            f"messages {self.stored}/{self.expected} stored, lost {self.lost}, "
            f"duplicates {self.duplicates}, {self.seconds:.1f} s"
        )


class Drill:
    """A user with mailboxes on Dovecot, fed new mail and fetch jobs while workers are killed."""

    def __init__(self, cluster, *, port: int, accounts: int = 3, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.user_id, self.key = cluster.user(f"crash-{rng.getrandbits(32):08x}")
        self.mailboxes: list[Mailbox] = []
        self.jobs: list[str] = []
        self._next = 0
        for _ in range(accounts):
            login, password = cluster.dovecot.new_user()
            account_id = self._add_account(login, password, port)
            self.mailboxes.append(Mailbox(account_id, login, password))

    def _add_account(self, login: str, password: str, port: int) -> int:
        settings = ImapSettings(
            host="127.0.0.1", port=port, username=login, password=password, security="none"
        )
        with self.cluster.sessions.begin() as session:
            owner = session.get_one(User, self.user_id)
            return add_account(session, owner, self.key, settings).id

    def deliver(self, per_account: int) -> None:
        """Put new, uniquely numbered mail into every mailbox."""
        for box in self.mailboxes:
            numbers = range(self._next, self._next + per_account)
            self._next += per_account
            self.cluster.dovecot.append(
                box.login,
                box.password,
                [plain_message(i, size=MESSAGE_PADDING) for i in numbers],
            )
            box.message_ids.update(f"<m{i}@example.org>" for i in numbers)

    def enqueue(self, *, timeout_seconds: int = 60) -> str:
        """One fetch job over every account, taking all new mail (no cap)."""
        job_id = self.cluster.pipeline.enqueue_fetch_job(
            self.user_id, key=self.key, max_mails=None, timeout_seconds=timeout_seconds
        )
        self.jobs.append(job_id)
        return job_id

    def open_runs(self) -> int:
        with self.cluster.sessions() as session:
            return session.scalar(
                select(func.count())
                .select_from(AccountRun)
                .where(AccountRun.job_id.in_(self.jobs), AccountRun.status.not_in(RUN_FINAL))
            )

    def settle(self, seconds: float = SETTLE_SECONDS) -> None:
        """Wait until every job of the drill is final."""
        deadline = time.monotonic() + seconds
        while self.open_jobs():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.open_jobs()} job(s) not final after {seconds:.0f} s; worker log:\n"
                    f"{self.cluster.workers.log()[-4000:]}"
                )
            time.sleep(0.2)

    def open_jobs(self) -> int:
        with self.cluster.sessions() as session:
            return session.scalar(
                select(func.count())
                .select_from(PipelineJob)
                .where(PipelineJob.id.in_(self.jobs), PipelineJob.status.not_in(JOB_FINAL))
            )

    def report(self, report: CrashReport) -> CrashReport:
        """Count jobs, runs and stored mail against what the mailboxes hold."""
        with self.cluster.sessions() as session:
            statuses = dict(
                session.execute(
                    select(PipelineJob.status, func.count())
                    .where(PipelineJob.id.in_(self.jobs))
                    .group_by(PipelineJob.status)
                ).all()
            )
            report.jobs = len(self.jobs)
            report.final_jobs = sum(n for s, n in statuses.items() if s in JOB_FINAL)
            report.statuses = statuses
            report.open_runs = self.open_runs()
            report.expected = report.stored = report.lost = report.duplicates = 0
            for box in self.mailboxes:
                rows = session.scalars(
                    select(Email).where(Email.account_id == box.account_id)
                ).all()
                ids = [names.email_message_id(self.key, email) for email in rows]
                report.expected += len(box.message_ids)
                report.stored += len(rows)
                report.lost += len(box.message_ids - set(ids))
                report.duplicates += len(ids) - len(set(ids))
                report.duplicates += len(rows) - len({email.uid for email in rows})
        return report


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll until condition() holds; False when the time ran out."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def kill_workers(cluster) -> int:
    """SIGKILL every worker process the dramatiq master forked; return how many."""
    pids = cluster.workers.children()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it may have died by itself
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def kill_loop(
    cluster,
    drill: Drill,
    proxy,
    *,
    kills: int,
    per_round: int = PER_ROUND,
    max_delay: float = 1.2,
    log: Callable[[str], None] = lambda _line: None,
) -> CrashReport:
    """Kill every worker process mid-sync `kills` times, restarting the workers after each.

    A sync is under way while the proxy in front of Dovecot has a connection open. Each round
    waits for that, lets the sync run a random while (connect, fetch or save), and kills.
    New mail and a new job are added whenever nothing is left to interrupt.
    """
    report = CrashReport()
    started = time.monotonic()
    while report.kills < kills:
        if drill.open_runs() == 0:
            drill.deliver(per_round)
            drill.enqueue()
        if not wait_for(lambda: proxy.active > 0 or drill.open_runs() == 0, SYNC_WAIT_SECONDS):
            raise AssertionError(
                f"no sync started within {SYNC_WAIT_SECONDS:.0f} s; worker log:\n"
                f"{cluster.workers.log()[-4000:]}"
            )
        if proxy.active == 0:
            continue  # the work ran out: the next round brings more
        time.sleep(drill.rng.uniform(0.0, max_delay))
        if proxy.active == 0:
            continue  # the sync ended before the kill: not a kill mid-sync, try again
        report.processes_killed += kill_workers(cluster)
        report.kills += 1
        log(f"kill {report.kills}: open runs {drill.open_runs()}")
        cluster.restart_workers()
    drill.settle()
    report.seconds = time.monotonic() - started
    return drill.report(report)
