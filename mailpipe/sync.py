"""Incremental sync of one account: fetch only what is new, in byte-bounded batches, idempotently."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, ParamSpec

from imapclient import IMAPClient
from sqlalchemy.orm import Session, sessionmaker

from . import imap, store
from .accounts import account_settings
from .addresses import AddressPolicy
from .crypto import DataKey
from .errors import ProtocolError
from .fetch import FetchedMessage, fetch_messages
from .imap import ImapSettings
from .models import MailAccount
from .oauth2 import TokenSource
from .observer import Observer, PhaseTimer
from .parse import parse_messages
from .processors import Processor, annotate_batch

BATCH_BYTES = 8 * 1024 * 1024
BATCH_MESSAGES = 500
FETCH_ITEMS = "UID FLAGS INTERNALDATE BODY.PEEK[]"
REQUIRED_CAPABILITY = "IMAP4REV1"
WILDCARDS = ("*", "%")
PIPELINE_DEPTH = 2

_P = ParamSpec("_P")
# a step queued for the storage thread: the function and its arguments
_Step = tuple[Callable[..., object], tuple[object, ...], dict[str, object]]


@dataclass(frozen=True)
class SyncOptions:
    """Per-run choices; folders default to the account's own list."""

    folders: Sequence[str] | None = None
    max_mails: int | None = None
    processors: Mapping[str, Processor] | None = None  # run on each batch before it is stored
    batch_bytes: int = BATCH_BYTES
    batch_messages: int = BATCH_MESSAGES


@dataclass
class FolderResult:
    """What one folder gave in one run."""

    folder: str
    fetched: int = 0
    saved: int = 0
    duplicates: int = 0
    quarantined: int = 0
    processed: int = 0
    expunged: int = 0
    unchanged: bool = False
    uidvalidity_changed: bool = False
    complete: bool = True


@dataclass
class SyncResult:
    """What one account's sync did, with wall time per phase."""

    folders: list[FolderResult] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    duration: float = 0.0
    capabilities: tuple[str, ...] = ()

    def _total(self, name: str) -> int:
        return sum(getattr(folder, name) for folder in self.folders)

    @property
    def fetched(self) -> int:
        return self._total("fetched")

    @property
    def saved(self) -> int:
        return self._total("saved")

    @property
    def duplicates(self) -> int:
        return self._total("duplicates")

    @property
    def quarantined(self) -> int:
        return self._total("quarantined")

    @property
    def processed(self) -> int:
        return self._total("processed")

    def to_json(self) -> dict[str, Any]:
        return {
            "fetched": self.fetched,
            "saved": self.saved,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "folders": [asdict(folder) for folder in self.folders],
            "phases": {name: round(seconds, 6) for name, seconds in self.phases.items()},
            "duration": round(self.duration, 6),
        }


def sync_account(
    sessions: sessionmaker[Session],
    *,
    account_id: int,
    key: DataKey,
    settings: ImapSettings | None = None,
    options: SyncOptions | None = None,
    observer: Observer | None = None,
    connect: Callable[[ImapSettings], IMAPClient] = imap.connect,
    states: Mapping[str, store.FolderPosition] | None = None,
    policy: AddressPolicy | None = None,
    tokens: TokenSource | None = None,
) -> SyncResult:
    """Bring the database up to date with the account's folders, storing each message once.

    A caller that has read the settings, the folders (in `options`) and each folder's stored
    position (`states`, from `store.folder_states`) already spares the sync reading them again.
    Settings read here from the stored account connect under `policy` (by default: public
    servers on IMAP ports only). An OAuth2 account's `tokens` give the access token, refreshed
    once more if the server refuses it.
    """
    options = options or SyncOptions()
    started = time.perf_counter()
    timer = PhaseTimer(observer)
    wanted = list(options.folders or ())
    if settings is None or not wanted or states is None:
        with sessions() as session:
            account = session.get_one(MailAccount, account_id)
            settings = settings or account_settings(account, key, policy=policy or AddressPolicy())
            wanted = wanted or list(account.folders)
            if states is None:
                states = store.folder_states(session, account_id)
    result = SyncResult()
    with timer.phase("connect"):
        client = _connect(connect, settings, tokens)
    try:
        client.normalise_times = False
        with timer.phase("diagnostics"):
            result.capabilities = quick_check(client)
        with timer.phase("folder_list"):
            folders = resolve_folders(client, wanted)
        budget = options.max_mails
        for folder in folders:
            folder_result = _sync_folder(
                client,
                sessions,
                account_id=account_id,
                key=key,
                folder=folder,
                state=states.get(folder),
                budget=budget,
                options=options,
                timer=timer,
            )
            result.folders.append(folder_result)
            if budget is not None:
                budget -= folder_result.fetched + folder_result.expunged
                if budget <= 0:
                    break
    finally:
        with timer.phase("disconnect"):
            _logout(client)
    result.phases = timer.totals
    result.duration = time.perf_counter() - started
    return result


