"""Where an account run's time goes: wall and CPU per phase, peak memory, mail counts.

A `Profiler` is an `Observer`, so it rides along with the metrics observer at no extra round
trip. CPU time is the CPU of the thread that ran the phase (the sync parses and saves in its
storage thread, or for the one-shot command in its store process, which reports its phases
back), so a phase's CPU/wall ratio says whether it waited (I/O, or the GIL held by the other
thread) or computed. Work a phase hands to native threads of their own (fast-mail-parser's
`parse_many`) is not in its CPU time, so such a phase can look I/O bound.
Memory is measured one of two ways, named in the output:
`ru_maxrss` (the process's resident high-water mark, how far this run raised it; cheap, so every
account run keeps it, but shared with whatever else the process runs at the time, and without
the one-shot command's store process, which `mailpipe profile` adds from `children_peak_bytes`) or
`tracemalloc` (the peak of Python's own allocations during the run, without native buffers;
exact, but it slows Python down, so only `mailpipe profile` offers it).
"""

from __future__ import annotations

import resource
import threading
import time
import tracemalloc
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .observer import PHASES, Observer

RU_MAXRSS = "ru_maxrss"
TRACEMALLOC = "tracemalloc"
MEMORY_METHODS = (RU_MAXRSS, TRACEMALLOC)
RU_MAXRSS_UNIT = 1024  # Linux reports ru_maxrss in KiB
IO_BOUND = "io"
CPU_BOUND = "cpu"
MIXED = "mixed"
IO_BOUND_BELOW = 0.3  # CPU/wall under this: the phase mostly waited
CPU_BOUND_FROM = 0.7  # CPU/wall from this on: the phase mostly computed
MAIL_COUNTS = (
    "batches",
    "fetched",
    "fetched_bytes",
    "saved",
    "duplicates",
    "quarantined",
    "flags_changed",
    "vanished",
)


@dataclass
class PhaseFigures:
    """Wall and CPU seconds of one phase, summed over every time it ran in the run."""

    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0

    def to_json(self) -> dict[str, float | str]:
        # the bound is named from the ratio as reported, so a reader of the JSON agrees with it
        ratio = round(self.cpu / self.wall, 3) if self.wall > 0 else 0.0
        return {
            "wall_seconds": round(self.wall, 6),
            "cpu_seconds": round(self.cpu, 6),
            "cpu_ratio": ratio,
            "bound": bound(ratio),
            "calls": self.calls,
        }


def bound(cpu_ratio: float) -> str:
    """Name what held a phase up, from its CPU/wall ratio."""
    if cpu_ratio >= CPU_BOUND_FROM:
        return CPU_BOUND
    if cpu_ratio < IO_BOUND_BELOW:
        return IO_BOUND
    return MIXED


class Profiler(Observer):
    """Collects one run's profile; use it as a context manager around the run.

    Hooks may come from the sync's storage thread and its fetching thread at once.
    """

    def __init__(self, *, memory: str = RU_MAXRSS) -> None:
        if memory not in MEMORY_METHODS:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_METHODS)}")
        self.memory = memory
        self.phases: dict[str, PhaseFigures] = {}
        self.mail = dict.fromkeys(MAIL_COUNTS, 0)
        self.wall = 0.0
        self.peak_bytes: int | None = None
        self.round_trips = 0
        self.provider = "other"  # the account's, told as the run begins
        self._lock = threading.Lock()
        self._started = 0.0
        self._rss_before = 0
        self._tracing_before = False

    def __enter__(self) -> Profiler:
        if self.memory == TRACEMALLOC:
            self._tracing_before = tracemalloc.is_tracing()
            if not self._tracing_before:
                tracemalloc.start()
            tracemalloc.reset_peak()
        else:
            self._rss_before = _max_rss()
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall = time.perf_counter() - self._started
        if self.memory == TRACEMALLOC:
            _current, self.peak_bytes = tracemalloc.get_traced_memory()
            if not self._tracing_before:
                tracemalloc.stop()
        else:
            self.peak_bytes = _max_rss() - self._rss_before

    def before_run(self, *, provider: str) -> None:
        self.provider = provider

    def after_phase_cpu(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.phases.setdefault(phase, PhaseFigures()).cpu += seconds

    def after_phase(self, phase: str, seconds: float) -> None:
        with self._lock:
            figures = self.phases.setdefault(phase, PhaseFigures())
            figures.wall += seconds
            figures.calls += 1

    def after_batch(
        self,
        *,
        fetched: int,
        fetched_bytes: int,
        saved: int,
        duplicates: int,
        quarantined: Mapping[str, int],
    ) -> None:
        with self._lock:
            self.mail["batches"] += 1
            self.mail["fetched"] += fetched
            self.mail["fetched_bytes"] += fetched_bytes
            self.mail["saved"] += saved
            self.mail["duplicates"] += duplicates
            self.mail["quarantined"] += sum(quarantined.values())

    def after_state_sync(self, *, flags_changed: int, vanished: int) -> None:
        with self._lock:
            self.mail["flags_changed"] += flags_changed
            self.mail["vanished"] += vanished

    def after_round_trips(self, count: int) -> None:
        self.round_trips = count

    def to_json(self) -> dict[str, Any]:
        """Phases in pipeline order, then totals; plain numbers only, fit for a JSON column."""
        with self._lock:
            order = [p for p in PHASES if p in self.phases] + sorted(
                p for p in self.phases if p not in PHASES
            )
            phases = {name: self.phases[name].to_json() for name in order}
            cpu = sum(figures.cpu for figures in self.phases.values())
            return {
                "phases": phases,
                "wall_seconds": round(self.wall, 6),
                "cpu_seconds": round(cpu, 6),
                "memory": {"method": self.memory, "peak_bytes": self.peak_bytes},
                "mail": dict(self.mail),
                "round_trips": self.round_trips,
            }


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT


def children_peak_bytes() -> int:
    """The resident high-water mark of the largest child this process has waited for (the
    one-shot command's store processes; 0 if none): the peak `ru_maxrss` leaves out."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RU_MAXRSS_UNIT
