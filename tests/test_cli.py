"""`mailpipe sync` as an operator runs it: one JSON object, or one line naming what went wrong."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.support.messages import plain_message as message

JSON_KEYS = {
    "fetched",
    "saved",
    "duplicates",
    "quarantined",
    "flags_changed",
    "vanished",
    "folders",
    "phases",
    "duration",
    "round_trips",
}


def mailpipe(*args: str, password: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMAP_PASSWORD": password}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def sync_args(dovecot, user: str, db: str, *extra: str, port: int | None = None) -> list[str]:
    return [
        "sync",
        "--host",
        dovecot.host,
        "--port",
        str(port or dovecot.port),
        "--user",
        user,
        "--password-env",
        "IMAP_PASSWORD",
        "--security",
        "none",
        "--db",
        db,
        *extra,
    ]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_json_summary_then_unchanged_resync(dovecot, imap_user, tmp_path):
    user, password = imap_user
    dovecot.append(user, password, [message(i) for i in range(3)])
    db = f"sqlite:///{tmp_path / 'm.db'}"
    first = mailpipe(*sync_args(dovecot, user, db, "--json"), password=password)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert set(report) == JSON_KEYS
    assert (report["fetched"], report["saved"], report["duplicates"]) == (3, 3, 0)
    assert {"connect", "fetch", "parse", "save", "disconnect"} <= set(report["phases"])
    again = json.loads(mailpipe(*sync_args(dovecot, user, db, "--json"), password=password).stdout)
    assert again["fetched"] == 0
    assert again["folders"][0]["unchanged"] is True


def test_human_summary(dovecot, imap_user, tmp_path):
    user, password = imap_user
    dovecot.append(user, password, [message(1)])
    result = mailpipe(
        *sync_args(dovecot, user, f"sqlite:///{tmp_path / 'm.db'}"), password=password
    )
    assert result.returncode == 0
    assert "saved 1" in result.stdout
    assert "phases:" in result.stdout


def test_bad_password_is_one_line(dovecot, imap_user, tmp_path):
    user, _password = imap_user
    db = f"sqlite:///{tmp_path / 'm.db'}"
    result = mailpipe(*sync_args(dovecot, user, db), password="not-the-password")
    assert_one_line_error(result, "invalid_credentials", "wrong user name or password")
    assert "not-the-password" not in result.stderr


def test_unreachable_host_is_one_line(dovecot, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'm.db'}"
    result = mailpipe(*sync_args(dovecot, "nobody", db, port=closed_port), password="x")
    assert_one_line_error(result, "temporarily_unavailable", "refused")


def test_untrusted_certificate_is_one_line(dovecot, imap_user, tmp_path):
    user, password = imap_user
    args = sync_args(dovecot, user, f"sqlite:///{tmp_path / 'm.db'}", port=dovecot.tls_port)
    args[args.index("none")] = "tls"  # system CAs only: the test CA is not trusted
    result = mailpipe(*args, password=password)
    assert_one_line_error(result, "tls_error", "not trusted")


def test_trusted_certificate_via_ca_file(dovecot, imap_user, tmp_path):
    user, password = imap_user
    dovecot.append(user, password, [message(1)])
    args = sync_args(dovecot, user, f"sqlite:///{tmp_path / 'm.db'}", port=dovecot.tls_port)
    args[args.index("none")] = "tls"
    result = mailpipe(*args, "--ca-file", str(dovecot.ca_file), "--json", password=password)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["saved"] == 1


def test_missing_password_variable_is_one_line(dovecot, tmp_path):
    args = sync_args(dovecot, "x", f"sqlite:///{tmp_path / 'm.db'}")
    args[args.index("IMAP_PASSWORD")] = "MAILPIPE_TEST_UNSET_VARIABLE"
    result = mailpipe(*args, password="x")
    assert_one_line_error(result, "MAILPIPE_TEST_UNSET_VARIABLE")


def count_rows(path) -> tuple[int, int]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*), count(DISTINCT uid) FROM emails").fetchone()
    except sqlite3.OperationalError:
        return (0, 0)


@pytest.mark.parametrize("kills", [2])
def test_sigkill_mid_sync_then_rerun_stores_each_message_once(dovecot, imap_user, tmp_path, kills):
    # Given a mailbox big enough to take many small batches
    user, password = imap_user
    total = 1_500
    dovecot.seed_maildir(user, total)
    path = tmp_path / "m.db"
    args = sync_args(dovecot, user, f"sqlite:///{path}", "--batch-bytes", "100000")
    env = {**os.environ, "IMAP_PASSWORD": password}
    # When the sync is killed with SIGKILL after it has committed some batches, several times
    for _ in range(kills):
        before = count_rows(path)[0]
        process = subprocess.Popen([sys.executable, "-m", "cli", *args], env=env)
        deadline = time.monotonic() + 60
        while count_rows(path)[0] <= before and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert count_rows(path)[0] < total, "the sync finished before it could be killed"
    # And run to the end
    result = mailpipe(*args, "--json", password=password)
    # Then every message is stored exactly once
    assert result.returncode == 0, result.stderr
    assert count_rows(path) == (total, total)


def test_start_up_leaves_the_collector_on_and_what_it_loaded_frozen():
    import gc

    from cli.common import start_up

    # Given the collector on, and nothing frozen
    gc.unfreeze()
    try:
        # When a command starts up, and its start fails
        with pytest.raises(RuntimeError), start_up():
            assert not gc.isenabled()  # no collections while loading
            loaded = [object() for _ in range(10)]
            raise RuntimeError("a wrong password")
        # Then the collector is on again (a long `watch` must not run without it), and what
        # start-up made is out of later collections' sight
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(loaded)
    finally:
        gc.unfreeze()
        gc.enable()
