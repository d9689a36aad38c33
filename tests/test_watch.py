"""`mailpipe watch` and the IDLE client under it, against the real Dovecot (and the fault proxy)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from mailpipe import idle
from mailpipe.imap import ImapSettings
from tests.support.faultproxy import FaultProxy
from tests.support.messages import plain_message as message
from tests.support.scripted_imap import HOST, ScriptedImap

HANG_GUARD = 60.0  # only so a broken build fails instead of hanging; no timing is asserted


class Lines:
    """The lines a child process prints, read without blocking forever."""

    def __init__(self, stream) -> None:
        self.fd = stream.fileno()
        self.pending = b""

    def next(self, timeout: float = HANG_GUARD) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            assert left > 0, "no line came"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, "the process ended its output"
                self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()


def watch_args(host: str, port: int, user: str, db: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli",
        "watch",
        *("--host", host, "--port", str(port), "--user", user),
        *("--password-env", "IMAP_PASSWORD", "--security", "none", "--db", db),
        *extra,
    ]


def start_watch(args: list[str], password: str) -> subprocess.Popen:
    env = {**os.environ, "IMAP_PASSWORD": password, "MAILPIPE_MIN_BACKOFF_MS": "50"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(process: subprocess.Popen) -> tuple[int, str]:
    """Ctrl-C, then the exit code and what it said on stderr."""
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return code, process.stderr.read().decode()


def test_watch_prints_first_sync_then_each_new_message(dovecot, imap_user, tmp_path):
    # Given a mailbox with two messages and `mailpipe watch --json` on it
    user, password = imap_user
    dovecot.append(user, password, [message(1), message(2)])
    args = watch_args(dovecot.host, dovecot.port, user, f"sqlite:///{tmp_path / 'm.db'}", "--json")
    process = start_watch(args, password)
    try:
        lines = Lines(process.stdout)
        # When its first sync's line is printed
        first = json.loads(lines.next())
        # Then it is the object `mailpipe sync --json` prints, with both messages saved
        assert set(first) == {
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
        assert first["saved"] == 2
        # When a message is appended to the folder afterwards
        dovecot.append(user, password, [message(3)])
        # Then the next line reports it saved, and only it
        second = json.loads(lines.next())
        assert (second["fetched"], second["saved"], second["duplicates"]) == (1, 1, 0)
        # And so for the next one too
        dovecot.append(user, password, [message(4)])
        assert json.loads(lines.next())["saved"] == 1
    finally:
        code, stderr = stop(process)
    # And Ctrl-C ends it cleanly
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_watch_comes_back_after_the_connection_is_cut(dovecot, imap_user, tmp_path):
    # Given `mailpipe watch` connected through the fault proxy
    user, password = imap_user
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as proxy:
        args = watch_args(proxy.host, proxy.port, user, f"sqlite:///{tmp_path / 'm.db'}", "--json")
        process = start_watch(args, password)
        try:
            lines = Lines(process.stdout)
            assert json.loads(lines.next())["saved"] == 0
            # When the proxy resets its IDLE connection (and every other one)
            proxy.cut()
            # Then it connects again and syncs (nothing new yet)
            assert json.loads(lines.next())["saved"] == 0
            # And a message appended afterwards is still reported
            dovecot.append(user, password, [message(1)])
            assert json.loads(lines.next())["saved"] == 1
        finally:
            code, stderr = stop(process)
    assert code == 0
    # And the drop was told on stderr in one line, with its class
    assert "connection_reset" in stderr
    assert "Traceback" not in stderr


def test_watch_with_a_wrong_password_is_one_line(dovecot, imap_user, tmp_path):
    # Given a wrong password
    user, _password = imap_user
    args = watch_args(dovecot.host, dovecot.port, user, f"sqlite:///{tmp_path / 'm.db'}")
    # When watch starts
    result = subprocess.run(
        args,
        env={**os.environ, "IMAP_PASSWORD": "not-the-password"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    # Then it ends at once with one line naming the cause, and no secret
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid_credentials" in lines[0], result.stderr
    assert "not-the-password" not in result.stderr


def settings_for(dovecot, user: str, password: str, *, port: int | None = None) -> ImapSettings:
    return ImapSettings(
        host=dovecot.host, port=port or dovecot.port, username=user, password=password,
        security="none",
    )  # fmt: skip


def test_idle_reports_new_mail_across_renewals(dovecot, imap_user):
    # Given an IDLE connection that renews IDLE every 0.2 s
    user, password = imap_user
    dovecot.append(user, password, [message(1)])
    connection = idle.open_idle(settings_for(dovecot, user, password))
    assert (connection.mailbox.exists, connection.mailbox.folder) == (1, "INBOX")

    async def scenario() -> set[str]:
        await connection.start()
        waiting = asyncio.ensure_future(connection.changes(renew_seconds=0.2))
        # When several renewals pass with nothing new
        await asyncio.sleep(1.0)
        assert not waiting.done()
        # And a message arrives
        await asyncio.to_thread(dovecot.append, user, password, [message(2)])
        kinds = await asyncio.wait_for(waiting, HANG_GUARD)
        await connection.close()
        return kinds

    # Then the change is reported as EXISTS
    assert "EXISTS" in asyncio.run(scenario())


def test_idle_over_tls(dovecot, imap_user):
    # Given an IDLE connection over implicit TLS (the socket is an SSL socket, non-blocking)
    user, password = imap_user
    settings = ImapSettings(
        host=dovecot.host,
        port=dovecot.tls_port,
        username=user,
        password=password,
        security="tls",
        ca_file=str(dovecot.ca_file),
    )
    connection = idle.open_idle(settings)

    async def scenario() -> set[str]:
        await connection.start()
        waiting = asyncio.ensure_future(connection.changes())
        await asyncio.sleep(0.2)
        # When a message arrives
        await asyncio.to_thread(dovecot.append, user, password, [message(1)])
        kinds = await asyncio.wait_for(waiting, HANG_GUARD)
        await connection.close()
        return kinds

    # Then it is reported
    assert "EXISTS" in asyncio.run(scenario())


def test_idle_burst_is_one_or_few_answers(dovecot, imap_user):
    # Given an IDLE connection
    user, password = imap_user
    connection = idle.open_idle(settings_for(dovecot, user, password))

    async def scenario() -> int:
        await connection.start()
        # When 50 messages arrive in one APPEND
        await asyncio.to_thread(dovecot.append, user, password, [message(i) for i in range(50)])
        await asyncio.sleep(0.5)
        answers = 0
        while True:  # every answer that is already waiting
            try:
                await asyncio.wait_for(connection.changes(), 0.5)
            except TimeoutError:
                break
            answers += 1
        await connection.close()
        return answers

    # Then the burst is reported once or a few times, not 50 times
    assert 1 <= asyncio.run(scenario()) <= 2


def test_idle_notices_a_cut_connection(dovecot, imap_user):
    # Given an IDLE connection through the fault proxy
    user, password = imap_user
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as proxy:
        connection = idle.open_idle(settings_for(dovecot, user, password, port=proxy.port))

        async def scenario() -> None:
            await connection.start()
            waiting = asyncio.ensure_future(connection.changes())
            await asyncio.sleep(0.2)
            # When the proxy resets it
            proxy.cut()
            await asyncio.wait_for(waiting, HANG_GUARD)

        # Then waiting for changes ends with IdleLost (a connection reset)
        with pytest.raises(ConnectionResetError):
            asyncio.run(scenario())
        connection.abort()


def test_server_without_idle_is_unsupported():
    # Given a server that does not announce IDLE
    with ScriptedImap() as server:
        settings = ImapSettings(
            host=HOST, port=server.port, username="u", password="p", security="none"
        )
        # When an IDLE connection is opened
        # Then it is refused as unsupported (the account is polled instead), before any EXAMINE
        with pytest.raises(idle.IdleUnsupported):
            idle.open_idle(settings)
        assert "EXAMINE" not in server.commands


def test_watch_polls_a_server_without_idle(tmp_path):
    # Given a server that does not announce IDLE (two messages in its INBOX)
    with ScriptedImap() as server:
        args = watch_args(HOST, server.port, "u", f"sqlite:///{tmp_path / 'm.db'}", "--json")
        process = start_watch(args, "p")
        try:
            # When watch starts, Then it syncs at once all the same
            assert json.loads(Lines(process.stdout).next())["saved"] == 2
        finally:
            code, stderr = stop(process)
    # And says in one line that it polls instead, and Ctrl-C ends it cleanly
    assert code == 0
    assert "does not offer IDLE; polling every 60 s" in stderr
    assert "Traceback" not in stderr


def test_watch_into_a_closed_pipe_ends_in_one_line(dovecot, imap_user, tmp_path):
    # Given `mailpipe watch --json | head -1`: its reader goes after the first line
    user, password = imap_user
    args = watch_args(dovecot.host, dovecot.port, user, f"sqlite:///{tmp_path / 'm.db'}", "--json")
    process = start_watch(args, password)
    try:
        Lines(process.stdout).next()
        process.stdout.close()
        # When the next sync has a line to print
        dovecot.append(user, password, [message(1)])
        code = process.wait(timeout=HANG_GUARD)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Then it ends with one line saying why, and no traceback
    stderr = process.stderr.read().decode()
    assert code != 0
    assert stderr.strip().splitlines() == ["mailpipe: watch stopped: its output was closed"]


def test_flag_changes_do_not_trigger_a_sync_until_flag_sync_exists(dovecot, imap_user):
    # Given an IDLE connection on a folder with one message
    user, password = imap_user
    [uid] = dovecot.append(user, password, [message(1)])
    connection = idle.open_idle(settings_for(dovecot, user, password))

    async def scenario() -> set[str]:
        await connection.start()
        waiting = asyncio.ensure_future(connection.changes())
        # When another client marks the message seen (the server reports FETCH)
        with dovecot.session(user, password) as other:
            other.select_folder("INBOX")
            other.add_flags([uid], [b"\\Seen"])
        await asyncio.sleep(1.5)  # past Dovecot's 500 ms notice delay
        # Then no sync is asked for yet
        assert not waiting.done()
        # When a message arrives, Then the answer names both
        await asyncio.to_thread(dovecot.append, user, password, [message(2)])
        kinds = await asyncio.wait_for(waiting, HANG_GUARD)
        await connection.close()
        return kinds

    assert {"FETCH", "EXISTS"} <= asyncio.run(scenario())
