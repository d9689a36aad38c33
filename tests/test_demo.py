"""`make demo` runs `mailpipe demo`: the whole pipeline on embedded defaults, no services."""

import os
import subprocess
import sys


def test_demo_runs_two_rounds_as_designed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    result = subprocess.run(
        [sys.executable, "-m", "mailpipe", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo behaved as designed" in result.stdout
    assert "saved 1, quarantined 0" in result.stdout  # round 2 took only the new message
    assert (tmp_path / "data" / "demo.db").exists()
    assert "Traceback" not in result.stderr
