"""The database-against-server check: each folder's stored position against the server's STATUS.

It tells a user whether what mailpipe has is up to date, whether mail waits on the server,
and whether a folder was rebuilt (UIDVALIDITY changed) or is gone.
"""

from __future__ import annotations

from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from .. import store
from ..accounts import account_folders
from ..models import MailAccount
from ..sync import resolve_folders
from ..vocabulary import ErrorClass
from .checks import MAX_FOLDERS
from .probe import Probe, skipped
from .report import DATABASE, FAILED, OK, Check

NOT_SYNCED = "not_synced"
IN_SYNC = "in_sync"
NEW_MAIL = "new_mail_waiting"
UIDVALIDITY_CHANGED = "uidvalidity_changed"
MISSING = "missing_on_server"


def database(probe: Probe) -> Check:
    """Each folder's stored position (folder_state) against the server's STATUS."""
    if probe.sessions is None or probe.account_id is None or probe.key is None:
        return skipped(DATABASE, "no stored account to compare with")
    with probe.sessions() as session:
        account = session.get(MailAccount, probe.account_id)
        if account is None:
            return skipped(DATABASE, "the account is not in the database")
        configured = account_folders(account, probe.key)
        states = store.folder_states(session, probe.account_id, probe.key)
    wanted = resolve_folders(probe.client, configured)
    names = list(dict.fromkeys([*wanted, *states]))[:MAX_FOLDERS]
    folders = [_compare(probe.client, name, states.get(name)) for name in names]
    counts: dict[str, int] = {}
    for folder in folders:
        counts[folder["state"]] = counts.get(folder["state"], 0) + 1
    details = {"counts": counts, "folders": folders}
    gone = [f["folder"] for f in folders if f["state"] == MISSING and f["folder"] in wanted]
    if gone:
        reason = f"folder {gone[0]!r} is not on the server, so fetching it fails"
        return Check(DATABASE, FAILED, details, reason=reason, error_class=ErrorClass.UNKNOWN)
    return Check(DATABASE, OK, details)


def _compare(
    client: IMAPClient, folder: str, stored: store.FolderPosition | None
) -> dict[str, Any]:
    """In sync when the server's UIDNEXT is no further than what the last sync took."""
    database = (
        {"uidvalidity": stored.uidvalidity, "last_uid": stored.last_uid, "uidnext": stored.uidnext}
        if stored is not None
        else None
    )
    try:
        status = client.folder_status(folder, ("MESSAGES", "UIDNEXT", "UIDVALIDITY"))
    except IMAPClientAbortError:
        raise
    except IMAPClientError:
        return {"folder": folder, "state": MISSING, "database": database, "server": None}
    server = {
        "uidvalidity": status.get(b"UIDVALIDITY"),
        "uidnext": status.get(b"UIDNEXT"),
        "messages": status.get(b"MESSAGES"),
    }
    if stored is None:
        state = NOT_SYNCED
    elif stored.uidvalidity != server["uidvalidity"]:
        state = UIDVALIDITY_CHANGED
    elif (server["uidnext"] or 0) > max(stored.uidnext, stored.last_uid + 1):
        state = NEW_MAIL
    else:
        state = IN_SYNC
    return {"folder": folder, "state": state, "database": database, "server": server}
