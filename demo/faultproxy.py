"""A fault-injecting TCP proxy in front of an IMAP server: the demo's flaky link.

    with FaultProxy(upstream=(server.host, server.port)) as link:
        link.latency(0.15)                # every connection: 150 ms each way
        link.reset_after(3000, times=1)   # the next connection breaks after 3000 server bytes

One background thread runs a `selectors` loop over every socket; nothing blocks per chunk, so a
delay costs latency and never bandwidth. Faults are chosen when a connection is accepted, so
switching them (thread-safe, from any thread) changes NEW connections only. Each fault method
takes `times=N` to hit only the next N connections and then step aside; without it the fault
stays. A connection gets the standing latency and fault, overridden by the oldest queued
`times=` change, so `link.latency(0.05); link.reset_after(2000, times=1)` delays every
connection and breaks one. The tests' subclass (tests/support/faultproxy.py) adds the other
faults (stall, refuse, close after the greeting, refuse hard) and reads the counters kept here.

Choices worth knowing:
- Faults on server->client data count bytes of the server's stream; `stall` and "close after
  the greeting" cut after the first line (the greeting).
- A "reset" is a close with SO_LINGER 0, so the client's next recv raises ConnectionResetError.
- The port is reserved by a bound, never-listening SO_REUSEPORT socket, so the listener can be
  closed and opened again on the same port and no other process can take it in between.
- A connection the client or server resets is reset on the other side too, as a router would.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

HOST = "127.0.0.1"
CHUNK = 65536
HIGH_WATER = 8 << 20  # bytes queued one way before reading pauses: caps throughput per delay
DRAIN_TIMEOUT = 2.0  # how long a client we sent FIN to may keep talking before we drop it
CONTROL_TIMEOUT = 5.0
JOIN_TIMEOUT = 5.0
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN
EOF = None  # queue marker: forward the sender's FIN once everything before it is written
IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN)  # a non-blocking connect under way

Action = Literal["stall", "reset", "close", "refuse"]


@dataclasses.dataclass(frozen=True)
class Fault:
    """What to do to one connection: `after` server bytes (None: the first line), then `action`."""

    action: Action
    after: int | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one connection is treated, fixed when it is accepted so later switches do not race."""

    delay: float = 0.0
    fault: Fault | None = None


@dataclasses.dataclass
class _Pending:
    """A change to the standing plan for the next `remaining` connections (the `times=` option)."""

    changes: dict[str, Any]
    remaining: int


