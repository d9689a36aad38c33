"""Push: hold an IDLE connection per watched account and start a fetch run when mail arrives.

One asyncio loop holds every connection (no thread per connection). Logging in and examining
the folder block, so they run on a small pool of threads (`connect_threads`), as do the
database calls (one thread). Which accounts a watcher holds is decided by leases in the
database (`leases.claim_watches`), renewed every quarter of their lifetime: several watchers
share the accounts, never two the same, and a dead watcher's accounts are taken over once its
leases lapse. Runs go through the existing job machinery, through the `enqueue` callable the
outer layer hands in (`PipelineBroker.enqueue_push_job`), coalesced per account. Each IDLE
connection holds a slot of its host's connection cap (`slots`), renewed with the leases.
An OAuth2 account logs in with a token that is valid at that login (`oauth2.TokenSource`): its
data key is unlocked from the background grant again for the login and forgotten after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from . import grants, idle, leases, names
from .accounts import account_folders, account_settings, has_oauth2_grant
from .addresses import AddressPolicy
from .crypto import DataKey
from .errors import MailpipeError, NotFound
from .failures import classify
from .imap import ImapSettings
from .models import AccountRun, FolderState, MailAccount
from .oauth2 import TokenSource, logged_in
from .observer import WatchObserver
from .policies import WatchPolicy
from .providers import Provider
from .retry import RetryPolicy
from .sync import WILDCARDS
from .vocabulary import RUN_OPEN, RunStatus

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

FLUSH_SECONDS = 0.5  # how often an account whose run is still going is looked at again
LEASE_SAFETY = 0.75  # leases not renewed for this part of their time: stop watching, they lapse


@dataclass(frozen=True)
class _Target:
    """One held account: what the watcher needs to log in, kept in memory only."""

    account_id: int
    user_id: int
    provider: str
    settings: ImapSettings
    folder: str
    folder_hash: bytes  # how folder_state finds the folder (mailpipe.names)
    oauth2: bool  # logs in with a refreshable OAuth2 grant: a valid token per login


def watched_folder(folders: list[str] | None) -> str:
    """IDLE watches one folder per connection: the first named without wildcards, else INBOX."""
    plain = [name for name in folders or () if not any(w in name for w in WILDCARDS)]
    return plain[0] if plain else "INBOX"


class HostSlots(Protocol):
    """The per-host connection cap as a watcher uses it: one slot per IDLE connection, each
    lapsing after the lease time unless renewed (the outer layer keeps them in Redis)."""

    def claim(self, host: str, holder: str) -> bool: ...

    def renew(self, claims: list[tuple[str, str]]) -> None: ...

    def release(self, host: str, holder: str) -> None: ...


class Watcher:
    """Watch the accounts this process holds leases on, until cancelled.

    `enqueue(user_id, account_ids, noticed_at)` starts one push run per account (`noticed_at`:
    when the first change among them was seen, Unix time); it is called only for
    accounts with no run queued or running, so a burst of new mail gives one run, and one more
    after it when mail came while it ran.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        owner: str,
        private_key: X25519PrivateKey,
        enqueue: Callable[[int, list[int], float], object],
        retry: RetryPolicy,
        policy: WatchPolicy,
        address_policy: AddressPolicy,
        observer: WatchObserver | None = None,
        slots: HostSlots | None = None,
        oauth2_providers: Mapping[str, Provider] | None = None,
    ) -> None:
        self.sessions = sessions
        self.owner = owner
        self.private_key = private_key
        self.enqueue = enqueue
        self.retry = retry
        self.policy = policy
        self.address_policy = address_policy
        self.observer = observer or WatchObserver()
        self.slots = slots
        self.oauth2_providers = oauth2_providers or {}  # client secrets for token refreshes
        self._slots: dict[int, tuple[str, str]] = {}  # account -> (host, holder) of its slot
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._targets: dict[int, _Target] = {}
        # account -> loop time when one whose login was refused is tried again (settings anew)
        self._resting: dict[int, float] = {}
        # account -> (user, change number, first seen): a change not yet turned into a run
        self._pending: dict[int, tuple[int, int, float]] = {}
        self._changes = itertools.count()
        self._renewed_at = 0.0  # loop time of the last renewal of the leases
        self._wake = asyncio.Event()
        self._database = ThreadPoolExecutor(1, thread_name_prefix="watcher-db")
        self._connect = ThreadPoolExecutor(
            policy.connect_threads, thread_name_prefix="watcher-connect"
        )

    async def run(self) -> None:
        """Claim, watch, renew, hand over; on cancellation close every connection and give
        every lease back, so another watcher takes the accounts at once."""
        flush = asyncio.create_task(self._flush_forever())
        try:
            while True:
                await self._refresh()
                await asyncio.sleep(self.policy.lease_seconds / 4)
        finally:
            flush.cancel()
            watching = list(self._tasks.values())
            for account_id in list(self._tasks):
                self._drop(account_id)
            # every connection closed before the leases go back: never two on one account
            await asyncio.gather(flush, *watching, return_exceptions=True)
            await self._in_database(self._release_all)
            self._database.shutdown(wait=False)
            self._connect.shutdown(wait=False, cancel_futures=True)

    # -- leases ------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        for account_id, until in list(self._resting.items()):
            if until <= loop.time():  # its watch ended: claimed as new, its settings read anew
                del self._resting[account_id]
                self._tasks.pop(account_id, None)
                self._targets.pop(account_id, None)
        try:
            held, targets = await self._in_database(self._claim, set(self._tasks))
        except Exception as error:  # the database is away: keep watching while the leases last
            logger.warning("watcher could not renew its leases: %s", classify(error).message)
            if loop.time() - self._renewed_at > self.policy.lease_seconds * LEASE_SAFETY:
                for account_id in list(self._tasks):  # they may be another watcher's by now
                    self._drop(account_id)
            return
        self._renewed_at = loop.time()
        for account_id in set(self._tasks) - held:
            self._drop(account_id)
        for target in targets:
            self._targets[target.account_id] = target
            self._tasks[target.account_id] = asyncio.create_task(self._watch(target))
        if self.slots is not None and self._slots:
            try:
                await self._in_database(self.slots.renew, list(self._slots.values()))
            except Exception as error:  # they lapse; the next renewal may still come in time
                logger.warning("connection slots not renewed: %s", error)

    def _claim(self, known: set[int]) -> tuple[set[int], list[_Target]]:
        with self.sessions.begin() as session:
            held = leases.claim_watches(
                session,
                owner=self.owner,
                seconds=self.policy.lease_seconds,
                limit=self.policy.capacity,
            )
        new = held - known
        targets: list[_Target] = []
        unreadable: set[int] = set()
        keys: dict[int, DataKey | None] = {}
        with self.sessions() as session:
            accounts = session.scalars(select(MailAccount).where(MailAccount.id.in_(new)))
            for account in accounts:
                if account.user_id not in keys:
                    keys[account.user_id] = self._key(session, account.user_id)
                key = keys[account.user_id]
                try:
                    if key is None:
                        raise NotFound(grants.MISSING_GRANT)
                    settings = account_settings(account, key, policy=self.address_policy)
                    folder = watched_folder(account_folders(account, key))
                except MailpipeError:  # no grant, or sealed settings that do not open
                    unreadable.add(account.id)
                    continue
                targets.append(
                    _Target(
                        account.id,
                        account.user_id,
                        account.provider,
                        settings,
                        folder,
                        names.folder_hash(key, folder),
                        has_oauth2_grant(account, key),
                    )
                )
        if unreadable:
            with self.sessions.begin() as session:
                leases.release_watches(session, owner=self.owner, account_ids=unreadable)
        return held - unreadable, targets

    def _key(self, session: Session, user_id: int) -> DataKey | None:
        """The user's data key from their background grant; in memory only, while needed."""
        grant = grants.background_grant(session, user_id)
        if grant is None:
            return None
        try:
            return grants.unlock_grant(session, grant.id, self.private_key)
        except MailpipeError:
            return None

    def _push_off(self, account_id: int) -> None:
        """The server has no IDLE: push off (the owner sees the poll interval), lease given back."""
        with self.sessions.begin() as session:
            session.execute(
                update(MailAccount).where(MailAccount.id == account_id).values(push_enabled=False)
            )
            leases.release_watches(session, owner=self.owner, account_ids=[account_id])

    def _release_all(self) -> None:
        with self.sessions.begin() as session:
            leases.release_watches(session, owner=self.owner)

    def _drop(self, account_id: int) -> None:
        """Stop watching an account: its connection closes and its credentials are forgotten."""
        task = self._tasks.pop(account_id, None)
        if task is not None:
            task.cancel()
        self._targets.pop(account_id, None)
        self._resting.pop(account_id, None)
        self._pending.pop(account_id, None)

    # -- one account --------------------------------------------------------------------------

    async def _watch(self, target: _Target) -> None:
        """IDLE on the account's folder, on a slot of its host's connection cap; a change (or
        mail that came while no connection was held) marks it for a run; a lost connection
        comes back with backoff and jitter."""
        failures = 0
        while True:
            if not await self._take_slot(target):  # the host is at its cap: wait for a slot
                await asyncio.sleep(self.policy.lease_seconds / 4)
                continue
            try:
                failures, again = await self._connected(target, failures)
            finally:
                await self._give_slot(target)
            if not again:  # the lease stays, so no other watcher tries it meanwhile
                loop = asyncio.get_running_loop()
                self._resting[target.account_id] = loop.time() + self.policy.retry_seconds
                return
            await asyncio.sleep(self.retry.backoff_seconds(failures))

    async def _connected(self, target: _Target, failures: int) -> tuple[int, bool]:
        """One connection, from login to its loss: the failures so far and whether to try again."""
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(self._connect, self._open, target)
        except idle.IdleUnsupported:
            logger.info("account %d: no IDLE on its server; it is polled", target.account_id)
            await self._in_database(self._push_off, target.account_id)
            return failures, False
        except Exception as error:
            return failures + 1, self._again(error)
        self.observer.idle_connected(provider=target.provider)
        try:
            await connection.start()
            stored = await self._in_database(self._stored_uidnext, target)
            if connection.mailbox.uidnext != stored:  # mail came while none was watching
                self._changed(target)
            failures = 0
            while True:
                await connection.changes(renew_seconds=self.policy.renew_seconds)
                self._changed(target)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            return failures + 1, self._again(error)
        finally:
            self.observer.idle_closed(provider=target.provider)
            with contextlib.suppress(Exception):
                await connection.close()

    def _open(self, target: _Target) -> idle.IdleConnection:
        """Log in and examine the folder (blocking, on a connect thread: a token refresh may
        take seconds); an OAuth2 account with a valid token, refreshed once more if refused,
        under its data key unlocked from the background grant for this login only."""

        def examine(settings: ImapSettings) -> idle.IdleConnection:
            return idle.open_idle(settings, target.folder)

        if not target.oauth2:
            return examine(target.settings)
        with self.sessions() as session:
            key = self._key(session, target.user_id)
        if key is None:
            raise NotFound(grants.MISSING_GRANT)
        tokens = TokenSource(
            self.sessions,
            target.account_id,
            key,
            providers=self.oauth2_providers,
            observer=self.observer.token_refreshes(provider=target.provider),
        )
        connection, _refused_turns = logged_in(examine, target.settings, tokens)
        return connection

    async def _take_slot(self, target: _Target) -> bool:
        if self.slots is None:
            return True
        holder = f"{self.owner}:{target.account_id}"
        try:
            taken = await self._in_database(self.slots.claim, target.settings.host, holder)
        except Exception as error:  # Redis away: no slot, so no connection for now
            logger.warning("no connection slot for an IDLE connection: %s", error)
            return False
        if taken:
            self._slots[target.account_id] = (target.settings.host, holder)
        return taken

    async def _give_slot(self, target: _Target) -> None:
        claim = self._slots.pop(target.account_id, None)
        if claim is not None and self.slots is not None:
            with contextlib.suppress(Exception):  # it lapses by itself
                await self._in_database(self.slots.release, *claim)

    def _stored_uidnext(self, target: _Target) -> int:
        """The watched folder's UIDNEXT as the last sync stored it (0: never synced)."""
        with self.sessions() as session:
            stored = session.scalar(
                select(FolderState.uidnext).where(
                    FolderState.account_id == target.account_id,
                    or_(  # converted, or still in clear from before migration 0013
                        FolderState.folder_hash == target.folder_hash,
                        FolderState.folder == target.folder,
                    ),
                )
            )
        return stored or 0

    def _again(self, error: Exception) -> bool:
        """Whether a failed connection is tried again now: transient failures are; the rest
        (a wrong password, say) after `WatchPolicy.retry_seconds`, with the settings stored
        then, unless the account's runs have marked it BROKEN by then (it is given up)."""
        failure = classify(error)
        self.observer.reconnect(error_class=failure.error_class)
        return failure.transient

    def _changed(self, target: _Target) -> None:
        noticed = self._pending.get(target.account_id, (0, 0, time.time()))[2]
        self._pending[target.account_id] = (target.user_id, next(self._changes), noticed)
        self._wake.set()

    # -- coalesced runs -----------------------------------------------------------------------

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                pending = dict(self._pending)
                try:
                    settled, enqueued = await self._in_database(self._enqueue_due, pending)
                except Exception as error:
                    logger.warning("push runs not enqueued yet: %s", classify(error).message)
                    settled, enqueued = set(), set()
                for account_id in enqueued:
                    target = self._targets.get(account_id)
                    self.observer.push_runs(
                        provider=target.provider if target else "other", count=1
                    )
                for account_id in settled:
                    if self._pending.get(account_id) == pending[account_id]:
                        del self._pending[account_id]
                if self._pending:
                    await asyncio.sleep(FLUSH_SECONDS)

    def _enqueue_due(self, pending: dict[int, tuple[int, int, float]]) -> tuple[set[int], set[int]]:
        """Enqueue a run for each account with none queued or running; returns the accounts
        settled (enqueued now, or with a run queued that has not started: it will see the mail)
        and those enqueued. An account whose run is going stays pending until that run ends."""
        with self.sessions() as session:
            rows = session.execute(
                select(AccountRun.account_id, AccountRun.status).where(
                    AccountRun.account_id.in_(list(pending)), AccountRun.status.in_(RUN_OPEN)
                )
            ).all()
        queued = {account for account, status in rows if status == RunStatus.PENDING}
        busy = {account for account, _status in rows} - queued
        due: dict[int, list[int]] = defaultdict(list)
        noticed: dict[int, float] = {}
        for account_id, (user_id, _change, seen) in pending.items():
            if account_id not in queued and account_id not in busy:
                due[user_id].append(account_id)
                noticed[user_id] = min(seen, noticed.get(user_id, seen))
        settled, enqueued = set(queued), set()
        for user_id, account_ids in due.items():
            try:
                self.enqueue(user_id, account_ids, noticed[user_id])
            except NotFound:  # the grant ended just now: the next refresh drops the accounts
                pass
            else:
                enqueued.update(account_ids)
            settled.update(account_ids)
        return settled, enqueued

    async def _in_database(self, function: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._database, function, *args)


def owner_name(host: str, pid: int) -> str:
    """A watcher's name in the leases: host, process and start time, unique per process."""
    return f"{host[:40]}:{pid}:{int(time.time())}"
