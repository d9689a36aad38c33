"""Incremental sync of one account: fetch only what is new, in byte-bounded batches, idempotently."""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import pickle
import queue
import select
import signal
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from types import TracebackType
from typing import Any, ParamSpec

from imapclient import IMAPClient, imap_utf7
from sqlalchemy.orm import Session, sessionmaker

from . import imap, store
from .accounts import account_folders, account_settings
from .addresses import AddressPolicy
from .crypto import DataKey
from .errors import MailpipeError, ProtocolError
from .fetch import (
    FetchedMessage,
    FirstRefused,
    fetch_batches,
    fetch_flags,
    fetch_messages,
    fetch_sizes,
    pipelined,
    status_answer,
)
from .folders import NOT_BY_WILDCARD, requested_role, role_of
from .imap import ImapSettings
from .models import MailAccount
from .oauth2 import TokenSource, logged_in
from .observer import Observer, PhaseTimer
from .parse import ParsedMessage, parse_messages
from .processors import Annotation, Processor, annotate_batch
from .vocabulary import FolderRole

BATCH_BYTES = 8 * 1024 * 1024
BATCH_MESSAGES = 500
FETCH_ITEMS = "UID FLAGS INTERNALDATE BODY.PEEK[]"
REQUIRED_CAPABILITY = "IMAP4REV1"
WILDCARDS = ("*", "%")
PIPELINE_DEPTH = 2
RAMP = 8  # a store process's first and last batches are this much smaller than the bounds
STATUS_ITEMS = b"(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
FLAG_WINDOW = 200  # without CONDSTORE: the newest messages whose flags each run refreshes
# how a folder's flag changes and expunges are learnt (see _state_method)
QRESYNC = "qresync"
CHANGEDSINCE = "changedsince"
FULL = "full"
WINDOW = "window"

_P = ParamSpec("_P")
# a step queued for the storage thread: the function and its arguments
_Step = tuple[Callable[..., object], tuple[object, ...], dict[str, object]]
# a frame on a StoreProcess pipe: the pickle's length and how many buffers follow it out of
# band (pickle protocol 5), then each buffer's length, the pickle and the buffers
FRAME_HEADER = struct.Struct("!QI")
BUFFER_LENGTH = struct.Struct("!Q")
IOV_MAX = 1024  # buffers per writev (Linux's limit)
PIPE_BYTES = 1024 * 1024  # the batches' pipe buffer: Linux's default pipe-max-size
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for the child when its parent ends