def _rst(sock: socket.socket) -> None:
    """Close with RST, so the peer sees ECONNRESET rather than a clean end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    sock.close()


class _Pipe:
    """One direction of a connection: chunks stamped with the time they are due, written in order."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        """Start empty; `delay` is the one-way latency added to every chunk and to the FIN."""
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0  # bytes in the queue, for back-pressure
        self.accepted = 0  # bytes taken for forwarding (the cut applies to this count)
        self.sent = 0  # bytes written to dst
        self.eof = False  # src sent FIN (or the fault swallowed the rest)
        self.done = False  # the FIN went on to dst, or never will
        self.blocked = False  # dst's send buffer was full: wait for it to be writable
        self.cut: int | None = None  # stream offset after which nothing more is forwarded
        self.cut_at_line = False  # the cut is the end of the first line, not yet seen

    def take(self, data: bytes, now: float) -> None:
        """Queue what was read, dropping anything past the cut."""
        if self.cut is None and self.cut_at_line:
            newline = data.find(b"\n")
            if newline >= 0:
                self.cut = self.accepted + newline + 1
        if self.cut is not None:
            data = data[: max(self.cut - self.accepted, 0)]
        if data:
            self.accepted += len(data)
            self.queued += len(data)
            self.queue.append((now + self.delay, data))

    def past_cut(self) -> bool:
        """Tell whether everything up to the cut has been written, so the fault is due."""
        return self.cut is not None and self.sent >= self.cut

    def next_due(self) -> float | None:
        """When the head of the queue may be written (None: nothing queued or dst is full)."""
        return self.queue[0][0] if self.queue and not self.blocked else None


class _Connection:
    """A client socket, its upstream socket, two pipes and the fault chosen at accept time."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, plan: Plan) -> None:
        """Start the non-blocking connect upstream; data flows once it completes."""
        self.proxy, self.client, self.plan = proxy, client, plan
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setblocking(False)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state: Literal["connecting", "open", "draining", "closed"] = "connecting"
        self.drain_deadline = 0.0
        self.c2s = _Pipe(client, self.server, plan.delay)
        self.s2c = _Pipe(self.server, client, plan.delay)
        fault = plan.fault
        if fault is not None:
            self.s2c.cut, self.s2c.cut_at_line = fault.after, fault.after is None
        self.masks: dict[socket.socket, int] = {client: 0, self.server: 0}
        error = self.server.connect_ex(proxy.upstream)
        if error not in (0, *IN_PROGRESS):
            self.abort()

    # -- events ----------------------------------------------------------------------------

    def on_client(self, mask: int) -> None:
        """The client socket is readable and/or writable."""
        if mask & selectors.EVENT_WRITE:
            self.s2c.blocked = False
        if mask & selectors.EVENT_READ and self.state != "closed":
            self.receive(self.c2s)

    def on_server(self, mask: int) -> None:
        """The upstream socket connected, or is readable and/or writable."""
        if self.state == "connecting":
            error = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self.abort()  # upstream down: the client sees a reset, as through a router
            else:
                self.state = "open"
            return
        if mask & selectors.EVENT_WRITE:
            self.c2s.blocked = False
        if mask & selectors.EVENT_READ and self.state == "open":
            self.receive(self.s2c)

    def receive(self, pipe: _Pipe) -> None:
        """Read one chunk from the pipe's source: queue it, note EOF, or pass a reset on."""
        try:
            data = pipe.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if self.state == "draining":
            if not data:
                self.close()  # the client saw our FIN and closed: a clean end
            return
        if data:
            pipe.take(data, time.monotonic())
        else:
            pipe.eof = True
            if pipe is self.s2c and self.stalled():
                pipe.done = True  # a stalled client never learns the server went away
            else:
                pipe.queue.append((time.monotonic() + pipe.delay, EOF))

    def stalled(self) -> bool:
        """Tell whether server->client forwarding has stopped for good (the stall fault)."""
        fault = self.plan.fault
        s2c = self.s2c
        return (
            fault is not None
            and fault.action == "stall"
            and s2c.cut is not None
            and s2c.accepted >= s2c.cut
        )

    # -- pumping ---------------------------------------------------------------------------

    def pump(self, now: float) -> float | None:
        """Write what is due, fire a due fault, update interest; return when to come back."""
        if self.state == "draining" and now >= self.drain_deadline:
            self.close()
        if self.state == "open":
            self.flush(self.c2s, now)
        if self.state == "open":
            self.flush(self.s2c, now)
        c2s, s2c = self.c2s, self.s2c
        if self.state == "open" and c2s.done and s2c.done and not c2s.queue and not s2c.queue:
            self.close()
        if self.state == "closed":
            return None
        self.watch()
        if self.state == "draining":
            return self.drain_deadline
        dues = [d for d in (self.c2s.next_due(), self.s2c.next_due()) if d is not None]
        return min(dues) if dues else None

    def flush(self, pipe: _Pipe, now: float) -> None:
        """Send queued chunks that are due, in order, until the queue or the socket is full."""
        while self.state == "open":
            if pipe is self.s2c and self.fire_if_due():
                return
            if pipe.blocked or not pipe.queue or pipe.queue[0][0] > now:
                return
            data = pipe.queue[0][1]
            if data is EOF:
                pipe.queue.popleft()
                pipe.done = True
                with contextlib.suppress(OSError):  # the peer may be gone already
                    pipe.dst.shutdown(socket.SHUT_WR)
                continue
            try:
                n = pipe.dst.send(data)
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                return
            except OSError:
                self.abort()
                return
            pipe.sent += n
            pipe.queued -= n
            if n < len(data):
                pipe.queue[0] = (pipe.queue[0][0], data[n:])
                pipe.blocked = True
            else:
                pipe.queue.popleft()

    def fire_if_due(self) -> bool:
        """Reset or cleanly close the client once its share of server bytes is written."""
        fault = self.plan.fault
        if fault is None or fault.action not in ("reset", "close") or not self.s2c.past_cut():
            return False
        if fault.action == "reset":
            self.abort()
            return True
        # close: FIN to the client, and keep reading what it already sent, or close() would
        # turn the FIN into an RST because of unread data
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return True
        self._drop(self.server)
        self.server.close()
        self.state = "draining"
        self.drain_deadline = time.monotonic() + DRAIN_TIMEOUT
        return True

    def watch(self) -> None:
        """Ask the selector for exactly the events this connection can use now."""
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        if self.state == "draining":
            self._want(self.client, read)
            return
        if self.state == "connecting":
            self._want(self.server, write)
            return
        c2s, s2c = self.c2s, self.s2c
        client = (read if not c2s.eof and c2s.queued < HIGH_WATER else 0) | (
            write if s2c.blocked else 0
        )
        server = (read if not s2c.eof and s2c.queued < HIGH_WATER else 0) | (
            write if c2s.blocked else 0
        )
        self._want(self.client, client)
        self._want(self.server, server)

    def _want(self, sock: socket.socket, mask: int) -> None:
        """Register, modify or unregister one socket, touching the selector only on a change."""
        old = self.masks.get(sock, 0)
        if mask == old:
            return
        callback = self.on_client if sock is self.client else self.on_server
        selector = self.proxy._selector
        if not old:
            selector.register(sock, mask, callback)
        elif not mask:
            selector.unregister(sock)
        else:
            selector.modify(sock, mask, callback)
        self.masks[sock] = mask

    def _drop(self, sock: socket.socket) -> None:
        """Unregister a socket before it is closed."""
        if self.masks.get(sock):
            self.proxy._selector.unregister(sock)
        self.masks[sock] = 0

    # -- ending ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Reset both sides: the client sees ECONNRESET, the server a reset too."""
        if self.state == "closed":
            return
        for sock in (self.client, self.server):
            self._drop(sock)
            _rst(sock)
        self._ended()

    def close(self) -> None:
        """Close both sides normally (a FIN, or an RST if unread data is left)."""
        if self.state == "closed":
            return
        for sock in (self.client, self.server):
            self._drop(sock)
            sock.close()
        self._ended()

    def _ended(self) -> None:
        """Mark closed and count the connection as no longer active."""
        self.state = "closed"
        self.proxy._connection_ended(self)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 whose faults are switched at run time; see the module docstring."""

    def __init__(self, *, upstream: tuple[str, int], host: str = HOST) -> None:
        """Remember where to forward to; `start()` (or `with`) binds and runs the proxy."""
        self.upstream = upstream
        self.host = host
        self._lock = threading.Condition()
        self._standing = Plan()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._connections = 0  # accepted, refused ones included (the tests' subclass reads these)
        self._active = 0
        self._max_active = 0
        self._port = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        # calls for the loop thread to run (the tests' subclass switches the listener this way)
        self._calls: collections.deque[tuple[Callable[[], None], threading.Event]] = (
            collections.deque()
        )
        self._conns: set[_Connection] = set()
        self._selector = selectors.DefaultSelector()
        self._hold: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Reserve an ephemeral port, listen on it and start the loop thread."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        try:
            self._hold = self._bind(0, listen=False)
            self._port = self._hold.getsockname()[1]
            self._listen()
            for sock in (self._wake_r, self._wake_w):
                sock.setblocking(False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Close every socket and join the thread; re-raise anything that broke the loop."""
        thread = self._thread
        if thread is None:
            self._close_sockets()
            return
        self._stopping = True
        self._wake()
        thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the fault proxy thread did not stop")
        if self._error is not None:
            raise RuntimeError("the fault proxy loop failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port clients connect to; it stays the proxy's while the proxy runs."""
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    # -- faults ----------------------------------------------------------------------------

    def latency(self, seconds: float, *, times: int | None = None) -> None:
        """Delay every chunk (and FIN) by `seconds` each way, so a round trip costs 2x."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._set(times, delay=float(seconds))

    def reset_after(self, server_bytes: int, *, times: int | None = None) -> None:
        """Forward `server_bytes` to the client, then reset it (RST), e.g. to break a FETCH."""
        self._set(times, fault=Fault("reset", _count(server_bytes)))

    def _set(self, times: int | None, **changes: Any) -> None:
        """Change the standing plan, or queue the change for the next `times` connections."""
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            if times is None:
                self._standing = dataclasses.replace(self._standing, **changes)
            else:
                self._pending.append(_Pending(changes, times))

    def _next_plan(self) -> Plan:
        """The plan for a connection being accepted now, using up one queued `times=` change."""
        with self._lock:
            plan = self._standing
            if self._pending:
                head = self._pending[0]
                plan = dataclasses.replace(plan, **head.changes)
                head.remaining -= 1
                if not head.remaining:
                    self._pending.popleft()
            return plan

    # -- loop (runs in the proxy thread) ---------------------------------------------------

    def _run(self) -> None:
        """Pump every connection, wait for sockets or the next due chunk, handle events."""
        try:
            while not self._stopping:
                now = time.monotonic()
                deadline: float | None = None
                for conn in list(self._conns):
                    due = conn.pump(now)
                    if due is not None and (deadline is None or due < deadline):
                        deadline = due
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                for key, mask in self._selector.select(timeout):
                    key.data(mask)
        except BaseException as error:
            self._error = error
        finally:
            self._close_sockets()

    def _on_wake(self, mask: int) -> None:
        """Run calls queued by other threads (listener changes)."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._calls:
            fn, done = self._calls.popleft()
            try:
                fn()
            finally:
                done.set()

    def _on_accept(self, mask: int) -> None:
        """Accept every waiting client and give it the plan in force now."""
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ECONNABORTED: the client gave up before we got to it
            plan = self._next_plan()
            with self._lock:
                self._connections += 1
            if plan.fault is not None and plan.fault.action == "refuse":
                _rst(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._active += 1
                self._max_active = max(self._max_active, self._active)
            conn = _Connection(self, client, plan)
            if conn.state != "closed":
                self._conns.add(conn)

    def _connection_ended(self, conn: _Connection) -> None:
        """Forget a closed connection and wake anyone in `wait_idle`."""
        self._conns.discard(conn)
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    def _bind(self, port: int, *, listen: bool) -> socket.socket:
        """A socket on the proxy's port that shares it (SO_REUSEPORT) with the others we make."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if listen:  # the placeholder must not have it, or others could bind next to it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            if listen:
                sock.listen(128)
                sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen(self) -> None:
        """Listen on the reserved port (no-op when already listening)."""
        if self._listener is not None:
            return
        self._listener = self._bind(self._port, listen=True)
        self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def _wake(self) -> None:
        """Interrupt the loop's select()."""
        with contextlib.suppress(OSError):  # full: a wake-up is pending; closed: loop is gone
            self._wake_w.send(b"\0")

    def _close_sockets(self) -> None:
        """Close connections, listener, placeholder, wake-up pair and selector."""
        for conn in list(self._conns):
            conn.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._hold is not None:
            self._hold.close()
            self._hold = None
        while self._calls:  # nobody will run these now: let their callers go
            self._calls.popleft()[1].set()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()


def _count(value: int | None) -> int | None:
    """Check a byte count (None stays None: "after the first line")."""
    if value is not None and value < 0:
        raise ValueError("a byte count must be >= 0")
    return value
