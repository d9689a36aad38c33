"""What the commands share: exit codes, the parser class, passwords, users and the database."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mailpipe.errors import MailpipeError, NotFound

if TYPE_CHECKING:  # the parsers are built without the database: the commands import it
    from sqlalchemy.orm import Session, sessionmaker

    from mailpipe.crypto import DataKey
    from mailpipe.models import User
    from mailpipe.settings import Settings

EXIT_FAILURE = 1
EXIT_USAGE = 2
MAX_ID = 2**63 - 1  # the largest row id the databases hold (BIGINT)
MAX_PORT = 65_535
MAX_LIMIT = 1_000  # rows a listing command prints at most
MAX_PROCESSES = 1_024
SECURITY_MODES = ("tls", "starttls", "none")  # mailpipe.imap's, without loading IMAP for a parser


class OutputLost(Exception):
    """Writing the command's output failed: its reader went away, or its disk is full."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class StrictParser(argparse.ArgumentParser):
    """No abbreviations (`--password x` must not pass for `--password-env x`), and a bad
    command line is one line naming the option, not a usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def count(*, minimum: int = 1, maximum: int = MAX_ID) -> Callable[[str], int]:
    """An option's whole number within bounds (ports, intervals, limits, ids)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"from {minimum} to {maximum}, not {value}")
        return value

    return parse


def amount(*, maximum: float) -> Callable[[str], float]:
    """An option's positive finite number up to a bound (hours, seconds): no nan, no inf."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number, not {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise argparse.ArgumentTypeError(f"above 0 and at most {maximum:g}, not {text}")
        return value

    return parse


def nonempty(value: str) -> str:
    """A name or host: not empty, not only spaces."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


port = count(maximum=MAX_PORT)
row_id = count()


def password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        type=nonempty,
        help="variable with the mailpipe user's password (default: prompt; not asked for "
        "when a key file of theirs is in MAILPIPE_OWNER_KEY_DIR)",
    )


def secret(
    variable: str | None, prompt: str, *, option: str = "--password-env VAR", confirm: bool = False
) -> str:
    """A password from the named environment variable, or typed at a prompt; never an argument.

    `option` is the command's option that names the variable, said when there is no terminal.
    """
    if variable:
        return variable_secret(variable)
    if not sys.stdin.isatty():
        raise MailpipeError(f"{prompt.rstrip(': ')}: no terminal to ask; use {option}")
    import getpass

    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != value:
        raise MailpipeError("the two entries differ")
    return value


def variable_secret(variable: str) -> str:
    """The value of the environment variable the operator named for a password."""
    value = os.environ.get(variable)
    if value is None:
        raise MailpipeError(f"environment variable {variable} is not set")
    return value


def open_database(settings: Settings) -> sessionmaker[Session]:
    """The settings' database, migrated."""
    from mailpipe import db

    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    return db.session_factory(engine)


def unlock(
    sessions: sessionmaker[Session], name: str, password_env: str | None, *, key_dir: Path
) -> tuple[User, DataKey]:
    """The user and their data key: from a key file of theirs in `key_dir` (the owner of
    `mailpipe sync`'s mail, who may have no password), else from their password."""
    from mailpipe import keyfiles
    from mailpipe.accounts import unlock_user

    with sessions.begin() as session:  # an old-form wrap is re-wrapped and kept
        user = find_user(session, name)
        key = keyfiles.unlock(session, user, key_dir)
        if key is not None:
            return user, key
        password = secret(password_env, f"password for {name}: ")
        return unlock_user(session, name, password)


def find_user(session: Session, name: str) -> User:
    from sqlalchemy import select

    from mailpipe.models import User

    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def run_until_stopped(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived coroutine until it ends or Ctrl-C / SIGTERM cancel it, which is a clean
    end: its `finally` blocks close connections and give leases back."""
    import asyncio
    import signal

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, task.cancel)
        try:
            await main
        except asyncio.CancelledError:
            return

    asyncio.run(guarded())


def instant(text: str) -> datetime:
    """An argparse type: a date (midnight UTC) or an ISO 8601 time with its offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is not None and len(text) == 10:  # a plain date
        moment = moment.replace(tzinfo=UTC)
    if moment is None or moment.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (2026-01-31) or a time with its offset (…T08:00+01:00)"
        )
    return moment.astimezone(UTC)


@contextlib.contextmanager
def start_up() -> Iterator[None]:
    """Load and open what a command needs with the cyclic collector off, then freeze it.

    Start-up makes a few hundred thousand objects and frees almost none: collections during it
    find nothing (~50 ms of a sync's start), and the full collections that the thousands of
    messages of a sync set off later would walk it all again (the sync ran ~1.4x slower)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
