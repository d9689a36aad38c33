"""Folder roles: `@sent` or `@archive` instead of a name that differs from server to server."""

from __future__ import annotations

from collections.abc import Sequence

from .vocabulary import FolderRole

ROLE_PREFIX = "@"
# RFC 6154 SPECIAL-USE attributes, as LIST returns them
SPECIAL_USE = {
    b"\\sent": FolderRole.SENT,
    b"\\drafts": FolderRole.DRAFTS,
    b"\\trash": FolderRole.TRASH,
    b"\\junk": FolderRole.JUNK,
    b"\\archive": FolderRole.ARCHIVE,
    b"\\all": FolderRole.ALL,
    b"\\flagged": FolderRole.FLAGGED,
}
# the names servers and mail programs commonly give folders without SPECIAL-USE (lower case,
# last hierarchy level), German ones included
COMMON_NAMES = {
    "inbox": FolderRole.INBOX,
    "sent": FolderRole.SENT,
    "sent items": FolderRole.SENT,
    "sent messages": FolderRole.SENT,
    "sent mail": FolderRole.SENT,
    "gesendet": FolderRole.SENT,
    "gesendete objekte": FolderRole.SENT,
    "gesendete elemente": FolderRole.SENT,
    "drafts": FolderRole.DRAFTS,
    "entwürfe": FolderRole.DRAFTS,
    "trash": FolderRole.TRASH,
    "deleted items": FolderRole.TRASH,
    "deleted messages": FolderRole.TRASH,
    "papierkorb": FolderRole.TRASH,
    "gelöschte objekte": FolderRole.TRASH,
    "gelöschte elemente": FolderRole.TRASH,
    "spam": FolderRole.JUNK,
    "junk": FolderRole.JUNK,
    "junk e-mail": FolderRole.JUNK,
    "junk-e-mail": FolderRole.JUNK,
    "archive": FolderRole.ARCHIVE,
    "archiv": FolderRole.ARCHIVE,
    "all mail": FolderRole.ALL,
    "alle nachrichten": FolderRole.ALL,
}
# roles a wildcard leaves out: Gmail's "All Mail" holds every message of every other folder
NOT_BY_WILDCARD = frozenset({FolderRole.ALL})


def role_of(flags: Sequence[bytes], name: str, delimiter: str | None) -> FolderRole | None:
    """A folder's role from its SPECIAL-USE attribute, else from its common name."""
    for flag in flags:
        role = SPECIAL_USE.get(flag.lower())
        if role is not None:
            return role
    leaf = name.rsplit(delimiter, 1)[-1] if delimiter else name
    return COMMON_NAMES.get(leaf.strip().lower())


def requested_role(name: str) -> FolderRole | None:
    """The role a folder request such as "@sent" names; None for a plain name or pattern (a
    folder really called "@work" stays a name)."""
    if not name.startswith(ROLE_PREFIX):
        return None
    try:
        return FolderRole(name[len(ROLE_PREFIX) :].lower())
    except ValueError:
        return None
