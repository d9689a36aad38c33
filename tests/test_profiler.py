"""The profiler: wall and CPU time per phase, what bound each, peak memory and mail counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc

import pytest
from sqlalchemy import select

from mailpipe import db
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun
from mailpipe.observer import PHASES, Observer, Observers, PhaseTimer
from mailpipe.profiler import (
    CPU_BOUND,
    IO_BOUND,
    MIXED,
    RU_MAXRSS,
    TRACEMALLOC,
    PhaseFigures,
    Profiler,
    bound,
)
from mailpipe.sync import sync_account
from tests.support.messages import plain_message as message

FAST_KDF = 1_000
# processing belongs to the job, not to the sync; a first sync has no stored flags to bring in step
SYNC_PHASES = set(PHASES) - {"process", "flags"}
BIG_BODY = 256 * 1024


def assert_sane(profile: dict) -> None:
    """Every phase: wall >= CPU >= 0, a ratio that matches them, a named bound."""
    for name, phase in profile["phases"].items():
        assert phase["wall_seconds"] >= phase["cpu_seconds"] >= 0, name
        assert phase["bound"] in (IO_BOUND, MIXED, CPU_BOUND), name
        assert phase["bound"] == bound(phase["cpu_ratio"]), name
        assert phase["calls"] >= 1, name


@pytest.fixture
def account(dovecot, imap_user, tmp_path):
    login, password = imap_user
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = ImapSettings(
        host=dovecot.host, port=dovecot.port, username=login, password=password, security="none"
    )
    with sessions.begin() as session:
        user, key = create_user(session, "alice", "pw", iterations=FAST_KDF)
        account_id = add_account(session, user, key, settings).id
    try:
        yield sessions, account_id, key, settings
    finally:
        engine.dispose()


@pytest.mark.parametrize("memory", [RU_MAXRSS, TRACEMALLOC])
def test_a_synced_account_has_every_phase_with_wall_cpu_bound_memory_and_counts(
    dovecot, account, memory
):
    # Given a mailbox with four large messages
    sessions, account_id, key, settings = account
    dovecot.append(
        settings.username, settings.password, [message(i, size=BIG_BODY) for i in range(4)]
    )
    # When it is synced under the profiler
    with Profiler(memory=memory) as profiler:
        result = sync_account(
            sessions, account_id=account_id, key=key, settings=settings, observer=profiler
        )
    profile = profiler.to_json()
    # Then every phase of the sync is there, in pipeline order, with sane figures
    assert set(profile["phases"]) == SYNC_PHASES
    assert list(profile["phases"]) == [p for p in PHASES if p in SYNC_PHASES]
    assert_sane(profile)
    assert profile["phases"]["fetch"]["calls"] >= 2  # EXAMINE, sizes, bodies
    # And the run's totals and mail counts agree with the sync's own
    assert profile["wall_seconds"] >= max(p["wall_seconds"] for p in profile["phases"].values())
    cpu = sum(p["cpu_seconds"] for p in profile["phases"].values())
    assert profile["cpu_seconds"] == pytest.approx(cpu, abs=1e-5)
    mail = profile["mail"]
    assert (
        (mail["fetched"], mail["saved"], mail["duplicates"])
        == (4, 4, 0)
        == (
            result.fetched,
            result.saved,
            result.duplicates,
        )
    )
    assert mail["fetched_bytes"] > 4 * BIG_BODY and mail["batches"] >= 1
    # And peak memory is measured the way it says
    assert profile["memory"]["method"] == memory
    assert profile["memory"]["peak_bytes"] >= 0
    if memory == TRACEMALLOC:  # a batch's bodies were all in Python memory at once
        assert profile["memory"]["peak_bytes"] > 4 * BIG_BODY
        assert not tracemalloc.is_tracing()  # and tracing stopped with the profile


def test_waiting_reads_as_io_bound_and_computing_as_not():
    # Given a phase that sleeps and one that computes, timed as the sync times its phases
    profiler = Profiler()
    timer = PhaseTimer(Observers(Observer(), profiler))
    with profiler:
        with timer.phase("fetch"):
            time.sleep(0.05)
        with timer.phase("parse"):
            deadline = time.thread_time() + 0.05
            while time.thread_time() < deadline:
                pass
    phases = profiler.to_json()["phases"]
    # Then the sleep is I/O bound and the computation used its thread's CPU
    assert phases["fetch"]["bound"] == IO_BOUND
    assert phases["parse"]["cpu_seconds"] >= 0.05
    assert phases["parse"]["cpu_ratio"] > phases["fetch"]["cpu_ratio"]
    assert_sane(profiler.to_json())


@pytest.mark.parametrize(
    ("ratio", "expected"), [(0.0, IO_BOUND), (0.29, IO_BOUND), (0.5, MIXED), (0.7, CPU_BOUND)]
)
def test_bound_from_the_cpu_wall_ratio(ratio, expected):
    assert bound(ratio) == expected


def test_a_phase_at_a_threshold_names_the_bound_of_the_ratio_it_reports():
    # Given a phase whose CPU/wall ratio rounds up onto the I/O-bound threshold
    figures = PhaseFigures(wall=1.0, cpu=0.29996)
    # When it is reported
    report = figures.to_json()
    # Then the bound is the one its reported ratio names (no flip between the two)
    assert report["cpu_ratio"] == 0.3
    assert report["bound"] == bound(report["cpu_ratio"]) == MIXED


def test_a_job_keeps_each_account_runs_profile(world):
    # Given a user with an account holding three messages, and one with a wrong password
    alice = world.user("alice")
    good = world.account(alice, mails=3)
    bad = world.account(alice, password="wrong")
    # When a job fetches both
    status = world.run(alice)
    # Then each account run keeps its profile
    with world.sessions() as session:
        runs = {
            run.account_id: run
            for run in session.scalars(
                select(AccountRun).where(AccountRun.job_id == status["job_id"])
            )
        }
    profile = runs[good].profile
    assert {"connect", "fetch", "parse", "save", "disconnect"} <= set(profile["phases"])
    assert_sane(profile)
    assert profile["mail"]["saved"] == 3
    assert profile["memory"]["method"] == RU_MAXRSS and profile["memory"]["peak_bytes"] >= 0
    # And the profile of the failed run shows how far it got
    assert set(runs[bad].profile["phases"]) == {"connect"}
    assert runs[bad].profile["mail"]["fetched"] == 0


def test_mailpipe_profile_prints_the_profile_of_a_full_sync(dovecot, imap_user, tmp_path):
    # Given a mailbox with two messages
    login, password = imap_user
    dovecot.append(login, password, [message(1), message(2)])
    args = [sys.executable, "-m", "cli", "profile", "--host", dovecot.host]
    args += ["--port", str(dovecot.port), "--security", "none", "--user", login]
    args += ["--password-env", "IMAP_PASSWORD"]
    env = {**os.environ, "IMAP_PASSWORD": password, "MAILPIPE_DATA_DIR": str(tmp_path)}

    def profile(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*args, *extra], env=env, capture_output=True, text=True, timeout=120, check=True
        )

    # When it is profiled twice, as JSON and for people, in batches of one message (so the
    # store process works)
    first = json.loads(profile("--json", "--batch-bytes", "1").stdout)
    second = profile("--batch-bytes", "1")
    # Then each run synced the whole mailbox into its own new database
    assert first["saved"] == 2 and first["profile"]["mail"]["fetched"] == 2
    assert set(first["profile"]["phases"]) == SYNC_PHASES
    assert_sane(first["profile"])
    assert "saved 2" in second.stdout
    assert "peak memory" in second.stdout and "(ru_maxrss)" in second.stdout
    # And the store process's peak memory is told beside the fetching process's
    assert first["profile"]["memory"]["store_process_peak_bytes"] > 2**20
    assert "store process" in second.stdout
    assert [line.split()[0] for line in second.stdout.splitlines()[3:10]] == [
        p for p in PHASES if p in SYNC_PHASES
    ]
    assert not list(tmp_path.iterdir())  # nothing left behind in the data directory
