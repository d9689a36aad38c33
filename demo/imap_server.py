"""A real IMAP server for the demo and the tests that needs nothing beyond PyPI: pymap on loopback.

`DemoServer(workdir=...)` runs pymap in a child process on 127.0.0.1 and a free port, plain text
(no TLS), with the users it is given (default demo/demo), and puts every `demo/mail/*.eml`
into each user's INBOX, in file-name order, with INTERNALDATE taken from the Date header.
`deliver()` is new mail arriving later: an IMAP APPEND as that user, so it gets the next UID.

Why pymap's in-memory ("dict") backend and not its maildir backend: maildir re-serialises each
message through Python's `mailbox` module, so BODY[] comes back with bare LF line ends, re-folded
headers and a garbage first line moved into the body, and RFC822.SIZE no longer matches BODY[];
the dict backend returns the bytes it was given. The stock dict backend knows a single user, so
this module adds a small subclass (backend "mailpipe-demo") that reads users from a JSON file,
and runs pymap's own command line with it: `python -m demo.imap_server` is the child side.
Everything lives in memory: each start is a fresh server with fresh UIDVALIDITY values.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import email.utils
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from imapclient import IMAPClient
from pymap.backend.dict import Config as DictConfig
from pymap.backend.dict import DictBackend, Identity, Login
from pymap.user import Passwords, UserMetadata
from pysasl.hashing import BuiltinHash

HOST = "127.0.0.1"
DEMO_DIR = Path(__file__).with_name("mail")
DEFAULT_USERS: Mapping[str, str] = {"demo": "demo"}
BACKEND = "mailpipe-demo"
SERVER_NAME = "mailpipe-demo"  # the greeting's host name; pymap would otherwise ask DNS for one
START_ATTEMPTS = 5
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
IMAP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
# pymap's default of 500,000 PBKDF2 rounds costs 0.25 s per LOGIN; demo passwords need no such cost.
PASSWORD_HASH_ROUNDS = 1_000
ADDRESS_IN_USE = "address already in use"
LOG_TAIL_CHARS = 4_000
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STDIN_FD = 0


class DemoServerError(RuntimeError):
    """The demo IMAP server did not start or stopped unexpectedly; the message holds its log."""


def demo_messages() -> dict[str, bytes]:
    """The demo mail by file name, in delivery order, byte for byte as the server returns it."""
    return {path.name: path.read_bytes() for path in sorted(DEMO_DIR.glob("*.eml"))}


def free_port(host: str = HOST) -> int:
    """Ask the kernel for a port that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def message_time(message: bytes) -> datetime | None:
    """The Date header as a datetime, so INTERNALDATE matches it; None when absent or unreadable."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
    value = headers.get("Date")
    if not isinstance(value, str):
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


class DemoServer:
    """pymap with our users and demo mail on loopback, so `make demo` needs no installed service."""

    host: str
    port: int
    users: dict[str, str]

    def __init__(self, *, workdir: Path, users: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.users = dict(DEFAULT_USERS if users is None else users)
        if not self.users or not all(isinstance(name, str) and name for name in self.users):
            raise ValueError("users must map at least one non-empty name to a password")
        self.host = HOST
        self.port = 0
        self._made_dirs: list[Path] = []
        self._root: Path | None = None
        self._log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The pymap process id while it runs, so callers can check that it is gone afterwards."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> DemoServer:
        try:
            self._start()
            for user in self.users:
                self._append(user, demo_messages().values(), folder="INBOX", dated=True)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def deliver(self, user: str, message: bytes, folder: str = "INBOX") -> None:
        """New mail arriving later: APPEND as the user (making the folder if needed), next UID."""
        self._append(user, [message], folder=folder, dated=False)

    def close(self) -> None:
        """Stop pymap and remove what this server created (its run directory, directories made)."""
        process, self._process = self._process, None
        if process is not None:
            _stop(process)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        for directory in self._made_dirs:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if still empty: someone else may have put files there
        self._made_dirs = []

    def _start(self) -> None:
        self._made_dirs = [d for d in (self.workdir, *self.workdir.parents) if not d.exists()]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix="pymap-demo-", dir=self.workdir))
        users_file = self._root / "users.json"
        fd = os.open(users_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            json.dump(self.users, out)
        self._log_path = self._root / "pymap.log"
        env = {**os.environ, "FQDN": SERVER_NAME, "PYTHONUNBUFFERED": "1"}
        # The demo package is never installed (it is not in the wheel): the child finds it here.
        paths = (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        for _ in range(START_ATTEMPTS):
            port = free_port(self.host)
            with open(self._log_path, "wb") as log:  # the child keeps its own descriptor
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-P",
                        "-m",
                        "demo.imap_server",
                        "--no-tls",
                        "--host",
                        self.host,
                        "--port",
                        str(port),
                        "--pid-file",
                        f"mailpipe-demo-{os.getpid()}-{port}",
                        BACKEND,
                        str(users_file),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._root,
                    env=env,
                )
            if self._wait_until_ready(port):
                self.port = port
                return
            _stop(self._process)
            self._process = None
        raise DemoServerError(f"no free port after {START_ATTEMPTS} attempts:\n{self._log_tail()}")

    def _wait_until_ready(self, port: int) -> bool:
        """True once pymap greets on the port; False if the port was taken meanwhile."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            status = self._process.poll()
            if status is not None:
                log = self._log_tail()
                if ADDRESS_IN_USE in log.lower():
                    return False
                raise DemoServerError(f"pymap exited with status {status}:\n{log}")
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, port), timeout=1.0) as sock:
                    greeting = sock.makefile("rb").readline()
                if greeting.startswith(b"* OK") and self._process.poll() is None:
                    return True
            if time.monotonic() > deadline:
                raise DemoServerError(
                    f"pymap did not greet on port {port} within {START_TIMEOUT:.0f} s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def _log_tail(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]

    @contextlib.contextmanager
    def _client(self, user: str) -> Iterator[IMAPClient]:
        """A logged-in connection as the user, logged out afterwards."""
        if self._process is None or self._process.poll() is not None:
            raise DemoServerError(f"the demo IMAP server is not running:\n{self._log_tail()}")
        if user not in self.users:
            raise KeyError(f"no such demo user: {user!r}")
        client = IMAPClient(self.host, port=self.port, ssl=False, timeout=IMAP_TIMEOUT)
        # imaplib sends an APPEND literal after the server's "+": with Nagle on, each waits ~40 ms.
        client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            password = self.users[user]
            if user.isascii() and password.isascii():
                client.login(user, password)
            else:  # imaplib sends LOGIN arguments as ASCII; AUTHENTICATE PLAIN carries UTF-8
                client.plain_login(user, password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def _append(self, user: str, messages: Iterable[bytes], *, folder: str, dated: bool) -> None:
        # imaplib turns bare LF or CR into CRLF on APPEND: only CRLF messages arrive unchanged.
        with self._client(user) as client:
            if folder.upper() != "INBOX" and not client.folder_exists(folder):
                client.create_folder(folder)
            for message in messages:
                client.append(folder, message, msg_time=message_time(message) if dated else None)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (pymap shuts down cleanly on it), SIGKILL if that takes too long; always reap."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()


class DemoBackend(DictBackend):
    """pymap's in-memory backend with users from a JSON file (the stock one has a single user)."""

    @classmethod
    def add_subparser(cls, name: str, subparsers: Any) -> ArgumentParser:
        parser: ArgumentParser = subparsers.add_parser(
            name, help="in-memory backend with the users of a JSON file"
        )
        parser.add_argument("users_file", metavar="USERS_JSON", help='{"name": "password", ...}')
        parser.set_defaults(demo_data=False, demo_user="", demo_password="")
        return parser

    @classmethod
    async def init(cls, args: Namespace, **overrides: Any) -> tuple[DemoBackend, DictConfig]:
        overrides.setdefault("hash_context", BuiltinHash(rounds=PASSWORD_HASH_ROUNDS))
        config = DictConfig.from_args(args, **overrides)
        login = Login(config)
        passwords = Passwords(config)
        users = json.loads(Path(args.users_file).read_text(encoding="utf-8"))
        for name, password in users.items():
            hashed = await passwords.hash_password(password)
            await Identity(name, login, None, frozenset()).set(
                UserMetadata(config, name, password=hashed)
            )
        return cls(login, config), config


def _stop_when_parent_goes() -> None:
    """Block until stdin (a pipe from DemoServer) closes, then shut down: no orphaned servers."""
    # os.read, not sys.stdin: a daemon thread blocked in a buffered read holds its lock and
    # makes interpreter shutdown wait a second and then abort.
    with contextlib.suppress(OSError):
        while os.read(STDIN_FD, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def serve() -> None:
    """The child side of DemoServer: pymap's own command line with the demo backend registered."""
    from pymap.backend import backends
    from pymap.main import main

    backends.add(BACKEND, DemoBackend)
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(STDIN_FD).st_mode):  # started by DemoServer, not by hand
            watch = threading.Thread(target=_stop_when_parent_goes, name="parent-watch")
            watch.daemon = True
            watch.start()
    sys.argv[0] = "pymap"
    main()


if __name__ == "__main__":
    serve()
