"""Real Dramatiq worker processes on the real Redis, in a namespace of their own."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import redis

REDIS_URL = os.environ.get("MAILPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STOP_SECONDS = 15
ROOT = Path(__file__).resolve().parents[2]


def new_namespace() -> str:
    """A Redis key prefix no other test run or service uses."""
    return f"mailpipe-test-{os.getpid()}-{secrets.token_hex(4)}"


def delete_namespace(namespace: str, url: str = REDIS_URL) -> int:
    """Remove every key this run created (and only those: they all carry its namespace)."""
    client = redis.Redis.from_url(url)
    removed = 0
    for key in client.scan_iter(match=f"{namespace}*", count=1000):
        removed += client.delete(key)
    client.close()
    return removed


def tool(name: str) -> str:
    """A console script of the interpreter running the tests (the project's venv)."""
    return str(Path(sys.executable).with_name(name))


class Workers:
    """`dramatiq broker_config actors` as a child process group, stopped and reaped at the end."""

    def __init__(self, env: dict[str, str], *, processes: int = 2, threads: int = 4) -> None:
        self.env = env
        self.processes = processes
        self.threads = threads
        self.process: subprocess.Popen | None = None
        self.log_path = Path(env["MAILPIPE_DATA_DIR"]) / f"workers-{secrets.token_hex(2)}.log"

    def start(self) -> Workers:
        command = [
            tool("dramatiq"),
            "broker_config",
            "actors",
            "--processes",
            str(self.processes),
            "--threads",
            str(self.threads),
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        self.process = subprocess.Popen(
            command,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def children(self) -> list[int]:
        """PIDs of the worker processes the dramatiq master forked."""
        if self.process is None:
            return []
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
