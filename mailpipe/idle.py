"""IMAP IDLE (RFC 2177) on non-blocking sockets, so one process can hold thousands of connections.

A connection is opened, secured and logged in by `mailpipe.imap.connect` (the one way mailpipe
opens IMAP connections), its folder examined with IMAPClient, and then its socket is taken over
here: the IDLE conversation (IDLE, untagged responses, DONE) is a few lines of non-blocking I/O
driven by asyncio, with no thread per connection.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from imapclient import IMAPClient

from . import imap
from .errors import MailpipeError
from .imap import ImapSettings
from .policies import RENEW_SECONDS

IDLE_CAPABILITY = "IDLE"
# Changes that make the watched folder worth a sync. Flag sync (issue 9) adds EXPUNGE and FETCH.
TRIGGERS = frozenset({"EXISTS"})
ANSWER_TIMEOUT = 30.0  # how long DONE or IDLE may wait for the server's answer
READ_BYTES = 65_536
LITERAL = re.compile(rb"\{(\d+)\+?\}$")
TCP_KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 15, "TCP_KEEPCNT": 4}
_TAGS = itertools.count(1)


class IdleUnsupported(MailpipeError):
    """The server does not announce IDLE: the account is polled at its interval instead."""


class IdleLost(ConnectionResetError):
    """The IDLE connection ended: closed, BYE, or no answer in time (classified as a reset)."""


@dataclass(frozen=True)
class Mailbox:
    """The watched folder as EXAMINE reported it when the connection was opened."""

    folder: str
    uidvalidity: int
    uidnext: int
    exists: int


def open_idle(settings: ImapSettings, folder: str = "INBOX") -> IdleConnection:
    """Log in (blocking, through `imap.connect`), examine the folder, and hand back its socket
    ready for IDLE; raises `IdleUnsupported` when the server lacks IDLE."""
    client = imap.connect(settings)
    try:
        capabilities = {_text(c).upper() for c in client.capabilities()}
        if IDLE_CAPABILITY not in capabilities:
            raise IdleUnsupported(f"server {settings.host} does not offer IDLE")
        selected = client.select_folder(folder, readonly=True)
        mailbox = Mailbox(
            folder=folder,
            uidvalidity=int(selected.get(b"UIDVALIDITY", 0)),
            uidnext=int(selected.get(b"UIDNEXT", 0)),
            exists=int(selected.get(b"EXISTS", 0)),
        )
        return IdleConnection(client, mailbox)
    except BaseException:
        imap.shutdown(client)
        raise


class IdleConnection:
    """One examined folder in IDLE: `start`, then `changes` until it returns, then `close`."""

    def __init__(self, client: IMAPClient, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self._client = client  # owns the socket; kept so nothing closes it under us
        self._sock: socket.socket = client.socket()
        self._sock.setblocking(False)
        _keepalive(self._sock)
        self._buffer = bytearray()
        self._tag = b""

    async def start(self, *, timeout: float = ANSWER_TIMEOUT) -> set[str]:
        """Send IDLE and wait for the server's go-ahead; returns the kinds of untagged
        responses that came first (a change may be reported before the go-ahead)."""
        tag = self._tag = b"I%d" % next(_TAGS)
        await self._send(tag + b" IDLE\r\n")
        return await self._until(lambda line: line.startswith((b"+", tag + b" ")), timeout)

    async def changes(
        self, *, renew_seconds: float = RENEW_SECONDS, timeout: float = ANSWER_TIMEOUT
    ) -> set[str]:
        """Wait until the server reports a change that triggers a sync; returns the kinds of
        everything it reported meanwhile (a burst comes back as one answer). IDLE is renewed
        every `renew_seconds`, and a server that does not answer the renewal is taken for dead."""
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        renew_at = loop.time() + renew_seconds
        while True:
            wait = renew_at - loop.time()
            if wait <= 0:
                seen |= await self._renew(timeout)
                renew_at = loop.time() + renew_seconds
            else:
                try:
                    line = await self._line(wait)
                except TimeoutError:
                    continue
                seen.add(_kind(line))
            if seen & TRIGGERS and not await self._more_waiting():
                return seen

    async def close(self, *, timeout: float = 2.0) -> None:
        """End IDLE and log out politely when the server still answers, then close the socket."""
        try:
            if self._tag:
                await self._send(b"DONE\r\nL" + self._tag + b" LOGOUT\r\n")
                await self._until(lambda line: line.startswith(b"L" + self._tag + b" "), timeout)
        except (OSError, TimeoutError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket at once (a dead connection, or shutting down)."""
        imap.shutdown(self._client)
        self._sock.close()

    async def _renew(self, timeout: float) -> set[str]:
        await self._send(b"DONE\r\n")
        done = self._tag + b" "
        seen = await self._until(lambda line: line.startswith(done), timeout)
        return seen | await self.start(timeout=timeout)

    async def _until(self, last: Callable[[bytes], bool], timeout: float) -> set[str]:
        """Read lines until `last(line)`; the kinds of the untagged ones before it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen: set[str] = set()
        while True:
            try:
                line = await self._line(deadline - loop.time())
            except TimeoutError:
                raise IdleLost("the server did not answer in time") from None
            if last(line):
                if not line.startswith(b"+") and line.split(b" ", 2)[1:2] != [b"OK"]:
                    raise MailpipeError(f"the server refused IDLE: {_text(line[:200])}")
                return seen
            seen.add(_kind(line))

    async def _line(self, timeout: float) -> bytes:
        """One response line, with any literals it carries; raises TimeoutError."""
        async with asyncio.timeout(max(timeout, 0)):
            while True:
                end = self._buffer.find(b"\r\n")
                if end >= 0:
                    literal = LITERAL.search(self._buffer, 0, end)
                    if literal is None:
                        line = bytes(self._buffer[:end])
                        del self._buffer[: end + 2]
                        if _kind(line) == "BYE":
                            raise IdleLost("the server said BYE")
                        return line
                    if len(self._buffer) >= end + 2 + int(literal.group(1)) + 2:
                        # the literal is here: fold it into the line and look for its end
                        size = int(literal.group(1))
                        del self._buffer[literal.start() : end + 2 + size]
                        continue
                await self._receive()

    async def _more_waiting(self) -> bool:
        """Whether another response line is already here or readable without waiting."""
        if b"\r\n" in self._buffer:
            return True
        try:
            data = self._sock.recv(READ_BYTES)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        if not data:
            raise IdleLost("the server closed the connection")
        self._buffer += data
        return True

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = self._sock.recv(READ_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                await _ready(loop.add_reader, loop.remove_reader, self._sock)
                continue
            if not data:
                raise IdleLost("the server closed the connection")
            self._buffer += data
            return

    async def _send(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view) :]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                await _ready(loop.add_writer, loop.remove_writer, self._sock)


async def _ready(
    add: Callable[[socket.socket, Callable[[], None]], None],
    remove: Callable[[socket.socket], object],
    sock: socket.socket,
) -> None:
    """Wait until the selector says the socket is ready (readable or writable)."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    add(sock, wake)
    try:
        await future
    finally:
        remove(sock)


def _kind(line: bytes) -> str:
    """EXISTS for `* 3 EXISTS`, OK for `* OK Still here`; empty for what is not untagged."""
    if not line.startswith(b"* "):
        return ""
    words = line.split(b" ", 3)
    word = words[2] if len(words) > 2 and words[1].isdigit() else words[1]
    return _text(word).upper()


def _keepalive(sock: socket.socket) -> None:
    """TCP keep-alive, so a peer that vanished without a word is noticed by the kernel too."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in TCP_KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value
