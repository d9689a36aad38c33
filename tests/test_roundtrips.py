"""Round trips of a no-change poll, counted by a delaying proxy on the wire and by the sync.

Across a 40 ms round trip (20 ms each way, as a distant provider) a poll that finds nothing
new must wait for the server at most 4 times without TLS and 5 times with implicit TLS 1.3,
and what the sync reports as `round_trips` must be what the wire showed.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mailpipe import imap
from mailpipe.imap import ImapSettings
from mailpipe.profiler import Profiler
from mailpipe.sync import SyncResult, sync_account
from tests.support.messages import plain_message as message
from tests.support.scripted_imap import ScriptedImap, tagged
from tests.support.turnproxy import TurnProxy
from tests.test_cli import mailpipe, sync_args
from tests.test_sync import Recorder, make_mailbox

ONE_WAY = 0.02  # seconds each way: a 40 ms round trip
PLAIN_BAR = 4
TLS_BAR = 5


def poll_through(proxy: TurnProxy, box, settings: ImapSettings, **kwargs) -> SyncResult:
    """One sync of the mailbox's account, connecting through the proxy."""
    return sync_account(
        box.sessions,
        account_id=box.account_id,
        key=box.key,
        settings=replace(settings, port=proxy.port),
        **kwargs,
    )


def test_a_no_change_poll_through_the_command_line_reports_the_round_trips_the_wire_saw(
    dovecot, imap_user, tmp_path
):
    # Given a mailbox synced once through a proxy that adds 20 ms each way
    user, password = imap_user
    dovecot.append(user, password, [message(i) for i in range(3)])
    db = f"sqlite:///{tmp_path / 'm.db'}"
    with TurnProxy(upstream=(dovecot.host, dovecot.port), delay=ONE_WAY) as proxy:
        args = sync_args(dovecot, user, db, "--json", port=proxy.port)
        first = mailpipe(*args, password=password)
        assert first.returncode == 0, first.stderr
        proxy.clear()
        # When `mailpipe sync --json` polls again and finds nothing new
        again = mailpipe(*args, password=password)
        [seen] = proxy.turns()
    # Then it waited for the server at most 4 times (connect with greeting, LOGIN, EXAMINE;
    # LOGOUT is not waited for), and says exactly how many
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["fetched"] == 0 and report["folders"][0]["unchanged"]
    assert seen <= PLAIN_BAR
    assert report["round_trips"] == seen


def test_a_no_change_poll_over_tls_1_3_takes_at_most_five_round_trips(dovecot, tmp_path):
    # Given a mailbox on implicit TLS, synced once
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}", security="tls")
    box.deliver([message(i) for i in range(2)])
    settings = ImapSettings(
        host=dovecot.host,
        port=dovecot.tls_port,
        username=box.user,
        password=box.password,
        security="tls",
        ca_file=str(dovecot.ca_file),
    )
    client = imap.connect(settings)
    version = client.socket().version()
    imap.logout(client)
    assert version == "TLSv1.3"
    with TurnProxy(upstream=(dovecot.host, dovecot.tls_port), delay=ONE_WAY) as proxy:
        assert poll_through(proxy, box, settings).saved == 2
        proxy.clear()
        # When it polls again under the profiler
        profiler = Profiler()
        with profiler:
            result = poll_through(proxy, box, settings, observer=profiler)
        [seen] = proxy.turns()
    # Then the poll (TCP, TLS 1.3's two flights with the greeting, LOGIN, EXAMINE) stays within
    # five round trips, and the sync and its profile report what the wire showed
    assert result.folders[0].unchanged
    assert seen <= TLS_BAR
    assert result.round_trips == seen == profiler.to_json()["round_trips"]


