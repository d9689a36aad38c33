"""A bad command line, or an output that cannot be written, is one line and a non-zero exit.

Each command line here used to be accepted (and fail later, or store a value nothing could use)
or end in a traceback; each is checked before anything runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli.demo
from cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EXIT_USAGE = 2
PASSWORD_ENV = "MAILPIPE_TEST_PASSWORD"
SYNC = ["sync", "--host", "127.0.0.1", "--user", "u", "--password-env", PASSWORD_ENV]
ADD = ["account", "add", "--user", "demo", "--host", "127.0.0.1", "--login", "u"]

# the command line -> the option its one line must name
BAD_LINES = {
    "port -5": ([*SYNC, "--port", "-5"], "--port"),
    "port 70000": ([*SYNC, "--port", "70000"], "--port"),
    "interval -1": ([*ADD, "--interval", "-1"], "--interval"),
    "empty host": (["sync", "--host", "", "--user", "u", "--password-env", "X"], "--host"),
    "empty login": ([*ADD[:-1], ""], "--login"),
    "empty user name": (["user", "add", " "], "name"),
    "hours -1": (["user", "grant", "demo", "--hours", "-1"], "--hours"),
    "hours 1e12": (["user", "grant", "demo", "--hours", "1e12"], "--hours"),
    "hours nan": (["user", "grant", "demo", "--hours", "nan"], "--hours"),
    "account id too big": (
        ["fetch", "--user", "demo", "--account", "999999999999999999999"],
        "--account",
    ),
    "limit -1": (["jobs", "--user", "demo", "--limit", "-1"], "--limit"),
    "timeout nan": ([*SYNC, "--timeout", "nan"], "--timeout"),
    "diagnose port 0": (["diagnose", "--host", "h", "--user", "u", "--port", "0"], "--port"),
    "web port 70000": (["web", "--port", "70000"], "--port"),
    "demo rounds 0": (["demo", "--rounds", "0"], "--rounds"),
    "unknown option": (["jobs", "--user", "demo", "--color"], "--color"),
    "alerts limit 0": (["alerts", "--limit", "0"], "--limit"),
    "web workers 0": (["web", "--workers", "0"], "--workers"),
    "push account x": (["account", "push", "x", "on", "--user", "demo"], "account_id"),
    "watcher port 70000": (["watcher", "--metrics-port", "70000"], "--metrics-port"),
}


def mailpipe(*args: str, tmp_path: Path, stdout=subprocess.PIPE, stdin=None):
    """`mailpipe ...` in a process of its own, on a database in tmp_path; stderr captured."""
    env = {**os.environ, "MAILPIPE_DATA_DIR": str(tmp_path), PASSWORD_ENV: "pw"}
    env.pop("MAILPIPE_DEBUG", None)
    env.pop("MAILPIPE_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        cwd=ROOT,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_command_line_is_one_line_naming_the_option(name, tmp_path):
    args, option = BAD_LINES[name]
    # Given a command line with one bad value, When mailpipe runs it
    done = mailpipe(*args, tmp_path=tmp_path)
    # Then it ends with exit 2 and one line naming the option, before touching any database
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("mailpipe")
    assert option in line
    assert done.stdout == ""
    assert not (tmp_path / "mailpipe.db").exists()


@pytest.fixture
def user_demo(tmp_path) -> Path:
    """A user `demo` in the default database of tmp_path."""
    made = mailpipe("user", "add", "demo", "--password-env", PASSWORD_ENV, tmp_path=tmp_path)
    assert made.returncode == 0, made.stderr
    return tmp_path


def test_a_closed_output_is_one_line_not_a_traceback(user_demo):
    # Given an output whose reader has gone (`| head -c 0`)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        # When `health --json` and `--help` write to it
        health = mailpipe("health", "--user", "demo", "--json", tmp_path=user_demo, stdout=writer)
        helped = mailpipe("--help", tmp_path=user_demo, stdout=writer)
    finally:
        os.close(writer)
    # Then each says so in one line and exits non-zero
    for done in (health, helped):
        assert done.returncode != 0
        assert done.stderr.splitlines() == [
            "mailpipe: the output could not be written: its reader closed it"
        ]


def test_a_full_output_is_one_line_not_a_traceback(user_demo):
    # Given an output on a full disk (/dev/full)
    with open("/dev/full", "w") as full:
        # When `jobs --json` writes to it
        done = mailpipe("jobs", "--user", "demo", "--json", tmp_path=user_demo, stdout=full)
    # Then it says so in one line and exits non-zero
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "mailpipe: the output could not be written: No space left on device"
    ]


def test_a_password_prompt_without_a_terminal_names_the_option(user_demo):
    # Given no terminal to ask for passwords on
    # When `account add` and `fetch` run without --password-env
    added = mailpipe(*ADD, tmp_path=user_demo, stdin=subprocess.DEVNULL)
    fetched = mailpipe("fetch", "--user", "demo", tmp_path=user_demo, stdin=subprocess.DEVNULL)
    # Then each names the option that gives the password
    for done in (added, fetched):
        assert done.returncode == 1
        [line] = done.stderr.splitlines()
        assert line == "mailpipe: password for demo: no terminal to ask; use --password-env VAR"
    # And the IMAP password's own option is named for it
    added = mailpipe(
        *ADD, "--password-env", PASSWORD_ENV, tmp_path=user_demo, stdin=subprocess.DEVNULL
    )
    assert added.stderr.strip() == (
        "mailpipe: IMAP password for u: no terminal to ask; use --secret-env VAR"
    )


def test_mailpipe_demo_without_a_checkout_says_what_to_do(monkeypatch, tmp_path, capsys):
    # Given an installation with no demo beside it (a wheel, not the checkout)
    monkeypatch.setattr(cli.demo, "CHECKOUT", tmp_path)
    # When `mailpipe demo` runs
    code = main(["demo", "--rounds", "1"])
    # Then it says in one line where the demo lives and how to run it
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [f"mailpipe: {cli.demo.NO_CHECKOUT}"]
