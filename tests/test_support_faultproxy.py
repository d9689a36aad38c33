"""The fault proxy does what each fault claims, against the real Dovecot, so tests can rely on it."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError

from tests.support.dovecot import Dovecot
from tests.support.faultproxy import FaultProxy

TIMEOUT = 5.0
SMALL = b"From: a@example.org\r\nSubject: through the proxy\r\n\r\nhello\r\n"
BIG_LINE = b"x" * 998 + b"\r\n"
BIG = b"From: b@example.org\r\nSubject: big\r\n\r\n" + BIG_LINE * 2000  # about 2 MB
LATENCY = 0.1
RESET_AFTER = 50_000  # well past greeting, LOGIN and SELECT replies, well before the end of BIG


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    """A transparent proxy in front of the shared Dovecot, closed (and joined) after the test."""
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as running:
        yield running


def connect(proxy: FaultProxy, *, timeout: float = TIMEOUT) -> IMAPClient:
    """A plain imapclient to the proxy (it reads the greeting, nothing more)."""
    return IMAPClient("127.0.0.1", port=proxy.port, ssl=False, timeout=timeout)


@contextlib.contextmanager
def logged_in(
    proxy: FaultProxy, user: tuple[str, str], *, timeout: float = TIMEOUT
) -> Iterator[IMAPClient]:
    """A client logged in through the proxy, logged out (or at least closed) afterwards."""
    client = connect(proxy, timeout=timeout)
    try:
        client.login(*user)
        yield client
    finally:
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()


def read_line(sock: socket.socket) -> bytes:
    """Read one CRLF-ended line byte by byte, so nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def shut(client: IMAPClient) -> None:
    """Close a client whose connection a fault broke."""
    with contextlib.suppress(Exception):
        client.shutdown()


