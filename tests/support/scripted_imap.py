"""A tiny scripted IMAP server on 127.0.0.1:0 that answers a canned conversation.

Real servers misbehave in ways Dovecot never will: BAD to an ordinary command, a literal where
none belongs, a literal that announces more bytes than follow before the connection closes.
`ScriptedImap` plays a normal mailbox of two messages (greeting, CAPABILITY, LOGIN, EXAMINE,
UID FETCH, LOGOUT) unless a test replaces the answer to one command:

    with ScriptedImap({"EXAMINE": lambda tag, args: tag + b" BAD [CLIENTBUG] no\\r\\n"}) as server:
        ...  # connect to server.port

An answer is bytes to send; `Close(data)` sends data and then closes the connection.
Every connection is served by its own thread; `connections` and `commands` record what came.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

HOST = "127.0.0.1"
GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] scripted server ready\r\n"
CAPABILITIES = b"IMAP4rev1 AUTH=PLAIN"
UIDVALIDITY = 7
READ_TIMEOUT = 30.0
JOIN_TIMEOUT = 5.0
CLIENT_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
UID_SET = re.compile(rb"UID FETCH (\S+)", re.IGNORECASE)


def mail(uid: int) -> bytes:
    """A small well-formed message numbered uid."""
    return (
        b"From: Absender <absender@example.org>\r\n"
        b"To: empfaenger@example.org\r\n"
        b"Subject: Nachricht %d\r\n"
        b"Message-ID: <scripted-%d@example.org>\r\n"
        b"\r\n"
        b"Inhalt %d\r\n" % (uid, uid, uid)
    )


MAILBOX = {uid: mail(uid) for uid in (1, 2)}


@dataclass(frozen=True)
class Close:
    """An answer after which the server closes the connection."""

    data: bytes = b""


Answer = bytes | Close
Reply = Callable[[bytes, bytes], Answer]


def tagged(tag: bytes, text: bytes) -> bytes:
    return tag + b" " + text + b"\r\n"


def capability(tag: bytes, args: bytes) -> Answer:
    return b"* CAPABILITY " + CAPABILITIES + b"\r\n" + tagged(tag, b"OK CAPABILITY done")


def login(tag: bytes, args: bytes) -> Answer:
    return tagged(tag, b"OK [CAPABILITY " + CAPABILITIES + b"] logged in")


def examine(tag: bytes, args: bytes) -> Answer:
    return (
        b"* FLAGS (\\Seen \\Answered)\r\n"
        b"* %d EXISTS\r\n"
        b"* 0 RECENT\r\n"
        b"* OK [UIDVALIDITY %d] UIDs valid\r\n"
        b"* OK [UIDNEXT %d] predicted next UID\r\n" % (len(MAILBOX), UIDVALIDITY, max(MAILBOX) + 1)
    ) + tagged(tag, b"OK [READ-ONLY] EXAMINE completed")


def uid_fetch(tag: bytes, args: bytes) -> Answer:
    """Sizes for `UID FETCH n:* (UID RFC822.SIZE)`, bodies for `UID FETCH 1:2 (... BODY.PEEK[])`."""
    lines = []
    for seq, (uid, body) in enumerate(sorted(MAILBOX.items()), 1):
        if b"BODY" in args.upper():
            lines.append(
                b'* %d FETCH (UID %d FLAGS () INTERNALDATE "28-Nov-2026 10:00:00 +0000" '
                b"BODY[] {%d}\r\n%s)\r\n" % (seq, uid, len(body), body)
            )
        else:
            lines.append(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (seq, uid, len(body)))
    return b"".join(lines) + tagged(tag, b"OK UID FETCH completed")


def logout(tag: bytes, args: bytes) -> Answer:
    return Close(b"* BYE logging out\r\n" + tagged(tag, b"OK LOGOUT completed"))


def noop(tag: bytes, args: bytes) -> Answer:
    return tagged(tag, b"OK NOOP completed")


DEFAULT_REPLIES: dict[str, Reply] = {
    "CAPABILITY": capability,
    "LOGIN": login,
    "AUTHENTICATE": login,
    "EXAMINE": examine,
    "SELECT": examine,
    "UID FETCH": uid_fetch,
    "NOOP": noop,
    "LOGOUT": logout,
}


class ScriptedImap:
    """The server: `start()` (or `with`) listens; `close()` stops it and every connection."""

    def __init__(self, replies: Mapping[str, Reply] | None = None, *, greeting: bytes = GREETING):
        self.replies = {**DEFAULT_REPLIES, **(replies or {})}
        self.greeting = greeting
        self.connections = 0
        self.commands: list[str] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the scripted server is not started")
        return self._listener.getsockname()[1]

    def start(self) -> ScriptedImap:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        thread = threading.Thread(target=self._accept, name="scripted-imap", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()

    def wait_idle(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Until every connection has ended: a client that does not wait for LOGOUT's answer
        has returned before the server has read the LOGOUT."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._sockets:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError("a scripted connection is still open")
            time.sleep(0.01)

    def __enter__(self) -> ScriptedImap:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._sockets.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        """Greet, then answer one command line at a time until a Close or the client leaves."""
        conn.settimeout(READ_TIMEOUT)
        reader = conn.makefile("rb")
        try:
            conn.sendall(self.greeting)
            while not self._stopping.is_set():
                line = self._command(conn, reader)
                if not line:
                    return
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                words = rest.split(b" ", 2)
                name = words[0].upper().decode("ascii", "replace")
                if name == "UID" and len(words) > 1:
                    name = f"UID {words[1].upper().decode('ascii', 'replace')}"
                with self._lock:
                    self.commands.append(name)
                reply = self.replies.get(name)
                answer = reply(tag, rest) if reply else tagged(tag, b"BAD unknown command")
                if isinstance(answer, Close):
                    conn.sendall(answer.data)
                    return
                conn.sendall(answer)
        except OSError:
            return
        finally:
            reader.close()
            with self._lock:
                self._sockets.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _command(self, conn: socket.socket, reader) -> bytes:
        """One command with its literals (LOGIN may send the password as one) read whole."""
        line = reader.readline()
        command = line
        while (match := CLIENT_LITERAL.search(line)) is not None:
            conn.sendall(b"+ go ahead\r\n")
            command += reader.read(int(match.group(1)))
            line = reader.readline()
            command += line
        return command