def _connect(
    connect: Callable[[ImapSettings], IMAPClient],
    settings: ImapSettings,
    tokens: TokenSource | None,
) -> IMAPClient:
    """Log in; with OAuth2 a fresh token first, and a refused one refreshed once more."""
    if tokens is None:
        return connect(settings)
    settings = replace(settings, access_token=tokens.token())
    try:
        return connect(settings)
    except imap.TokenRefused:
        return connect(replace(settings, access_token=tokens.token(refused=settings.access_token)))


def quick_check(client: IMAPClient) -> tuple[str, ...]:
    """Capabilities from the login response (no extra round trip); refuse non-IMAP4rev1 servers."""
    capabilities = tuple(c.decode() if isinstance(c, bytes) else c for c in client.capabilities())
    if REQUIRED_CAPABILITY not in (c.upper() for c in capabilities):
        raise ProtocolError("the server does not offer IMAP4rev1")
    return capabilities


def resolve_folders(client: IMAPClient, wanted: Sequence[str]) -> list[str]:
    """Plain names are used as given (no LIST round trip); patterns are expanded with LIST."""
    folders: list[str] = []
    for name in wanted:
        if any(w in name for w in WILDCARDS):
            for flags, _delimiter, found in client.list_folders(pattern=name):
                if b"\\Noselect" not in flags and b"\\NonExistent" not in flags:
                    folders.append(found)
        else:
            folders.append(name)
    return list(dict.fromkeys(folders))


def _sync_folder(
    client: IMAPClient,
    sessions: sessionmaker[Session],
    *,
    account_id: int,
    key: DataKey,
    folder: str,
    state: store.FolderPosition | None,
    budget: int | None,
    options: SyncOptions,
    timer: PhaseTimer,
) -> FolderResult:
    outcome = FolderResult(folder=folder)
    with timer.phase("fetch"):
        selected = client.select_folder(folder, readonly=True)
    uidvalidity = int(selected[b"UIDVALIDITY"])
    uidnext = int(selected.get(b"UIDNEXT", 0))
    exists = int(selected[b"EXISTS"])
    changed = state is not None and state.uidvalidity != uidvalidity
    if state is not None and not changed and uidnext and uidnext == state.uidnext:
        outcome.unchanged = True
        return outcome
    outcome.uidvalidity_changed = changed
    last_uid = state.last_uid if state is not None and not changed else 0
    position = store.FolderPosition(uidvalidity=uidvalidity, last_uid=last_uid, uidnext=0)
    sizes: dict[int, int] = {}
    if exists:
        with timer.phase("fetch"):
            sizes = _sizes_above(client, last_uid)
    uids = sorted(sizes)
    if budget is not None and len(uids) > budget:
        uids = uids[: max(budget, 0)]
        outcome.complete = False
    writer = store.BatchWriter(
        sessions, account_id=account_id, key=key, folder=folder, dedupe_by_content=changed
    )
    batches = list(_batches(uids, sizes, options))
    # UIDNEXT is recorded only when every new message was taken, so that a run stopped by the
    # cap is not mistaken for an unchanged folder next time. It goes with the last batch.
    final_uidnext = uidnext if outcome.complete else 0
    # A single batch has nothing to overlap with: store it in this thread.
    with Pipeline(threaded=len(batches) > 1) as pipeline:
        for number, batch in enumerate(batches, start=1):
            with timer.phase("fetch"):
                fetched = fetch_messages(client._imap, batch, FETCH_ITEMS)
            messages = [fetched[uid] for uid in batch if uid in fetched]
            position.last_uid = batch[-1]
            if number == len(batches):
                position.uidnext = final_uidnext
            outcome.expunged += len(batch) - len(messages)
            pipeline.submit(
                _store_batch,
                writer,
                replace(position),
                messages,
                outcome=outcome,
                processors=options.processors,
                timer=timer,
            )
    if not batches:  # nothing new (mail came and went): the position still moves on
        position.uidnext = final_uidnext
        with timer.phase("save"):
            writer.finish(position)
    return outcome