@dataclass(frozen=True)
class SyncOptions:
    """Per-run choices; folders default to the account's own list."""

    folders: Sequence[str] | None = None
    max_mails: int | None = None
    processors: Mapping[str, Processor] | None = None  # run on each batch before it is stored
    batch_bytes: int = BATCH_BYTES
    batch_messages: int = BATCH_MESSAGES
    since: datetime | None = None  # the account's window: mail received earlier is not fetched
    # store in a forked process (StoreProcess); only for a process without threads (the CLI)
    store_process: bool = False


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
    flags_changed: int = 0  # stored messages whose flags the server changed
    vanished: int = 0  # stored messages the server no longer holds here (expunged or moved)
    backfill_pending: bool = False  # older mail still to come (newest first under a cap)
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
    round_trips: int = 0  # the times the client waited for the server (see imap.round_trips)

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

    @property
    def flags_changed(self) -> int:
        return self._total("flags_changed")

    @property
    def vanished(self) -> int:
        return self._total("vanished")

    def to_json(self) -> dict[str, Any]:
        return {
            "fetched": self.fetched,
            "saved": self.saved,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "flags_changed": self.flags_changed,
            "vanished": self.vanished,
            "folders": [asdict(folder) for folder in self.folders],
            "phases": {name: round(seconds, 6) for name, seconds in self.phases.items()},
            "duration": round(self.duration, 6),
            "round_trips": self.round_trips,
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
            wanted = wanted or account_folders(account, key)
            if states is None:
                states = store.folder_states(session, account_id, key)
                session.commit()  # the account's rows from before 0013, converted
    result = SyncResult()
    with timer.phase("connect"):
        client, refused_turns = logged_in(connect, settings, tokens)
    try:
        client.normalise_times = False
        with timer.phase("diagnostics"):
            result.capabilities = quick_check(client)
        with timer.phase("folder_list"):
            folders = folder_roles(client, wanted)
        server = ServerFeatures.of(result.capabilities)
        tombstones: list[uuid.UUID] = []  # rows made tombstones in this run
        budget = options.max_mails
        quiet = unchanged_folders(client, list(folders), states, server=server, timer=timer)
        for folder, role in folders.items():
            if folder in quiet:  # STATUS showed nothing new: no EXAMINE
                result.folders.append(FolderResult(folder=folder, unchanged=True))
                continue
            folder_result = _sync_folder(
                client,
                sessions,
                account_id=account_id,
                key=key,
                folder=folder,
                state=states.get(folder),
                role=role,
                budget=budget,
                options=options,
                timer=timer,
                server=server,
                tombstones=tombstones,
            )
            result.folders.append(folder_result)
            if budget is not None:
                budget -= folder_result.fetched + folder_result.expunged
                if budget <= 0:
                    break
        if tombstones:  # every folder has been seen: a moved message found its results
            with timer.phase("save"):
                store.purge_vanished(sessions, account_id=account_id, ids=tombstones)
    finally:
        with timer.phase("disconnect"):
            imap.logout(client)
        result.round_trips = refused_turns + imap.round_trips(client)
        timer.observer.after_round_trips(result.round_trips)
    result.phases = timer.totals
    result.duration = time.perf_counter() - started
    return result


def quick_check(client: IMAPClient) -> tuple[str, ...]:
    """Capabilities from the login response (no extra round trip); refuse non-IMAP4rev1 servers."""
    capabilities = tuple(c.decode() if isinstance(c, bytes) else c for c in client.capabilities())
    if REQUIRED_CAPABILITY not in (c.upper() for c in capabilities):
        raise ProtocolError("the server does not offer IMAP4rev1")
    return capabilities


def resolve_folders(client: IMAPClient, wanted: Sequence[str]) -> list[str]:
    """Plain names are used as given (no LIST round trip); patterns are expanded with LIST,
    leaving out Gmail's \\All (it would copy every message again); a role such as `@sent`
    names the folders LIST shows with that role (SPECIAL-USE, else a common name)."""
    return list(folder_roles(client, wanted))


def folder_roles(client: IMAPClient, wanted: Sequence[str]) -> dict[str, FolderRole | None]:
    """The folders `resolve_folders` finds, each with its role (from LIST's SPECIAL-USE
    attribute when LIST was asked, else from its name)."""
    folders: dict[str, FolderRole | None] = {}
    everything: list[tuple[Sequence[bytes], str | None, str]] | None = None
    for name in wanted:
        role = requested_role(name)
        if role is FolderRole.INBOX:
            folders.setdefault("INBOX", role)
        elif role is not None:
            if everything is None:
                everything = _selectable(client, "*")
            for flags, sep, found in everything:
                if role_of(flags, found, sep) is role:
                    folders.setdefault(found, role)
        elif any(w in name for w in WILDCARDS):
            for flags, sep, found in _selectable(client, name):
                found_role = role_of(flags, found, sep)
                if found_role not in NOT_BY_WILDCARD:
                    folders.setdefault(found, found_role)
        else:
            folders.setdefault(name, role_of((), name, "/"))
    return folders


def _selectable(client: IMAPClient, pattern: str) -> list[tuple[Sequence[bytes], str | None, str]]:
    """LIST's selectable folders matching a pattern: flags, hierarchy delimiter, name."""
    return [
        (flags, delimiter.decode() if isinstance(delimiter, bytes) else delimiter, found)
        for flags, delimiter, found in client.list_folders(pattern=pattern)
        if b"\\Noselect" not in flags and b"\\NonExistent" not in flags
    ]


def unchanged_folders(
    client: IMAPClient,
    folders: Sequence[str],
    states: Mapping[str, store.FolderPosition],
    *,
    server: ServerFeatures,
    timer: PhaseTimer,
) -> set[str]:
    """The folders whose STATUS shows nothing new since the last run, asked of all at once (one
    round trip, pipelined) when CONDSTORE puts HIGHESTMODSEQ in STATUS and more than one folder
    has a position: a no-change poll of n folders then costs one round trip, not n EXAMINEs."""
    known = [
        folder
        for folder in folders
        if (state := states.get(folder)) is not None and state.uidnext and state.highestmodseq
    ]
    if not server.condstore or len(known) < 2:
        return set()
    by_wire = {_wire_name(client, folder): folder for folder in known}
    commands = [b"STATUS %s %s" % (client._normalise_folder(f), STATUS_ITEMS) for f in known]
    with timer.phase("fetch"):
        answers = pipelined(client._imap, commands)  # a folder refused here is EXAMINEd
    unchanged: set[str] = set()
    for parts in answers:
        answer = status_answer(parts)
        folder = None if answer is None else by_wire.get(_inbox_upper(answer[0]))
        if answer is None or folder is None:
            continue
        items, state = answer[1], states[folder]
        if (
            items.get(b"UIDVALIDITY") == state.uidvalidity
            and items.get(b"UIDNEXT") == state.uidnext
            and items.get(b"HIGHESTMODSEQ") == state.highestmodseq
            and items.get(b"MESSAGES") == state.messages
        ):
            unchanged.add(folder)
    return unchanged


def _wire_name(client: IMAPClient, folder: str) -> bytes:
    """A folder's name as the server writes it (modified UTF-7 unless encoding is off)."""
    name = imap_utf7.encode(folder) if client.folder_encode else folder.encode()
    return _inbox_upper(name)


def _inbox_upper(name: bytes) -> bytes:
    """INBOX is case-insensitive (RFC 3501 5.1)."""
    return b"INBOX" if name.upper() == b"INBOX" else name


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
    server: ServerFeatures,
    tombstones: list[uuid.UUID],
    role: FolderRole | None = None,
) -> FolderResult:
    outcome = FolderResult(folder=folder)
    with timer.phase("fetch"):
        box = examine(client, folder, condstore=server.condstore)
    changed = state is not None and state.uidvalidity != box.uidvalidity
    known = None if state is None or changed else state
    outcome.uidvalidity_changed = changed
    position = store.FolderPosition(
        uidvalidity=box.uidvalidity,
        last_uid=known.last_uid if known else 0,
        uidnext=0,
        highestmodseq=box.modseq,
        messages=known.messages if known else 0,
        backfill_uid=known.backfill_uid if known else 0,
        backfill_floor=known.backfill_floor if known else 0,
        role=role,
    )
    # UIDNEXT is recorded only when a run took everything, so an equal one means nothing new
    settled = known is not None and box.uidnext != 0 and box.uidnext == known.uidnext
    sizes: dict[int, int] = {}
    if box.exists and not settled:
        with timer.phase("fetch"):
            sizes = _sizes_above(client, position.last_uid, since=options.since)
    new = sorted(sizes)
    # mail already held under an older UIDVALIDITY is re-keyed, not copied: in the run that
    # finds the change, and in the backfill runs that follow a capped one
    writer = store.BatchWriter(
        sessions,
        account_id=account_id,
        key=key,
        folder=folder,
        dedupe_by_content=changed or bool(position.backfill_uid),
    )
    saved: store.FolderPosition | None = None  # the position this run committed last
    method = _state_method(server, known, box, new=len(new))
    if known is not None and method is not None:
        with timer.phase("flags"):
            changes = _state_changes(client, server, method, known=known, box=box)
            position.messages = box.exists - len(new)
            if not new and not position.backfill_uid:
                position.uidnext = box.uidnext
            applied = writer.apply(replace(position), changes, stored=known)
        saved = replace(position)
        outcome.flags_changed, outcome.vanished = applied.flags_changed, applied.vanished
        tombstones.extend(applied.vanished_ids)
        timer.observer.after_state_sync(
            flags_changed=applied.flags_changed, vanished=applied.vanished
        )
    if settled:
        outcome.unchanged = not (outcome.flags_changed or outcome.vanished)
        return outcome
    steps, backfill_sizes = _plan_new(position, new, sizes, budget, box=box, options=options)
    remaining = None if budget is None else budget - sum(len(batch) for batch, _ in steps)
    if steps:
        position = steps[-1][1]
    taken_new = sum(len(batch) for batch, _ in steps)
    outcome.complete = backfill_sizes is not None or taken_new == len(new)
    if position.backfill_uid and (remaining is None or remaining > 0):
        if backfill_sizes is None:
            with timer.phase("fetch"):
                backfill_sizes = _sizes_between(
                    client, position.backfill_floor, position.backfill_uid, since=options.since
                )
        older = sorted(
            uid for uid in backfill_sizes if position.backfill_floor < uid <= position.backfill_uid
        )
        take = older if remaining is None else older[len(older) - remaining :]
        batches = list(_batches(take, backfill_sizes, options))
        batches.reverse()  # newest first: each commit lowers the backfill mark
        for number, batch in enumerate(batches, start=1):
            done = len(take) == len(older) and number == len(batches)
            position = replace(
                position,
                backfill_uid=0 if done else batch[0] - 1,
                backfill_floor=0 if done else position.backfill_floor,
            )
            steps.append((batch, position))
        if not older:
            position = replace(position, backfill_uid=0, backfill_floor=0)
    outcome.backfill_pending = bool(position.backfill_uid)
    outcome.complete = outcome.complete and not outcome.backfill_pending
    final = replace(position, uidnext=box.uidnext if outcome.complete else 0)
    if steps:
        steps[-1] = (steps[-1][0], final)
    # A single batch has nothing to overlap with: store it in this thread.
    pipeline: Pipeline | StoreProcess
    if options.store_process and len(steps) > 1:
        # this process fetches, parses, processes and seals all but the mail; the child hashes
        # and encrypts the mail and writes: both cores about as busy
        process = StoreProcess(
            sessions,
            store_batch=partial(_write_in_child, writer),
            count=partial(_count, outcome, timer=timer),
        )
        prepare = partial(_prepare_batch, writer, processors=options.processors, timer=timer)
        pipeline = process

        def submit(position: store.FolderPosition, messages: list[FetchedMessage]) -> None:
            process.submit(prepare(position, messages))

    else:
        pipeline = Pipeline(threaded=len(steps) > 1)
        here = partial(_store_and_count, writer, outcome, options.processors, timer)
        submit = partial(pipeline.submit, here)
    answers = fetch_batches(client._imap, [batch for batch, _ in steps], FETCH_ITEMS)
    with pipeline, contextlib.closing(answers):
        for batch, after in steps:
            with timer.phase("fetch"):
                fetched = next(answers)
            messages = [fetched[uid] for uid in batch if uid in fetched]
            outcome.expunged += len(batch) - len(messages)
            submit(after, messages)
    if not steps and final != saved:  # nothing to fetch: the position still moves on
        with timer.phase("save"):
            writer.finish(final)
    return outcome


