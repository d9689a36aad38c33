"""A lean reader for UID FETCH responses: literals are sliced, never tokenised byte by byte.

IMAPClient parses every FETCH response with a general lexer, which costs more CPU than the rest
of a sync together; mail bodies only need their literal read whole. Everything but the FETCH
itself still goes through IMAPClient.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from imapclient.datetime_util import parse_to_datetime
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from .errors import ProtocolError

LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
TOKEN = re.compile(rb'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()"]+')
FETCH_START = re.compile(rb"\* \d+ FETCH \(", re.IGNORECASE)
NIL = b"NIL"
MALFORMED_FETCH = "the server sent a FETCH response that is not valid IMAP"
UID_ITEM = re.compile(rb"[ (]UID (\d+)", re.IGNORECASE)
SIZE_ITEM = re.compile(rb"RFC822\.SIZE (\d+)", re.IGNORECASE)
SIZE_ANSWER = re.compile(rb"\* \d+ FETCH \(UID (\d+) RFC822\.SIZE (\d+)\)\r\n", re.IGNORECASE)
FLAGS_ITEM = re.compile(rb"FLAGS \(([^)]*)\)", re.IGNORECASE)
DATE_ITEM = re.compile(rb'INTERNALDATE "([^"]*)"', re.IGNORECASE)
BODY_NIL = re.compile(rb"BODY\[\] NIL", re.IGNORECASE)
QUOTED_NAME = re.compile(rb'"((?:[^"\\]|\\.)*)"')
VANISHED = re.compile(rb"\* VANISHED (?:\(EARLIER\) )?([0-9:,]+)", re.IGNORECASE)
MONTHS = {
    name.encode(): number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


@dataclass(slots=True)
class FetchedMessage:
    """One message as the server sent it (`body` is empty when only the size was asked)."""

    uid: int
    body: bytes
    flags: tuple[bytes, ...]
    internal_date: datetime | None
    size: int


class ImapConnection(Protocol):
    """What the reader uses of an imaplib connection (`_new_tag` is imaplib's own, unstubbed)."""

    tagged_commands: dict[bytes, list[bytes] | None]

    def _new_tag(self) -> bytes: ...
    def send(self, data: bytes) -> None: ...
    def readline(self) -> bytes: ...
    def read(self, size: int) -> bytes: ...


class Literal(bytes):
    """A literal's bytes, kept apart from atoms so that a body is never mistaken for one."""


@dataclass(slots=True)
class FlagReport:
    """What a flag fetch told: each listed message's flags by UID, and the UIDs reported gone."""

    flags: dict[int, tuple[bytes, ...]]
    vanished: set[int]


def fetch_messages(
    imap: ImapConnection, uids: Sequence[int] | str, items: str
) -> dict[int, FetchedMessage]:
    """Run `UID FETCH uids (items)` on an imaplib connection and read the answers directly.

    `uids` is a list of UIDs or a UID set such as "101:*". Messages expunged since the UIDs were
    listed are simply absent from the result.
    """
    uid_set = uids if isinstance(uids, str) else _uid_set(uids)
    messages: dict[int, FetchedMessage] = {}
    for parts in command(imap, b"UID FETCH %s (%s)" % (uid_set.encode(), items.encode())):
        if (message := _message(parts)) is not None:
            messages[message.uid] = message
    return messages


def fetch_sizes(imap: ImapConnection, uid_set: str) -> dict[int, int]:
    """Run `UID FETCH uid_set (UID RFC822.SIZE)`: each message's size by UID. An answer in the
    order asked is read with one regular expression (10,000 of them are the start of every
    initial sync); any other shape goes through the general reader."""
    sizes: dict[int, int] = {}
    for parts in command(imap, b"UID FETCH %s (UID RFC822.SIZE)" % uid_set.encode()):
        if len(parts) == 1 and (answer := SIZE_ANSWER.fullmatch(parts[0])) is not None:
            sizes[int(answer.group(1))] = int(answer.group(2))
        elif (message := _message(parts)) is not None:
            sizes[message.uid] = message.size
    return sizes


def fetch_batches(
    imap: ImapConnection, batches: Sequence[Sequence[int]], items: str
) -> Generator[dict[int, FetchedMessage], None, None]:
    """`fetch_messages` of each batch of UIDs in turn, each batch's command sent before the
    previous one's answer is read (RFC 3501 5.5): the server reads and sends batch k+1 while
    this process handles batch k, and a distant server costs no round trip per batch.

    Answers are told apart by UID, so a server that interleaves them loses nothing. Leaving
    early leaves an answer unread: the connection is then only fit to be logged out.
    """
    tags: list[bytes] = []
    early: dict[int, FetchedMessage] = {}  # answers that came before their batch's turn
    done: dict[bytes, bytes] = {}  # commands the server completed before their turn

    def send(batch: Sequence[int]) -> None:
        tag = imap._new_tag()
        imap.send(b"%s UID FETCH %s (%s)\r\n" % (tag, _uid_set(batch).encode(), items.encode()))
        tags.append(tag)

    try:
        if batches:
            send(batches[0])
        for number, batch in enumerate(batches):
            if number + 1 < len(batches):
                send(batches[number + 1])
            wanted = set(batch)
            messages = {uid: early.pop(uid) for uid in wanted & early.keys()}
            tag = tags[number]
            while tag not in done:
                parts = _read_response(imap)
                head = parts[0]
                if head.startswith(b"* BYE"):
                    raise IMAPClientAbortError(_said(head))
                if (ours := head.split(b" ", 1)[0]) in tags:
                    done[ours] = head
                    continue
                if (message := _message(parts)) is not None:
                    (messages if message.uid in wanted else early)[message.uid] = message
            if _status(done[tag], tag) != b"OK":
                raise IMAPClientError(f"UID FETCH failed: {_said(done[tag])}")
            yield messages
    finally:
        for tag in tags:
            imap.tagged_commands.pop(tag, None)


def _message(parts: list[bytes]) -> FetchedMessage | None:
    """The message a FETCH response carries; None for any other response, or none."""
    if not FETCH_START.match(parts[0]):
        return None
    try:
        return _fetched(parts)
    except (ValueError, KeyError, IndexError, TypeError):
        raise ProtocolError(MALFORMED_FETCH) from None


def fetch_flags(
    imap: ImapConnection, request: str, *, highest: int, first: bytes | None = None
) -> FlagReport:
    """Run a flag fetch such as `UID FETCH 1:500 (UID FLAGS) (CHANGEDSINCE 7 VANISHED)` or
    `FETCH 901:* (UID FLAGS)` and read each message's flags and any VANISHED answer (UIDs above
    `highest` are left out of it: nothing is stored there, and a range stays bounded). A
    `first` command (ENABLE QRESYNC) goes out with it in one round trip."""
    report = FlagReport(flags={}, vanished=set())
    for parts in command(imap, request.encode(), first=first):
        head = parts[0]
        if FETCH_START.match(head):
            uid = UID_ITEM.search(head)
            flags = FLAGS_ITEM.search(head)
            if uid is None or flags is None:
                continue  # not about flags (or a message without its UID): nothing to learn
            report.flags[int(uid.group(1))] = tuple(flags.group(1).split())
        elif (vanished := VANISHED.match(head)) is not None:
            try:
                report.vanished.update(uid_set_members(vanished.group(1), highest=highest))
            except ValueError:
                raise ProtocolError(MALFORMED_FETCH) from None
    return report


class FirstRefused(IMAPClientError):  # type: ignore[misc]  # imapclient ships no types
    """The command sent ahead of another was refused (the other's answer has been read)."""


def command(
    imap: ImapConnection, text: bytes, *, first: bytes | None = None
) -> Iterator[list[bytes]]:
    """Send one tagged command and yield each untagged response until it completes.

    For what imaplib cannot say or read fast: FETCH, and ENABLE in the selected state (which
    imaplib refuses although servers accept it). A NO or BAD raises IMAPClientError. A `first`
    command is sent ahead in the same write (pipelined, RFC 3501 5.5): its untagged answers are
    skipped, and its refusal raises `FirstRefused` once this command's answer is read too.
    """
    ahead = imap._new_tag() if first is not None else None
    tag = imap._new_tag()
    lines = b"%s %s\r\n" % (ahead, first) if ahead is not None else b""
    pending = ahead is not None  # the first command's answer is still to come
    refused: IMAPClientError | None = None
    try:
        imap.send(lines + b"%s %s\r\n" % (tag, text))
        while True:
            parts = _read_response(imap)
            head = parts[0]
            if pending and ahead is not None and head.startswith(ahead + b" "):
                if _status(head, ahead) != b"OK":
                    refused = FirstRefused(f"{_name(first or b'')} failed: {_said(head)}")
                pending = False
                continue
            if head.startswith(tag + b" "):
                if refused is not None:
                    raise refused
                if _status(head, tag) != b"OK":
                    raise IMAPClientError(f"{_name(text)} failed: {_said(head)}")
                return
            if head.startswith(b"* BYE"):
                raise IMAPClientAbortError(_said(head))
            if not pending:
                yield parts
    finally:
        for used in (ahead, tag):
            if used is not None:
                imap.tagged_commands.pop(used, None)


def pipelined(imap: ImapConnection, texts: Sequence[bytes]) -> list[list[bytes]]:
    """Send several commands in one write and read every answer (one round trip, RFC 3501
    5.5); return the untagged responses in the order they came. Servers may interleave the
    answers of commands they run in parallel, so the caller tells them apart by what they
    name, not by position; a command refused leaves only its absence."""
    tags = [imap._new_tag() for _ in texts]
    pending = set(tags)
    untagged: list[list[bytes]] = []
    try:
        imap.send(b"".join(b"%s %s\r\n" % pair for pair in zip(tags, texts, strict=True)))
        while pending:
            parts = _read_response(imap)
            head = parts[0]
            tag = head.split(b" ", 1)[0]
            if tag in pending:
                pending.discard(tag)
            elif head.startswith(b"* BYE"):
                raise IMAPClientAbortError(_said(head))
            else:
                untagged.append(parts)
    finally:
        for tag in tags:
            imap.tagged_commands.pop(tag, None)
    return untagged


def status_answer(parts: list[bytes]) -> tuple[bytes, dict[bytes, int]] | None:
    """The mailbox name (as on the wire, unquoted) and items of an untagged STATUS response."""
    head = parts[0]
    if head[:9].upper() != b"* STATUS ":
        return None
    if len(parts) == 3:  # the name as a literal
        name, rest = bytes(parts[1]), parts[2]
    else:
        text = head[9:]
        quoted = QUOTED_NAME.match(text)
        if quoted is not None:
            name = quoted.group(1).replace(b'\\"', b'"').replace(b"\\\\", b"\\")
            rest = text[quoted.end() :]
        else:
            name, _, rest = text.partition(b" ")
    opening, closing = rest.find(b"("), rest.rfind(b")")
    words = rest[opening + 1 : closing].split() if 0 <= opening < closing else []
    try:
        items = {
            key.upper(): int(value) for key, value in zip(words[::2], words[1::2], strict=True)
        }
    except ValueError:
        return None
    return name, items


def _status(head: bytes, tag: bytes) -> bytes:
    return head[len(tag) + 1 :].split(b" ", 1)[0].upper()


def _name(text: bytes) -> str:
    """A command's name for messages: `UID FETCH`, `ENABLE` (never its arguments)."""
    words = text.split(b" ", 2)
    return b" ".join(words[:2] if words[0].upper() == b"UID" else words[:1]).decode(
        errors="replace"
    )


def _said(head: bytes) -> str:
    return head.decode(errors="replace").strip()


def _read_response(imap: ImapConnection) -> list[bytes]:
    """One server response: text pieces with each literal in between, as read from the wire
    (so the literals are the odd items, kept as read: a body is never copied here)."""
    parts: list[bytes] = []
    while True:
        line = imap.readline()
        if not line:
            raise IMAPClientAbortError("server closed the connection during FETCH")
        match = LITERAL_AT_END.search(line)
        if match is None:
            parts.append(line)
            return parts
        parts.append(line[: match.start()])
        size = int(match.group(1))
        data = imap.read(size)
        if len(data) != size:
            raise IMAPClientAbortError("server closed the connection inside a literal")
        parts.append(data)


def _fetched(parts: list[bytes]) -> FetchedMessage | None:
    """The common shapes (one literal, the BODY[] one; no quoted string but INTERNALDATE) are
    read with a few regular expressions; anything else goes through the general tokeniser."""
    text = parts[0] if len(parts) == 1 else parts[0] + b" " + parts[-1]
    if len(parts) <= 3 and text.count(b'"') <= 2 and (len(parts) == 1 or _body_follows(parts[0])):
        return _fetched_fast(parts, text)
    return _fetched_general(parts)


def _body_follows(head: bytes) -> bool:
    return head.rstrip().upper().endswith(b"BODY[]")


def _fetched_fast(parts: list[bytes], text: bytes) -> FetchedMessage | None:
    uid = UID_ITEM.search(text)
    size = SIZE_ITEM.search(text)
    body = parts[1] if len(parts) == 3 else b""
    if uid is None or (size is None and not body and not BODY_NIL.search(text)):
        return _fetched_general(parts)
    if size is None and not body:
        return None  # BODY[] NIL: the message is gone
    flags = FLAGS_ITEM.search(text)
    date = DATE_ITEM.search(text)
    return FetchedMessage(
        uid=int(uid.group(1)),
        body=body,
        flags=tuple(flags.group(1).split()) if flags else (),
        internal_date=internal_date(date.group(1)) if date else None,
        size=int(size.group(1)) if size else len(body),
    )


def _fetched_general(parts: list[bytes]) -> FetchedMessage | None:
    items = _parse_items(parts)
    fields = dict(zip(items[::2], items[1::2], strict=False))
    uid = fields.get(b"UID")
    body = fields.get(b"BODY[]", b"")
    size = fields.get(b"RFC822.SIZE")
    if uid is None or (size is None and not isinstance(body, Literal)):
        return None  # an unsolicited flag update, or a message gone since (BODY[] NIL)
    date = fields.get(b"INTERNALDATE")
    flags = fields.get(b"FLAGS")
    return FetchedMessage(
        uid=int(uid),
        body=bytes(body) if body else b"",
        flags=tuple(flags) if isinstance(flags, list) else (),
        internal_date=internal_date(date) if date else None,
        size=int(size) if size is not None else len(body),
    )


def internal_date(value: bytes) -> datetime | None:
    """INTERNALDATE ("28-Nov-2026 20:56:56 +0100"), read without the email package's parser."""
    try:
        day, month, rest = value.strip().split(b"-", 2)
        year, clock, zone = rest.split(b" ")
        hour, minute, second = clock.split(b":")
        return datetime(
            int(year),
            MONTHS[month.title()],
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=_zone(zone),
        )
    except (ValueError, KeyError):
        parsed: datetime | None = parse_to_datetime(value, normalise=False)
        return parsed


@functools.lru_cache(maxsize=64)
def _zone(zone: bytes) -> timezone:
    sign = -1 if zone[:1] == b"-" else 1
    if len(zone) != 5 or zone[:1] not in b"+-":
        raise ValueError("not a +HHMM zone")
    return timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5])))