def test_sasl_ir_logs_in_with_authenticate_plain_in_one_round_trip(dovecot, tmp_path):
    # Given Dovecot, which announces SASL-IR, and an account that logs in with AUTHENTICATE PLAIN
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}", auth="plain")
    box.deliver([message(1)])
    settings = ImapSettings(
        host=dovecot.host,
        port=dovecot.port,
        username=box.user,
        password=box.password,
        security="none",
        auth="plain",
    )
    with TurnProxy(upstream=(dovecot.host, dovecot.port), delay=ONE_WAY) as proxy:
        assert poll_through(proxy, box, settings).saved == 1
        proxy.clear()
        # When it polls again
        result = poll_through(proxy, box, settings)
        [seen] = proxy.turns()
    # Then the login took one round trip like LOGIN would (no empty continuation first)
    assert result.folders[0].unchanged
    assert result.round_trips == seen == 3


def test_a_wrong_password_over_sasl_ir_is_refused_as_a_login_error(dovecot, imap_user):
    # Given the right user with a wrong password, logging in with AUTHENTICATE PLAIN
    user, _password = imap_user
    settings = ImapSettings(
        host=dovecot.host,
        port=dovecot.port,
        username=user,
        password="wrong",
        security="none",
        auth="plain",
    )
    # When it connects, Then the refusal is a LoginError naming the server's reason
    with pytest.raises(imap.LoginError, match="AUTHENTICATIONFAILED"):
        imap.connect(settings)


def test_a_server_without_sasl_ir_or_greeting_capabilities_still_logs_in(tmp_path):
    # Given a server (as older Courier) whose greeting names no capabilities, without SASL-IR,
    # that answers AUTHENTICATE PLAIN only after an empty continuation
    tags = []

    def authenticate(tag: bytes, args: bytes) -> bytes:
        tags.append(tag)
        assert args.strip().upper() == b"AUTHENTICATE PLAIN"  # no initial response sent
        return b"+ \r\n"

    def response(line: bytes, args: bytes) -> bytes:  # the client's base64 line has no tag
        return tagged(tags[-1], b"OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] logged in")

    greeting = b"* OK scripted server ready\r\n"
    replies = {"AUTHENTICATE": authenticate, "": response}
    with ScriptedImap(replies, greeting=greeting) as server:
        settings = ImapSettings(
            host="127.0.0.1",
            port=server.port,
            username="alice",
            password="secret",
            security="none",
            auth="plain",
        )
        # When it connects
        client = imap.connect(settings)
        turns = imap.round_trips(client)
        imap.logout(client)
        server.wait_idle()
        commands = list(server.commands)
    # Then it asked for the capabilities (the greeting had none) and logged in in two steps
    assert commands[:2] == ["CAPABILITY", "AUTHENTICATE"]
    assert turns == 4  # connect, CAPABILITY, AUTHENTICATE, its continuation


FOLDERS = ["INBOX", "Archiv", "Entwürfe", 'Quote "x" \\ y']


def test_a_no_change_poll_of_several_folders_asks_their_status_in_one_round_trip(dovecot, tmp_path):
    # Given four folders (one with a non-ASCII name, one with quotes), each synced once
    box = make_mailbox(dovecot, f"sqlite:///{tmp_path / 'm.db'}")
    for number, folder in enumerate(FOLDERS):
        box.deliver([message(number)], folder=folder)
    assert box.sync(folders=FOLDERS).saved == len(FOLDERS)
    # When it polls again with nothing new
    recorder = Recorder()
    quiet = box.sync(folders=FOLDERS, connect=recorder.connect)
    # Then one write of four STATUS commands (one round trip) found every folder unchanged,
    # with no EXAMINE at all
    assert [folder.unchanged for folder in quiet.folders] == [True] * len(FOLDERS)
    assert recorder.commands == [b"STATUS"] * len(FOLDERS) + [b"LOGOUT"]
    assert recorder.writes == 2
    assert quiet.round_trips == 3  # connect, LOGIN, the STATUS burst
    # When mail arrives in one of them
    box.deliver([message(9)], folder="Entwürfe")
    recorder = Recorder()
    changed = box.sync(folders=FOLDERS, connect=recorder.connect)
    # Then only that folder is examined and fetched; the others stay unchanged
    assert [folder.saved for folder in changed.folders] == [0, 0, 1, 0]
    assert recorder.commands.count(b"EXAMINE") == 1