@dataclass
class ServerFeatures:
    """What the connection offers for flag and expunge sync, from the login's capabilities."""

    condstore: bool = False
    qresync: bool = False
    qresync_enabled: bool = False

    @classmethod
    def of(cls, capabilities: Sequence[str]) -> ServerFeatures:
        names = {name.upper() for name in capabilities}
        qresync = "QRESYNC" in names and "ENABLE" in names
        return cls(condstore="CONDSTORE" in names or qresync, qresync=qresync)


@dataclass(frozen=True)
class Mailbox:
    """A folder as EXAMINE showed it; `modseq` 0 when the server keeps no mod-sequences."""

    uidvalidity: int
    exists: int
    uidnext: int
    modseq: int


def examine(client: IMAPClient, folder: str, *, condstore: bool) -> Mailbox:
    """EXAMINE (read-only SELECT), with HIGHESTMODSEQ when the server has CONDSTORE; UIDNEXT
    from STATUS when the answer lacks it (Courier does), so the no-change shortcut still works."""
    name = client._normalise_folder(folder)
    if condstore:
        name += b" (CONDSTORE)"
    client._command_and_check("select", name, True)
    selected = client._process_select_response(client._imap.untagged_responses)
    uidnext = int(selected.get(b"UIDNEXT", 0))
    if not uidnext:
        uidnext = int(client.folder_status(folder, ["UIDNEXT"]).get(b"UIDNEXT", 0))
    return Mailbox(
        uidvalidity=int(selected[b"UIDVALIDITY"]),
        exists=int(selected[b"EXISTS"]),
        uidnext=uidnext,
        # some servers (Cyrus) send HIGHESTMODSEQ unasked: used only where CONDSTORE is offered
        modseq=int(selected.get(b"HIGHESTMODSEQ", 0)) if condstore else 0,
    )


