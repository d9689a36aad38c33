"""`mailpipe demo --once`: the whole system on embedded defaults, with no services."""

import os
import subprocess
import sys


def test_demo_round_behaves_as_designed(tmp_path):
    """anna fetched, ben BROKEN and notified, clara retried over her flaky link and recovered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo behaved as designed" in result.stdout
    assert (
        "BROKEN" in result.stdout and "login failed, please re-enter the password" in result.stdout
    )
    assert (tmp_path / "data" / "demo.db").exists()
    assert "Traceback" not in result.stderr
