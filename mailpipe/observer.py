"""How the core reports what it does, so metrics and job records need no hooks inside it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

PHASES = (
    "connect",
    "diagnostics",
    "folder_list",
    "fetch",
    "flags",
    "parse",
    "save",
    "process",
    "disconnect",
)


class Observer:
    """Base class with no-op hooks; subclasses override what they record (metrics, job rows).

    Hooks may be called from the sync's storage thread as well as the fetching one.
    """

    def before_run(self, *, provider: str) -> None:
        """An account run goes ahead; `provider` is the account's (one of a fixed set of names)."""

    def after_phase(self, phase: str, seconds: float) -> None:
        """A phase of one account's sync took `seconds` of wall time (phases may repeat)."""

    def after_phase_cpu(self, phase: str, seconds: float) -> None:
        """The same phase used `seconds` of CPU in the thread that ran it (told just before)."""

    def after_batch(
        self,
        *,
        fetched: int,
        fetched_bytes: int,
        saved: int,
        duplicates: int,
        quarantined: Mapping[str, int],
    ) -> None:
        """One batch was committed; `quarantined` counts messages by reason."""

    def after_state_sync(self, *, flags_changed: int, vanished: int) -> None:
        """A folder's flag changes and vanished mail were committed (counts of stored mail)."""

    def after_round_trips(self, count: int) -> None:
        """The run's IMAP connection waited for the server `count` times, logout included."""

    def after_push(self, *, seconds: float) -> None:
        """A push run stored new mail `seconds` after its watcher saw the server report it."""

    def after_token_refresh(self, outcome: str) -> None:
        """An OAuth2 access token was refreshed, or not (`vocabulary.RefreshOutcome`)."""


class Observers(Observer):
    """Fan one stream of events out to several observers."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def before_run(self, *, provider: str) -> None:
        for observer in self.observers:
            observer.before_run(provider=provider)

    def after_push(self, *, seconds: float) -> None:
        for observer in self.observers:
            observer.after_push(seconds=seconds)

    def after_phase(self, phase: str, seconds: float) -> None:
        for observer in self.observers:
            observer.after_phase(phase, seconds)

    def after_phase_cpu(self, phase: str, seconds: float) -> None:
        for observer in self.observers:
            observer.after_phase_cpu(phase, seconds)

    def after_batch(
        self,
        *,
        fetched: int,
        fetched_bytes: int,
        saved: int,
        duplicates: int,
        quarantined: Mapping[str, int],
    ) -> None:
        for observer in self.observers:
            observer.after_batch(
                fetched=fetched,
                fetched_bytes=fetched_bytes,
                saved=saved,
                duplicates=duplicates,
                quarantined=quarantined,
            )

    def after_state_sync(self, *, flags_changed: int, vanished: int) -> None:
        for observer in self.observers:
            observer.after_state_sync(flags_changed=flags_changed, vanished=vanished)

    def after_token_refresh(self, outcome: str) -> None:
        for observer in self.observers:
            observer.after_token_refresh(outcome)

    def after_round_trips(self, count: int) -> None:
        for observer in self.observers:
            observer.after_round_trips(count)


class PhaseTimer:
    """Adds up wall time per phase and tells the observer as each phase ends.

    It also measures the CPU time of the thread running the phase (inside the wall interval,
    so CPU never exceeds wall) and passes it to `after_phase_cpu` before `after_phase`.
    """

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer = observer or Observer()
        self.totals: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        cpu_start = time.thread_time()
        try:
            yield
        finally:
            cpu = time.thread_time() - cpu_start
            self.add(name, time.perf_counter() - start, cpu_seconds=cpu)

    def add(self, name: str, seconds: float, *, cpu_seconds: float | None = None) -> None:
        """Count a phase's wall time, and its CPU time when it was measured."""
        with self._lock:
            self.totals[name] = self.totals.get(name, 0.0) + seconds
        if cpu_seconds is not None:
            self.observer.after_phase_cpu(name, cpu_seconds)
        self.observer.after_phase(name, seconds)


class WatchObserver:
    """What a push watcher reports (no-op hooks); `metrics/` counts it. Called on the watcher's
    event loop (token refreshes: on a connect thread), never with an account, user or folder:
    the provider is one of a fixed set."""

    def idle_connected(self, *, provider: str) -> None:
        """An IDLE connection was established (the gauge of held connections goes up)."""

    def idle_closed(self, *, provider: str) -> None:
        """An IDLE connection ended, for whatever reason (the gauge goes down)."""

    def reconnect(self, *, error_class: str) -> None:
        """A connection was lost or could not be opened and will be tried again."""

    def push_runs(self, *, provider: str, count: int) -> None:
        """`count` fetch runs were enqueued because the server reported new mail."""

    def token_refreshes(self, *, provider: str) -> Observer:
        """Where an OAuth2 login's token refreshes are told (`after_token_refresh`, on a connect
        thread), so they are counted with the workers'."""
        return Observer()
