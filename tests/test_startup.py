"""Start-up: each command loads only what it uses (read from the child's sys.modules, no timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli import accounts, common, diagnose, queue
from cli import sync as cli_sync
from mailpipe import diagnostics, imap, jobs, profiler, providers
from mailpipe import sync as core_sync
from tests.support.dovecot import free_ports

MODULES_MARK = "modules:"
# What no parser needs: the database, the queue, x509 (only diagnosing reads certificates), IMAP
NOT_FOR_PARSERS = ("sqlalchemy", "dramatiq", "redis", "cryptography.x509", "imapclient", "alembic")
# What no one-shot command needs: the queue, the metrics exporter, the web app
NOT_FOR_ONE_SHOT = ("dramatiq", "redis", "prometheus_client", "flask", "periodiq")

CHILD = f"""
import json, sys
from cli.main import build_parser, main
build_parser()
code = main(sys.argv[1:])
print("{MODULES_MARK}" + json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


def loaded(*argv: str, env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """Run the `mailpipe` command line in a fresh Python; its exit code and loaded modules."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    line = next(line for line in done.stderr.splitlines() if line.startswith(MODULES_MARK))
    return done.returncode, set(json.loads(line.removeprefix(MODULES_MARK)))


def among(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("argv", [["--help"], ["sync", "--help"], ["diagnose", "--help"], []])
def test_help_and_building_the_parser_load_no_database_queue_or_x509(argv: list[str]) -> None:
    """Given a fresh Python, when the parser is built and help is asked for, then none of
    SQLAlchemy, Dramatiq, redis, x509, imapclient or Alembic has been imported."""
    code, modules = loaded(*argv)

    assert code in (0, common.EXIT_USAGE)
    assert "cli.sync" in modules  # the parser really was built, every command group with it
    assert among(modules, NOT_FOR_PARSERS) == []
    assert "mailpipe.settings" not in modules  # read only for a command that runs


def test_settings_load_without_the_database() -> None:
    """Given a fresh Python, when the settings are imported and read, then SQLAlchemy is not."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mailpipe.settings import Settings; Settings.from_env({}); "
            "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'imapclient'))))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_one_shot_sync_loads_no_queue_metrics_or_web(tmp_path) -> None:
    """Given a server that refuses the connection, when `mailpipe sync` runs (database,
    owner, account and sync engine all loaded before it connects), then it fails in one line
    and has loaded neither Dramatiq, redis, Prometheus nor Flask."""
    (closed,) = free_ports(1)

    code, modules = loaded(
        "sync",
        "--host",
        "127.0.0.1",
        "--port",
        str(closed),
        "--security",
        "none",
        "--user",
        "someone",
        "--password-env",
        "STARTUP_PASSWORD",
        "--db",
        f"sqlite:///{tmp_path}/mail.db",
        env={"STARTUP_PASSWORD": "pw", "MAILPIPE_OWNER_KEY_DIR": str(tmp_path / "keys")},
    )

    assert code == common.EXIT_FAILURE
    assert "mailpipe.sync" in modules and "sqlalchemy" in modules  # it got as far as syncing
    assert among(modules, NOT_FOR_ONE_SHOT) == []
    assert among(modules, ("cryptography.x509",)) == []


def test_the_parsers_own_copies_of_core_values_match_the_core() -> None:
    """The parsers keep a few core values so as not to load their modules: they must agree."""
    assert common.SECURITY_MODES == imap.SECURITY_MODES
    assert diagnose.STEP_SECONDS == diagnostics.DIAGNOSE_TIMEOUT
    assert queue.MAX_JOB_SECONDS == jobs.MAX_TIMEOUT_SECONDS
    assert cli_sync.BATCH_BYTES == core_sync.BATCH_BYTES
    assert cli_sync.MEMORY_METHODS == profiler.MEMORY_METHODS
    assert cli_sync.RU_MAXRSS == profiler.RU_MAXRSS
    assert accounts.PROVIDERS == providers.PROVIDERS
    assert tuple(sorted(providers.PRESETS)) == accounts.OAUTH2_PROVIDERS
