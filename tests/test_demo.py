"""`make demo` (`python -m demo --once`): the whole system on embedded defaults, no services."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The demo as `make demo` runs it: from the checkout, since the demo is not installed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "demo", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_round_behaves_as_designed(tmp_path):
    """anna fetched, ben BROKEN and notified, clara retried over her flaky link and recovered."""
    result = demo("--once", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo behaved as designed" in result.stdout
    assert (
        "BROKEN" in result.stdout and "login failed, please re-enter the password" in result.stdout
    )
    assert (tmp_path / "data" / "demo.db").exists()
    assert "Traceback" not in result.stderr


def test_a_wrong_setting_is_one_line(tmp_path):
    # Given a setting the demo cannot use
    # When the demo starts, Then it says so in one line naming the variable, and exits non-zero
    result = demo("--once", cwd=tmp_path, MAILPIPE_MAX_RETRIES="many")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "demo: MAILPIPE_MAX_RETRIES must be a whole number, not 'many'"
    ]


def test_without_the_demo_extra_it_says_what_to_install(tmp_path):
    # Given an environment where pymap (the `demo` extra) cannot be imported
    shadow = tmp_path / "shadow" / "pymap"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pymap'\", name='pymap')\n"
    )
    # When the demo starts
    result = demo(cwd=tmp_path, PYTHONPATH=f"{tmp_path / 'shadow'}{os.pathsep}{ROOT}")
    # Then it names the missing package and how to install it, in one line
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "demo: pymap is not installed: pip install -e '.[demo]' from the checkout (make demo does)"
    ]


def mailpipe_demo(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`mailpipe demo` as a user runs it: the installed command finds the checkout's demo."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    clean.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", "demo", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_three_rounds_behave_as_designed_also_once_bens_circuit_opens(tmp_path):
    # Given a circuit that opens after two failures, so ben's third run is skipped
    # When `mailpipe demo --rounds 3` runs
    result = mailpipe_demo("--rounds", "3", cwd=tmp_path, MAILPIPE_CIRCUIT_FAILURES="2")
    # Then every round behaved as designed: clara's link broke and a retry recovered it in
    # each round, including the no-change re-syncs, and the round with ben skipped is a
    # partial failure, not "success"
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("demo behaved as designed") == 3
    assert "3 of 3 rounds behaved as designed" in result.stdout
    assert result.stdout.count("clara  ok") == 3
    assert "ben    skipped" in result.stdout
    assert "partial_failure (some_skipped)" in result.stdout
    assert "1 mails" not in result.stdout
    # And nothing but the demo's own lines reached the terminal
    assert "Traceback" not in result.stderr
    assert "was skipped" not in result.stdout + result.stderr


def test_a_round_that_misbehaves_says_which_check_failed(tmp_path):
    # Given no retries at all, so clara's broken first attempt is her last
    # When one round runs
    result = mailpipe_demo("--rounds", "1", cwd=tmp_path, MAILPIPE_MAX_RETRIES="0")
    # Then the round says that clara's run failed, and the demo exits 1
    assert result.returncode == 1
    [verdict] = [line for line in result.stdout.splitlines() if "NOT behave" in line]
    assert "clara's run failed (connection_reset), expected success" in verdict


def test_a_closed_output_is_one_line_not_a_traceback(tmp_path):
    # Given an output whose reader has gone (`| head -c 0`)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        # When `mailpipe demo --rounds 1` writes its rounds to it
        done = subprocess.run(
            [sys.executable, "-m", "cli", "demo", "--rounds", "1"],
            cwd=tmp_path,
            env=clean,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    # Then the demo says so in one line and exits non-zero
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "demo: the output could not be written: its reader closed it"
    ]
