"""What the commands share: exit codes, the parser class, passwords, users and the database."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailpipe import db
from mailpipe.accounts import unlock_user
from mailpipe.crypto import DataKey
from mailpipe.errors import MailpipeError, NotFound
from mailpipe.models import User
from mailpipe.settings import Settings

EXIT_FAILURE = 1
EXIT_USAGE = 2


class StrictParser(argparse.ArgumentParser):
    """No abbreviations: `--password x` must not pass for `--password-env x`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


def password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help="variable with the mailpipe user's password (default: prompt)",
    )


def secret(variable: str | None, prompt: str, *, confirm: bool = False) -> str:
    """A password from the named environment variable, or typed at a prompt; never an argument."""
    if variable:
        return variable_secret(variable)
    if not sys.stdin.isatty():
        raise MailpipeError(f"{prompt.rstrip(': ')}: no terminal to ask; use the -env option")
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
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    return db.session_factory(engine)


def unlock(
    sessions: sessionmaker[Session], name: str, password_env: str | None
) -> tuple[User, DataKey]:
    """The user and their data key, from their password."""
    password = secret(password_env, f"password for {name}: ")
    with sessions() as session:
        return unlock_user(session, name, password)


def find_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


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
