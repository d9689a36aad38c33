"""Folder names and Message-IDs kept from a database reader: a keyed hash to find them by, the
encrypted value to read them, both under the owner's data key.

A Message-ID names the sender's domain and often the user; a folder name says what the user
files. The hash is HMAC-SHA256 under a key HKDF derives from the data key (`DataKey.lookup_hash`),
so the server alone can neither compute nor confirm one; the ciphertext is AES-GCM bound to
table, column and row. Rows written before migration 0013 hold both in clear: the first run
that has the owner's key (a sync, a web login) converts them and clears the plain columns, and
every read takes whichever form a row has, so a half-converted database reads correctly.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session

from .crypto import DataKey
from .models import Email, FolderState, MailAccount

EMAILS = cast(Table, Email.__table__)
FOLDER_STATE = cast(Table, FolderState.__table__)
FOLDER = "folder"
MESSAGE_ID = "message_id"
CONVERT_CHUNK = 500
# Every account run makes this check (`convert_account`), so it is built once, on the table.
_CLEAR_STATES = select(FOLDER_STATE.c.id, FOLDER_STATE.c.folder).where(
    FOLDER_STATE.c.account_id == bindparam("account_id"), FOLDER_STATE.c.folder.is_not(None)
)


def folder_hash(key: DataKey, name: str) -> bytes:
    """The keyed hash a folder is found by (the same in emails and folder_state)."""
    return key.lookup_hash(name.encode(), purpose=FOLDER)


def message_id_hash(key: DataKey, message_id: str) -> bytes:
    """The keyed hash the same message is recognised by, in any folder."""
    return key.lookup_hash(message_id.encode(), purpose=MESSAGE_ID)


def state_row(account_id: int, hashed: bytes) -> str:
    """What a folder_state name is bound to: its unique key (the id is not known before the
    upsert that writes it), so a name moved to another row does not open."""
    return f"{account_id}.{hashed.hex()}"


def email_columns(
    key: DataKey,
    *,
    row_id: uuid.UUID,
    folder: str,
    message_id: str | None,
    hashed: bytes | None = None,
) -> dict[str, Any]:
    """The columns of an emails row that hold its folder and Message-ID (`hashed`: the folder's
    hash, when the caller has it already)."""
    return {
        "folder": None,
        "folder_hash": hashed or folder_hash(key, folder),
        "folder_enc": key.encrypt(folder.encode(), table="emails", column=FOLDER, row=row_id),
        "message_id": None,
        "message_id_hash": message_id_hash(key, message_id) if message_id else None,
        "message_id_enc": key.encrypt(
            message_id.encode(), table="emails", column=MESSAGE_ID, row=row_id
        )
        if message_id
        else None,
    }


def state_columns(key: DataKey, *, account_id: int, folder: str) -> dict[str, Any]:
    """The columns of a folder_state row that hold its folder's name."""
    hashed = folder_hash(key, folder)
    return {
        "folder": None,
        "folder_hash": hashed,
        "folder_enc": key.encrypt(
            folder.encode(),
            table="folder_state",
            column=FOLDER,
            row=state_row(account_id, hashed),
        ),
    }


def email_folder(key: DataKey, email: Email) -> str:
    """The folder an emails row is in, from either form."""
    return open_folder(key, row_id=email.id, clear=email.folder, sealed=email.folder_enc)


def open_folder(key: DataKey, *, row_id: uuid.UUID, clear: str | None, sealed: bytes | None) -> str:
    """The folder of an emails row read column by column, from either form."""
    if sealed is None:
        return clear or ""
    return key.decrypt(sealed, table="emails", column=FOLDER, row=row_id).decode()


def email_message_id(key: DataKey, email: Email) -> str | None:
    """The Message-ID of an emails row, from either form."""
    if email.message_id_enc is None:
        return email.message_id
    return key.decrypt(
        email.message_id_enc, table="emails", column=MESSAGE_ID, row=email.id
    ).decode()


def state_folder(
    key: DataKey, *, account_id: int, clear: str | None, hashed: bytes | None, sealed: bytes | None
) -> str:
    """The folder a folder_state row is about, from either form."""
    if sealed is None or hashed is None:
        return clear or ""
    return key.decrypt(
        sealed, table="folder_state", column=FOLDER, row=state_row(account_id, hashed)
    ).decode()


def in_folder(key: DataKey, name: str) -> ColumnElement[bool]:
    """Emails rows of a folder, converted or not."""
    return or_(Email.folder_hash == folder_hash(key, name), Email.folder == name)


def convert_account(session: Session, *, account_id: int, key: DataKey) -> int:
    """Hash and encrypt the clear folder names and Message-IDs of an account's rows from before
    0013 and clear them, in the caller's transaction; how many rows changed (0: none left).

    A sync writes emails and its folder's position in one transaction, so an account whose
    folder_state holds no clear name has no clear emails row either: that small check is all
    an account converted already costs.
    """
    states = session.execute(_CLEAR_STATES, {"account_id": account_id}).all()
    if not states:
        return 0
    changed = 0
    while True:
        rows = session.execute(
            select(Email.id, Email.folder, Email.message_id)
            .where(Email.account_id == account_id, Email.folder.is_not(None))
            .limit(CONVERT_CHUNK)
        ).all()
        if not rows:
            break
        session.execute(
            _converting(EMAILS, ("folder", "message_id")),
            [
                _bound(
                    row_id, email_columns(key, row_id=row_id, folder=str(folder), message_id=mid)
                )
                for row_id, folder, mid in rows  # folder: not None, as selected
            ],
        )
        changed += len(rows)
    session.execute(
        _converting(FOLDER_STATE, ("folder",)),
        [
            _bound(row_id, state_columns(key, account_id=account_id, folder=str(folder)))
            for row_id, folder in states  # folder: not None, as selected
        ],
    )
    return changed + len(states)


def convert_user(session: Session, *, user_id: int, key: DataKey) -> int:
    """`convert_account` for every account of a user (at a web login, which has the key)."""
    accounts = session.scalars(select(MailAccount.id).where(MailAccount.user_id == user_id))
    return sum(convert_account(session, account_id=a, key=key) for a in accounts.all())


def _converting(table: Table, clear: tuple[str, ...]) -> Any:
    """UPDATE of one row's name columns, skipped where another converter came first."""
    names = ["folder_hash", "folder_enc"]
    if "message_id" in clear:
        names += ["message_id_hash", "message_id_enc"]
    return (
        update(table)
        .where(table.c.id == bindparam("row_id"), table.c.folder.is_not(None))
        .values(
            {column: None for column in clear}
            | {column: bindparam(f"new_{column}") for column in names}
        )
        .execution_options(synchronize_session=False)
    )


def _bound(row_id: object, columns: dict[str, Any]) -> dict[str, Any]:
    """One row's parameters for `_converting`: its id and its new hash and ciphertext."""
    sealed = {f"new_{name}": value for name, value in columns.items() if value is not None}
    return {"row_id": row_id, "new_message_id_hash": None, "new_message_id_enc": None} | sealed