def _state_method(
    server: ServerFeatures, known: store.FolderPosition | None, box: Mailbox, *, new: int
) -> str | None:
    """How to learn the flag changes and expunges of the stored part of a folder, or None when
    nothing can have changed there (the no-change poll pays nothing for it)."""
    if known is None or not known.last_uid:
        return None
    # what the server holds up to the high-water mark, against what it held the last time
    count_agrees = box.exists - new == known.messages
    if box.modseq and known.highestmodseq:
        if box.modseq == known.highestmodseq:
            return None if count_agrees else FULL
        if server.qresync:
            return QRESYNC
        return CHANGEDSINCE if count_agrees else FULL
    if box.modseq or not count_agrees:
        return FULL  # no mod-sequence stored yet, or something vanished: compare the UID sets
    return WINDOW if box.exists else None


def _state_changes(
    client: IMAPClient,
    server: ServerFeatures,
    method: str,
    *,
    known: store.FolderPosition,
    box: Mailbox,
) -> store.StateChanges:
    """Ask the server what changed among the stored messages, in one round trip (ENABLE
    QRESYNC, once per connection, pipelined with the first QRESYNC fetch)."""
    last = known.last_uid
    enable = b"ENABLE QRESYNC" if method == QRESYNC and not server.qresync_enabled else None
    try:
        report = fetch_flags(
            client._imap, _flag_request(method, known, box), highest=last, first=enable
        )
    except FirstRefused:  # QRESYNC announced but refused: learn expunges by comparison
        server.qresync = False
        method = FULL
        report = fetch_flags(client._imap, _flag_request(method, known, box), highest=last)
    server.qresync_enabled = server.qresync_enabled or enable is not None
    flags = {uid: store.flag_text(value) for uid, value in report.flags.items() if uid <= last}
    present = set(report.flags) if method == FULL else None
    return store.StateChanges(flags=flags, vanished=report.vanished, present=present)