def test_transparent_proxy_logs_in_and_fetches(
    dovecot: Dovecot, imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a message in the user's INBOX
    (uid,) = dovecot.append(*imap_user, [SMALL])
    # When a client logs in and fetches it through the proxy
    with logged_in(proxy, imap_user) as client:
        client.select_folder("INBOX", readonly=True)
        body = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
        assert proxy.active == 1
    # Then the bytes arrive unchanged over one proxied connection, which ends with the client's
    proxy.wait_idle()
    assert body == SMALL
    assert (proxy.connections, proxy.active, proxy.max_active) == (1, 0, 1)


def test_latency_adds_the_delay_to_every_round_trip(
    imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a one-way latency
    proxy.latency(LATENCY)
    # When a new client greets, logs in and sends NOOPs
    started = time.monotonic()
    with logged_in(proxy, imap_user) as client:
        logged_in_at = time.monotonic()
        round_trips = []
        for _ in range(3):
            before = time.monotonic()
            client.noop()
            round_trips.append(time.monotonic() - before)
    # Then the greeting took one delay and LOGIN a round trip, and so did each NOOP (lower
    # bounds only: a busy machine may add, never take away)
    assert logged_in_at - started >= 3 * LATENCY
    assert min(round_trips) >= 2 * LATENCY


def test_latency_longer_than_the_client_timeout_times_out(proxy: FaultProxy) -> None:
    # Given a latency far above the client's timeout
    proxy.latency(2.0)
    # When a client waits for the greeting, Then it times out
    with pytest.raises(TimeoutError):
        connect(proxy, timeout=0.25)


def test_stall_forwards_the_greeting_then_nothing(proxy: FaultProxy) -> None:
    # Given a stall
    proxy.stall()
    # When a raw client reads the greeting and sends a command
    with socket.create_connection(proxy.address, timeout=1.0) as raw:
        greeting = read_line(raw)
        raw.sendall(b"a1 CAPABILITY\r\n")
        # Then the greeting arrived, but the answer never does
        assert greeting.startswith(b"* OK")
        with pytest.raises(TimeoutError):
            raw.recv(1)
    # And When the client gives up, Then the proxy closes its side too
    proxy.wait_idle()


def test_stall_makes_an_imap_client_time_out(proxy: FaultProxy) -> None:
    # Given a stall
    proxy.stall()
    # When a client with a 1 s timeout connects (imaplib asks for CAPABILITY after the greeting)
    # Then it times out
    with pytest.raises(TimeoutError):
        connect(proxy, timeout=1.0)
    proxy.wait_idle()


def test_stall_after_zero_bytes_withholds_even_the_greeting(proxy: FaultProxy) -> None:
    # Given a stall before the first server byte
    proxy.stall(after_bytes=0)
    # When a client waits for the greeting, Then it times out
    with pytest.raises(TimeoutError):
        connect(proxy, timeout=0.5)


def test_reset_after_breaks_a_fetch_midway_with_a_connection_error(
    dovecot: Dovecot, imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a 2 MB message and a reset after 50 kB from the server
    (uid,) = dovecot.append(*imap_user, [BIG])
    proxy.reset_after(RESET_AFTER)
    client = connect(proxy)
    try:
        # When the client logs in and selects (both fit in the budget) and fetches the message
        client.login(*imap_user)
        client.select_folder("INBOX", readonly=True)
        # Then the FETCH fails with a connection error, not with a short or empty result
        with pytest.raises(ConnectionResetError):
            client.fetch([uid], ["BODY.PEEK[]"])
    finally:
        shut(client)
    proxy.wait_idle()


def test_refuse_resets_a_connection_on_the_first_read(proxy: FaultProxy) -> None:
    # Given a soft refusal
    proxy.refuse()
    # When a client connects and reads the greeting, Then it is reset
    with pytest.raises(ConnectionResetError):
        connect(proxy)
    assert (proxy.connections, proxy.active) == (1, 0)


def test_refuse_hard_refuses_connect_and_restore_listens_on_the_same_port(
    imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a proxy that stops listening
    port = proxy.port
    proxy.refuse_hard()
    # When clients connect, Then connect() itself is refused
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    assert proxy.connections == 0
    # And When it is restored, Then the same port works again
    proxy.restore()
    assert proxy.port == port
    with logged_in(proxy, imap_user) as client:
        client.noop()
    assert proxy.connections == 1


def test_close_after_greeting_sends_the_greeting_then_a_clean_eof(proxy: FaultProxy) -> None:
    # Given a proxy that hangs up after the greeting
    proxy.close_after_greeting()
    # When a raw client reads the greeting, sends a command and reads on
    with socket.create_connection(proxy.address, timeout=TIMEOUT) as raw:
        greeting = read_line(raw)
        raw.sendall(b"a1 CAPABILITY\r\n")
        # Then it got the whole greeting line and then end of stream (a FIN, not a reset)
        assert greeting.startswith(b"* OK") and greeting.endswith(b"\r\n")
        assert raw.recv(4096) == b""
    proxy.wait_idle()


def test_close_after_greeting_makes_connect_and_login_fail_with_eof(
    imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a proxy that hangs up after the greeting
    proxy.close_after_greeting()
    # When a client connects and logs in, Then imaplib aborts on EOF (at its CAPABILITY)
    with pytest.raises(IMAPClientAbortError, match="EOF"):
        connect(proxy).login(*imap_user)


def test_times_faults_exactly_that_many_connections(
    imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given a fault for the next two connections only
    proxy.close_after_greeting(times=2)
    outcomes = []
    # When four clients log in one after another
    for _ in range(4):
        try:
            with logged_in(proxy, imap_user) as client:
                client.noop()
            outcomes.append("ok")
        except IMAPClientAbortError:
            outcomes.append("aborted")
    # Then the first two failed and the fault cleared itself
    assert outcomes == ["aborted", "aborted", "ok", "ok"]
    assert proxy.connections == 4


def test_times_queue_after_each_other_and_clear_drops_them(proxy: FaultProxy) -> None:
    # Given one refusal, then one stall queued behind it, then a standing transparent proxy
    proxy.refuse(times=1)
    proxy.stall(after_bytes=0, times=1)
    # When three clients connect, Then they meet the faults in order, then none
    with pytest.raises(ConnectionResetError):
        connect(proxy)
    with pytest.raises(TimeoutError):
        connect(proxy, timeout=0.3)
    shut(connect(proxy))
    # And When faults are queued and cleared, Then nothing is left of them
    proxy.refuse(times=5)
    proxy.clear()
    shut(connect(proxy))


def test_max_active_counts_concurrent_connections(
    imap_user: tuple[str, str], proxy: FaultProxy
) -> None:
    # Given three clients open at the same time
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(logged_in(proxy, imap_user))
        # Then all three are active at once
        assert proxy.active == 3
    proxy.wait_idle()
    assert (proxy.connections, proxy.active, proxy.max_active) == (3, 0, 3)
    # When counting afresh and connecting one at a time, Then the peak is one
    proxy.reset_counters()
    for _ in range(2):
        with logged_in(proxy, imap_user) as client:
            client.noop()
        proxy.wait_idle()
    assert (proxy.connections, proxy.max_active) == (2, 1)


def test_close_leaves_no_thread_or_socket_behind(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    # Given the threads and file descriptors before a proxy exists
    threads, fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd"))
    # When a proxy runs with a stalled client, a delayed one and a hard refusal, then closes
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as proxy:
        proxy.stall(times=1)
        stalled = socket.create_connection(proxy.address, timeout=TIMEOUT)
        read_line(stalled)
        stalled.sendall(b"a1 CAPABILITY\r\n")
        proxy.latency(0.2)
        delayed = connect(proxy)
        delayed.login(*imap_user)
        assert proxy.active == 2
        proxy.refuse_hard()
    stalled.close()
    shut(delayed)
    # Then its thread is gone and every descriptor it opened is closed
    assert set(threading.enumerate()) == threads
    assert set(os.listdir("/proc/self/fd")) == fds