def _store_batch(
    writer: store.BatchWriter,
    position: store.FolderPosition,
    messages: list[FetchedMessage],
    *,
    outcome: FolderResult,
    processors: Mapping[str, Processor] | None,
    timer: PhaseTimer,
) -> None:
    """Parse, process, encrypt and commit one batch with its high-water mark (in the pipeline)."""
    with timer.phase("parse"):
        parsed = parse_messages([message.body for message in messages])
    ids = [uuid.uuid4() for _ in messages]
    annotations = None
    if processors:
        with timer.phase("process"):
            annotations = annotate_batch(
                processors,
                account_id=writer.account_id,
                folder=writer.folder,
                ids=ids,
                fields=[p.fields for p in parsed],
            )
    with timer.phase("save"):
        saved = writer.write(position, messages, parsed, ids=ids, annotations=annotations)
    quarantined = [p.quarantine_reason for p in parsed if p.quarantine_reason is not None]
    outcome.fetched += len(messages)
    outcome.saved += saved.saved
    outcome.duplicates += saved.duplicates
    outcome.quarantined += len(quarantined)
    outcome.processed += saved.processed
    timer.observer.after_batch(
        fetched=len(messages),
        fetched_bytes=sum(len(message.body) for message in messages),
        saved=saved.saved,
        duplicates=saved.duplicates,
        quarantined={reason: quarantined.count(reason) for reason in set(quarantined)},
    )


class Pipeline:
    """One background thread that stores batch k while the connection fetches batch k+1.

    Batches are stored in the order submitted, so high-water marks only move forward. At most
    `depth` batches wait, which bounds memory. Leaving the block waits for every stored batch;
    a storage error is raised in the fetching thread at the next submit or at the end. With
    `threaded=False` each batch is stored at once, in the caller's thread.

    The fetching thread never blocks for long in one call: its waits wake up every
    `WAIT_STEP` seconds, so the queue's time limit (an exception raised into the thread) can
    stop it. Leaving on an error waits at most `DRAIN_SECONDS` for the batches in hand to be
    stored, then leaves the storage thread behind: a step that never ends (a plug-in processor
    that hangs) cannot hold the worker.
    """

    WAIT_STEP = 0.5
    DRAIN_SECONDS = 5.0

    def __init__(self, *, depth: int = PIPELINE_DEPTH, threaded: bool = True) -> None:
        self._queue: queue.Queue[_Step | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = (
            threading.Thread(target=self._run, name="mailpipe-store", daemon=True)
            if threaded
            else None
        )

    def __enter__(self) -> Pipeline:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        deadline = None if exc is None else time.monotonic() + self.DRAIN_SECONDS
        if self._put(None, deadline) and self._join(self._thread, deadline):
            if self._error is not None and exc is None:
                raise self._error
            return
        self._abandoned = True  # the storage thread stops after the step it is in

    def submit(self, function: Callable[_P, object], *args: _P.args, **kwargs: _P.kwargs) -> None:
        if self._thread is None:
            function(*args, **kwargs)
            return
        if self._error is not None:
            raise self._error
        self._put((function, args, kwargs), None)

    def _put(self, item: _Step | None, deadline: float | None) -> bool:
        """Queue an item, waking up every WAIT_STEP; False if the deadline passed first."""
        while deadline is None or time.monotonic() < deadline:
            try:
                self._queue.put(item, timeout=self.WAIT_STEP)
                return True
            except queue.Full:
                continue
        return False

    def _join(self, thread: threading.Thread, deadline: float | None) -> bool:
        """Wait for the storage thread, waking up every WAIT_STEP; False if the deadline passed."""
        while thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            thread.join(self.WAIT_STEP)
        return True

    def _run(self) -> None:
        while not self._abandoned:
            try:
                item = self._queue.get(timeout=self.WAIT_STEP)
            except queue.Empty:
                continue
            if item is None:
                return
            if self._error is not None:
                continue
            function, args, kwargs = item
            try:
                function(*args, **kwargs)
            except BaseException as error:
                self._error = error


def _sizes_above(client: IMAPClient, last_uid: int) -> dict[int, int]:
    """UIDs above the high-water mark with their sizes, in one round trip and without SEARCH."""
    response = fetch_messages(client._imap, f"{last_uid + 1}:*", "UID RFC822.SIZE")
    # "n:*" always matches the highest UID, even when that is below n.
    return {uid: message.size for uid, message in response.items() if uid > last_uid}


def _batches(
    uids: Sequence[int], sizes: dict[int, int], options: SyncOptions
) -> Iterator[list[int]]:
    """Groups of UIDs whose bodies together stay under the byte bound (at least one each)."""
    batch: list[int] = []
    batch_bytes = 0
    for uid in uids:
        size = sizes[uid]
        if batch and (
            batch_bytes + size > options.batch_bytes or len(batch) >= options.batch_messages
        ):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(uid)
        batch_bytes += size
    if batch:
        yield batch


def _logout(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        imap.shutdown(client)