def _flag_request(method: str, known: store.FolderPosition, box: Mailbox) -> str:
    """The one flag fetch of a method."""
    last, since = known.last_uid, known.highestmodseq
    if method == QRESYNC:
        return f"UID FETCH 1:{last} (UID FLAGS) (CHANGEDSINCE {since} VANISHED)"
    if method == CHANGEDSINCE:
        return f"UID FETCH 1:{last} (UID FLAGS) (CHANGEDSINCE {since})"
    if method == FULL:
        return f"UID FETCH 1:{last} (UID FLAGS)"
    return f"FETCH {max(1, box.exists - FLAG_WINDOW + 1)}:* (UID FLAGS)"


def _plan_new(
    position: store.FolderPosition,
    new: list[int],
    sizes: dict[int, int],
    budget: int | None,
    *,
    box: Mailbox,
    options: SyncOptions,
) -> tuple[list[tuple[list[int], store.FolderPosition]], dict[int, int] | None]:
    """Batches of new mail above the high-water mark, each with the position its commit records.

    Under a cap the newest new mail comes first: the high-water mark jumps to the newest UID
    and what lies between becomes the backfill (its sizes are returned, already known). While
    a backfill is pending, new mail is taken oldest first, so there is only ever one gap.
    """
    if not new:
        return [], None
    if budget is not None and len(new) > budget and not position.backfill_uid:
        position.backfill_floor = position.last_uid
        position.backfill_uid = position.last_uid = new[-1]
        position.messages = box.exists
        return [], sizes
    take = new if budget is None else new[: max(budget, 0)]
    steps: list[tuple[list[int], store.FolderPosition]] = []
    for batch in _batches(take, sizes, options):
        above = len(new) - bisect.bisect_right(new, batch[-1])
        position = replace(position, last_uid=batch[-1], messages=box.exists - above)
        steps.append((batch, position))
    return steps, None


@dataclass(frozen=True)
class PreparedBatch:
    """A batch parsed and processed, its mail not yet sealed, with the position its commit
    records: what writing it needs (in a StoreProcess: what crosses the pipe), and what it
    counts."""

    position: store.FolderPosition
    rows: list[dict[str, Any]]
    clear: list[store.Clear]
    fetched_bytes: int
    quarantined: dict[str, int]


@dataclass(frozen=True)
class BatchReport:
    """What storing one batch did, counted where it was stored, added up where it was fetched;
    `phases` holds (phase, wall, CPU) timed in a store process, to be told in the fetching one."""

    fetched: int
    fetched_bytes: int
    saved: int
    duplicates: int
    processed: int
    quarantined: dict[str, int]
    phases: list[tuple[str, float, float]] = field(default_factory=list)


