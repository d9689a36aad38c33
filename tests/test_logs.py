"""Structured logs: one event per job enqueued, started and finished and per account-run attempt.

The unit tests hold the JSON form; the worker test runs real `dramatiq` worker processes with
MAILPIPE_LOG_FORMAT=json over a healthy, a wrong-password and a refused account, and reads what
they wrote: the events, their fields, and no secret, mail text, address or login anywhere.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpipe import logs
from mailpipe.accounts import add_account, create_user
from mailpipe.imap import ImapSettings
from mailpipe.settings import Settings, SettingsError
from tests.support.cluster import running_cluster
from tests.support.dovecot import free_ports

FAST_KDF = 1_000
README = Path(__file__).resolve().parents[1] / "README.md"
JQ = shutil.which("jq")
ADDRESS = "canary.sender@example.org"
SUBJECT_WORD = "Kanarienvogel"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The events logger writing JSON into a buffer, as `configure("json")` makes handlers do."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    logs.logger.addHandler(handler)
    level = logs.logger.level
    logs.logger.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        logs.logger.removeHandler(handler)
        logs.logger.setLevel(level)


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_an_event_is_one_json_line_with_its_fields_and_an_instant_with_offset(json_lines):
    # When an account-run event is logged
    logs.account_run(
        job_id="j1",
        account_id=7,
        attempt=2,
        status="failed",
        provider="gmx",
        error_class="timeout",
        duration_seconds=1.23456789,
        phases={"connect": 0.5},
        counts={"fetched": 0},
    )

    # Then it is one JSON object whose fields stand at the top level
    [line] = json_lines.getvalue().splitlines()
    event = json.loads(line)
    assert event["time"].endswith("+00:00")
    assert {k: v for k, v in event.items() if k != "time"} == {
        "level": "info",
        "logger": "mailpipe.events",
        "event": "account_run",
        "job_id": "j1",
        "account_id": 7,
        "attempt": 2,
        "status": "failed",
        "provider": "gmx",
        "error_class": "timeout",
        "duration_seconds": 1.234568,
        "phases": {"connect": 0.5},
        "fetched": 0,
    }


def test_an_ordinary_record_keeps_its_message_and_traceback():
    # Given a record with an exception, formatted as JSON
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info()
        )
    line = json.loads(logs.JsonFormatter().format(record))

    # Then its message and traceback are fields
    assert line["message"] == "failed here"
    assert "ValueError: boom" in line["exception"]
    assert "event" not in line


def test_configure_json_reformats_the_handlers_a_cli_installed_and_text_keeps_them():
    # Given the root logger with a handler someone else installed (as the dramatiq CLI does)
    root = logging.getLogger()
    buffer = io.StringIO()
    installed = logging.StreamHandler(buffer)
    installed.setFormatter(logging.Formatter("%(levelname)s| %(message)s"))
    saved = {handler: handler.formatter for handler in root.handlers}
    root.addHandler(installed)
    try:
        # When text is configured, then its format stays
        logs.configure("text")
        assert installed.formatter is not None
        assert installed.formatter._fmt == "%(levelname)s| %(message)s"
        # When json is configured, then every record it writes is a JSON line
        logs.configure("json")
        logging.getLogger("elsewhere").warning("disk %s", "full")
        assert json.loads(buffer.getvalue())["message"] == "disk full"
        # And a format mailpipe does not know is refused
        with pytest.raises(ValueError, match="text, json"):
            logs.configure("xml")
    finally:
        root.removeHandler(installed)
        for handler, formatter in saved.items():
            handler.setFormatter(formatter)


def test_text_is_the_default_and_another_format_is_one_line_naming_the_variable():
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"MAILPIPE_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"MAILPIPE_LOG_FORMAT": "xml"})
    assert str(raised.value) == "MAILPIPE_LOG_FORMAT must be one of text, json, not 'xml'"


def canary(i: int) -> bytes:
    return (
        f"From: Kanari <{ADDRESS}>\r\nTo: {ADDRESS}\r\nSubject: {SUBJECT_WORD} {i}\r\n"
        f"Message-ID: <canary{i}@example.org>\r\n\r\n{SUBJECT_WORD} body {i}\r\n"
    ).encode()


def test_workers_log_each_job_and_attempt_as_json_without_a_secret(dovecot, tmp_path, json_lines):
    # Given real workers logging JSON, and three accounts: good, wrong password, refused
    good, good_password = dovecot.new_user()
    bad, bad_password = dovecot.new_user()
    dovecot.append(good, good_password, [canary(i) for i in range(3)])
    [refused_port] = free_ports(1)
    extra = {"MAILPIPE_LOG_FORMAT": "json", "MAILPIPE_MAX_RETRIES": "1"}
    with running_cluster(dovecot, tmp_path, extra_env=extra) as cluster:
        with cluster.sessions.begin() as session:
            user, key = create_user(session, "canary-owner", "pw", iterations=FAST_KDF)
            user_id = user.id
            ids = {}
            for name, login, password, port in (
                ("good", good, good_password, dovecot.port),
                ("bad", bad, "wrong-" + bad_password, dovecot.port),
                ("refused", good, good_password, refused_port),
            ):
                imap = ImapSettings(
                    host=dovecot.host, port=port, username=login, password=password, security="none"
                )
                ids[name] = add_account(session, user, key, imap, provider="gmx").id

        # When a job for all three runs to its end
        job_id = cluster.pipeline.enqueue_fetch_job(user_id, key=key, timeout_seconds=30)
        job = cluster.wait(job_id, user_id)
        cluster.workers.stop()
        worker_log = cluster.workers.log()

    # Then the enqueuing process logged the job once
    [enqueued] = [e for e in events(json_lines.getvalue()) if e["event"] == "job_enqueued"]
    assert enqueued == {
        **enqueued,
        "job_id": job_id,
        "user_id": user_id,
        "job_type": "all",
        "accounts": 3,
    }
    # And the workers logged its start once, each attempt, and its end once
    logged = [e for e in events(worker_log) if e.get("job_id") == job_id]
    assert [e["event"] for e in logged].count("job_started") == 1
    [finished] = [e for e in logged if e["event"] == "job_finished"]
    assert job["status"] == "partial_failure"
    assert finished == {
        **finished,
        "status": "partial_failure",
        "job_type": "all",
        "accounts": 3,
        "succeeded": 1,
        "failed": 2,
        "skipped": 0,
        "emails_fetched": 3,
    }
    runs = {(e["account_id"], e["attempt"]): e for e in logged if e["event"] == "account_run"}
    assert sorted(runs) == sorted(
        [(ids["good"], 1), (ids["bad"], 1), (ids["refused"], 1), (ids["refused"], 2)]
    )
    success = runs[ids["good"], 1]
    assert (success["status"], success["fetched"], success["saved"]) == ("success", 3, 3)
    assert {"connect", "folder_list", "fetch", "parse", "save"} <= set(success["phases"])
    assert runs[ids["bad"], 1]["status"] == "failed"
    assert runs[ids["bad"], 1]["error_class"] in ("auth_failed", "invalid_credentials")
    assert [runs[ids["refused"], n]["status"] for n in (1, 2)] == ["retrying", "failed"]
    assert {runs[ids["refused"], n]["error_class"] for n in (1, 2)} == {"temporarily_unavailable"}
    assert all(event["time"].endswith("+00:00") for event in logged)
    assert {run["provider"] for run in runs.values()} == {"gmx"}
    # And nothing of the credentials, the addresses or the mail reached the log
    everything = worker_log + json_lines.getvalue()
    for word in (good, bad, good_password, bad_password, ADDRESS, SUBJECT_WORD, "canary-owner"):
        assert word not in everything, word

    # And README's jq examples read this very log (text lines of the dramatiq CLI included)
    if JQ is None:
        pytest.skip("jq is missing: `make test` installs the Debian package jq")
    log_file = tmp_path / "worker.log"
    log_file.write_text(worker_log)
    failed, slowest, by_status = (run_jq(example, log_file) for example in readme_jq_examples())
    assert sorted(
        (e["account_id"], e["attempt"], e["status"]) for e in map(json.loads, failed.splitlines())
    ) == sorted(
        [(ids["bad"], 1, "failed"), (ids["refused"], 1, "retrying"), (ids["refused"], 2, "failed")]
    )
    assert [e["account_id"] for e in json.loads(slowest)] == [ids["good"]]
    assert json.loads(by_status) == [{"status": "partial_failure", "jobs": 1}]


def readme_jq_examples() -> list[str]:
    """The jq commands of README's "Structured logs" example, each joined into one line."""
    section = README.read_text().split("### Structured logs", 1)[1].split("\n### ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands: list[str] = []
    for line in block.splitlines():
        if line.startswith("jq "):
            commands.append(line)
        elif line.startswith(" ") and commands:
            commands[-1] += "\n" + line
    return commands


def run_jq(example: str, log_file: Path) -> str:
    assert example.endswith(" worker.log"), example
    command = example.removesuffix("worker.log") + shlex.quote(str(log_file))
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_mailpipe_web_logs_json_lines_when_asked(tmp_path):
    # Given `mailpipe web` started with MAILPIPE_LOG_FORMAT=json on the embedded defaults
    [port] = free_ports(1)
    env = {
        **os.environ,
        "MAILPIPE_LOG_FORMAT": "json",
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_BROKER_URL": "stub",
    }
    env.pop("MAILPIPE_DATABASE_URL", None)
    log = tmp_path / "web.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "web", "--port", str(port)],
            cwd=README.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # When a page is asked for
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as page:
                    assert page.status == 200
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=15)

    # Then every line it logged is a JSON object, the request among them
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("GET /login" in r.get("message", "") for r in records), lines
    assert all(r["time"].endswith("+00:00") for r in records)