def _parse_items(parts: list[bytes]) -> list[Any]:
    """The FETCH item list `(KEY value KEY value ...)` as Python values (bytes, Literal, None or
    a nested list, as the server sent them); keys upper-cased."""
    stack: list[list[Any]] = [[]]
    first = True
    for index, part in enumerate(parts):
        if index % 2:  # a literal: a value as it is, never an atom
            stack[-1].append(Literal(part))
            continue
        if first:
            opening = FETCH_START.match(part)
            assert opening is not None  # fetch_messages hands over FETCH responses only
            part = part[opening.end() - 1 :]
            first = False
        for token in TOKEN.findall(part):
            if token == b"(":
                stack.append([])
            elif token == b")":
                if len(stack) > 1:
                    done = stack.pop()
                    stack[-1].append(done)
            elif token[:1] == b'"':
                stack[-1].append(token[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\"))
            elif token.upper() == NIL:
                stack[-1].append(None)
            else:
                stack[-1].append(token)
    items = stack[0][0] if stack[0] and isinstance(stack[0][0], list) else stack[0]
    return [
        item.upper() if i % 2 == 0 and isinstance(item, bytes) else item
        for i, item in enumerate(items)
    ]


def _uid_set(uids: Sequence[int]) -> str:
    """A compact UID set: runs of consecutive UIDs become ranges."""
    ranges: list[str] = []
    ordered = sorted(uids)
    start = previous = ordered[0]
    for uid in ordered[1:]:
        if uid == previous + 1:
            previous = uid
            continue
        ranges.append(f"{start}:{previous}" if start != previous else str(start))
        start = previous = uid
    ranges.append(f"{start}:{previous}" if start != previous else str(start))
    return ",".join(ranges)


def uid_set_members(text: bytes, *, highest: int) -> list[int]:
    """The UIDs up to `highest` of a UID set such as b"5:7,9" (ranges in either order)."""
    uids: list[int] = []
    for part in text.split(b","):
        first, _, last = part.partition(b":")
        low, high = sorted((int(first), int(last or first)))
        uids.extend(range(low, min(high, highest) + 1))
    return uids