def _prepare_batch(
    writer: store.BatchWriter,
    position: store.FolderPosition,
    messages: list[FetchedMessage],
    *,
    processors: Mapping[str, Processor] | None,
    timer: PhaseTimer,
) -> PreparedBatch:
    """Parse, process and encrypt one batch but for its mail: the half of storing it that
    needs no database write."""
    with timer.phase("parse"):
        parsed = parse_messages([message.body for message in messages])
    ids = [uuid.uuid4() for _ in messages]
    annotations: list[Annotation | None] | None = None
    if processors:
        with timer.phase("process"):
            annotations = _annotations(writer, processors, messages, parsed, ids)
    with timer.phase("save"):
        rows, clear = writer.rows(
            position.uidvalidity, messages, parsed, ids=ids, annotations=annotations
        )
    quarantined = [p.quarantine_reason for p in parsed if p.quarantine_reason is not None]
    return PreparedBatch(
        position=position,
        rows=rows,
        clear=clear,
        fetched_bytes=sum(len(message.body) for message in messages),
        quarantined={reason: quarantined.count(reason) for reason in set(quarantined)},
    )


def _write_batch(
    writer: store.BatchWriter, batch: PreparedBatch, *, timer: PhaseTimer
) -> BatchReport:
    """Seal a prepared batch's mail and commit the batch with its high-water mark."""
    with timer.phase("save"):
        saved = writer.write(batch.position, writer.seal(batch.rows, batch.clear))
    return BatchReport(
        fetched=len(batch.rows),
        fetched_bytes=batch.fetched_bytes,
        saved=saved.saved,
        duplicates=saved.duplicates,
        processed=saved.processed,
        quarantined=batch.quarantined,
    )


def _store_and_count(
    writer: store.BatchWriter,
    outcome: FolderResult,
    processors: Mapping[str, Processor] | None,
    timer: PhaseTimer,
    position: store.FolderPosition,
    messages: list[FetchedMessage],
) -> None:
    """Store a batch in this process (the storage thread, or the caller's) and count it."""
    batch = _prepare_batch(writer, position, messages, processors=processors, timer=timer)
    _count(outcome, _write_batch(writer, batch, timer=timer), timer=timer)


def _write_in_child(writer: store.BatchWriter, batch: PreparedBatch) -> BatchReport:
    """Commit a prepared batch in a StoreProcess, its phases kept for the report (the observer
    that records them lives in the fetching process)."""
    log = PhaseLog()
    report = _write_batch(writer, batch, timer=PhaseTimer(log))
    return replace(report, phases=log.phases)


def _count(outcome: FolderResult, report: BatchReport, *, timer: PhaseTimer) -> None:
    """Add a stored batch to the folder's result and tell the observer."""
    for name, seconds, cpu_seconds in report.phases:
        timer.add(name, seconds, cpu_seconds=cpu_seconds)
    outcome.fetched += report.fetched
    outcome.saved += report.saved
    outcome.duplicates += report.duplicates
    outcome.quarantined += sum(report.quarantined.values())
    outcome.processed += report.processed
    timer.observer.after_batch(
        fetched=report.fetched,
        fetched_bytes=report.fetched_bytes,
        saved=report.saved,
        duplicates=report.duplicates,
        quarantined=report.quarantined,
    )


class PhaseLog(Observer):
    """Keeps each timed phase (name, wall, CPU) for telling another observer later."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float, float]] = []
        self._cpu = 0.0

    def after_phase_cpu(self, phase: str, seconds: float) -> None:
        self._cpu = seconds

    def after_phase(self, phase: str, seconds: float) -> None:
        self.phases.append((phase, seconds, self._cpu))


def _annotations(
    writer: store.BatchWriter,
    processors: Mapping[str, Processor],
    messages: list[FetchedMessage],
    parsed: list[ParsedMessage],
    ids: list[uuid.UUID],
) -> list[Annotation | None]:
    """Run the processors on a batch, except on mail whose content the account already holds
    processed (moved from another folder): that keeps its annotations, processed once."""
    hashes = [writer.key.content_hash(message.body) for message in messages]
    known = writer.known_annotations(hashes)
    fresh = [i for i, content_hash in enumerate(hashes) if content_hash not in known]
    made = annotate_batch(
        processors,
        account_id=writer.account_id,
        folder=writer.folder,
        ids=[ids[i] for i in fresh],
        fields=[parsed[i].fields for i in fresh],
    )
    annotations: list[Annotation | None] = [known.get(content_hash) for content_hash in hashes]
    for i, annotation in zip(fresh, made, strict=True):
        annotations[i] = annotation
    return annotations


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


class StoreProcess:
    """A forked child that stores the batches this process fetches, on the other core.

    Parsing, encryption and SQLite or PostgreSQL writes hold the GIL; in a thread they starve
    the fetch. Each batch (its position and raw messages) goes to the child through a pipe; the
    child stores batches in the order sent, each with its high-water mark, and answers with a
    BatchReport, counted here. At most `depth` batches are sent and not yet reported, which
    bounds memory. The child opens its own database connections (the inherited pool is
    dropped unclosed), ignores Ctrl-C (this process decides), dies with this process (Linux's
    parent-death signal, and the end of the pipe) and never runs this process's exit code.
    An error in the child is raised here, as it was raised there, at the next submit or at
    the end. Only for a process without threads (the one-shot command): forking a threaded
    worker is unsafe.
    """

    DRAIN_SECONDS = 5.0

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        store_batch: Callable[[PreparedBatch], BatchReport],
        count: Callable[[BatchReport], None],
        depth: int = PIPELINE_DEPTH,
    ) -> None:
        self._sessions = sessions
        self._store_batch = store_batch
        self._count = count
        self._depth = depth
        self._pending = 0  # batches sent and not reported yet
        self.pid = 0
        self._ended = False  # the child has been waited for
        self._batches = self._reports = -1

    def __enter__(self) -> StoreProcess:
        batches_in, self._batches = os.pipe()
        self._reports, reports_out = os.pipe()
        with contextlib.suppress(OSError):  # fewer, larger copies (Linux; up to pipe-max-size)
            fcntl.fcntl(self._batches, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._batches)
                os.close(self._reports)
                _die_with(parent)
                self._sessions.kw["bind"].dispose(close=False)
                self._serve(batches_in, reports_out)
                code = 0
            finally:
                os._exit(code)
        os.close(batches_in)
        os.close(reports_out)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self._batches)  # the end of the batches: the child stores what it has, exits
        deadline = None if exc is None else time.monotonic() + self.DRAIN_SECONDS
        try:
            while self._pending and _readable(self._reports, deadline):
                self._collect()
        except Exception:
            if exc is None:
                raise
        finally:
            os.close(self._reports)
            if not self._ended:
                if self._pending or exc is not None:
                    os.kill(self.pid, signal.SIGKILL)  # a batch cut short is a rolled-back one
                os.waitpid(self.pid, 0)

    def submit(self, batch: PreparedBatch) -> None:
        while _readable(self._reports, 0.0):
            self._collect()
        while self._pending >= self._depth:
            self._collect()
        try:
            _send(self._batches, batch)
        except BrokenPipeError:  # the child has ended: say why
            while True:
                self._collect()
        self._pending += 1

    def _collect(self) -> None:
        """Read the child's next report and count it, or raise its error."""
        frame = _receive(self._reports)
        if frame is None:
            _pid, status = os.waitpid(self.pid, 0)
            self._ended = True
            code = os.waitstatus_to_exitcode(status)
            raise MailpipeError(f"the process storing the mail ended unexpectedly (exit {code})")
        stored, answer = frame
        if not stored:
            raise answer
        self._pending -= 1
        self._count(answer)

    def _serve(self, batches: int, reports: int) -> None:
        """In the child: store each batch as it comes, read by a thread of its own meanwhile."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        inbox: queue.Queue[Any] = queue.Queue(maxsize=self._depth)

        def receive() -> None:
            while (batch := _receive(batches)) is not None:
                inbox.put(batch)
            inbox.put(None)

        threading.Thread(target=receive, name="mailpipe-receive", daemon=True).start()
        while (batch := inbox.get()) is not None:
            try:
                report = self._store_batch(batch)
            except BaseException as error:
                _send(reports, (False, _portable(error)))
                return
            _send(reports, (True, report))


def _die_with(parent: int) -> None:
    """Have the kernel end this child when its parent ends (Linux), or end it now if it has."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _portable(error: BaseException) -> BaseException:
    """The error as it can cross to the parent, its traceback as a note; one that does not
    survive pickling (SQLAlchemy's) becomes a stand-in that `failures.classify` words alike."""
    note = f"in the storing process {os.getpid()}:\n{traceback.format_exc()}"
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = MailpipeError(f"unexpected {type(error).__name__}")
    error.add_note(note)
    return error


def _send(fd: int, item: object) -> None:
    """Write one frame; PickleBuffers in `item` go to the pipe as they are, not copied into
    the pickle."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(item, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    lengths = b"".join(BUFFER_LENGTH.pack(view.nbytes) for view in views)
    _write_all(fd, [memoryview(FRAME_HEADER.pack(len(data), len(views)) + lengths + data), *views])


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Write every view, as few system calls as the pipe allows."""
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if written:
            views[0] = views[0][written:]


def _receive(fd: int) -> Any:
    """Read one frame; None at the end of the pipe."""
    header = _read_exactly(fd, FRAME_HEADER.size)
    if header is None:
        return None
    size, count = FRAME_HEADER.unpack(header)
    table = _read_exactly(fd, count * BUFFER_LENGTH.size)
    data = _read_exactly(fd, size)
    lengths = [length for (length,) in BUFFER_LENGTH.iter_unpack(table or b"")]
    body = _read_exactly(fd, sum(lengths))
    if table is None or data is None or body is None:
        return None
    view, buffers = memoryview(body), []
    for length in lengths:
        buffers.append(view[:length])
        view = view[length:]
    return pickle.loads(data, buffers=buffers)


def _read_exactly(fd: int, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        read = os.readv(fd, [view[got:]])
        if not read:
            return None
        got += read
    return buffer


def _readable(fd: int, deadline: float | None) -> bool:
    """Whether the pipe has something to read, waiting until the deadline (None: forever;
    a deadline of 0.0 does not wait)."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    return bool(select.select([fd], [], [], timeout)[0])


def _sizes_above(client: IMAPClient, last_uid: int, *, since: datetime | None) -> dict[int, int]:
    """UIDs above the high-water mark with their sizes, in one round trip and without SEARCH."""
    # "n:*" always matches the highest UID, even when that is below n.
    return _sizes(client, f"{last_uid + 1}:*", since=since, low=last_uid + 1, high=None)


def _sizes(
    client: IMAPClient, uid_set: str, *, since: datetime | None, low: int, high: int | None
) -> dict[int, int]:
    """Sizes of the UIDs from `low` to `high` in a UID set; with `since`, only of the messages
    the server received then or later (the account's window: older mail is never fetched)."""
    if since is None:
        sizes = fetch_sizes(client._imap, uid_set)
    else:
        dated = fetch_messages(client._imap, uid_set, "UID RFC822.SIZE INTERNALDATE")
        sizes = {
            uid: message.size
            for uid, message in dated.items()
            if message.internal_date is None or message.internal_date >= since
        }
    return {
        uid: size for uid, size in sizes.items() if low <= uid and (high is None or uid <= high)
    }


def _sizes_between(
    client: IMAPClient, floor: int, top: int, *, since: datetime | None
) -> dict[int, int]:
    """UIDs above `floor` up to `top` with their sizes: the backfill still due."""
    return _sizes(client, f"{floor + 1}:{top}", since=since, low=floor + 1, high=top)


def _batches(uids: Sequence[int], sizes: dict[int, int], options: SyncOptions) -> list[list[int]]:
    """Groups of UIDs whose bodies together stay under the byte bound (at least one each).

    For a store process the first groups are smaller (1/RAMP of the bounds, doubling up to
    them) and the last one is cut into a half, a quarter, ... down to 1/RAMP: it starts while
    most of a folder is still to be fetched, and what it has left to store after the last
    fetch is a small piece, not a whole batch. (A worker's many accounts keep its cores busy:
    there, fewer batches are cheaper.)"""
    batches: list[list[int]] = []
    batch: list[int] = []
    batch_bytes = 0
    share = RAMP if options.store_process else 1
    for uid in uids:
        size = sizes[uid]
        if batch and (
            batch_bytes + size > options.batch_bytes // share
            or len(batch) >= options.batch_messages // share
        ):
            batches.append(batch)
            batch, batch_bytes = [], 0
            share = max(1, share // 2)
        batch.append(uid)
        batch_bytes += size
    if batch and options.store_process:
        for _ in range(RAMP.bit_length() - 1):
            if len(batch) < 2:
                break
            cut = len(batch) // 2
            batches.append(batch[:cut])
            batch = batch[cut:]
    if batch:
        batches.append(batch)
    return batches
