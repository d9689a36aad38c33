"""The lean FETCH reader: common responses by regular expression, the rest by the tokeniser."""

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest
from imapclient.exceptions import IMAPClientError

from mailpipe.fetch import Literal, _fetched, _uid_set, fetch_batches, fetch_sizes, internal_date

SIZES = b"* 3 FETCH (UID 7 RFC822.SIZE 1234)\r\n"
DOVECOT = (
    b'* 3 FETCH (UID 7 FLAGS (\\Seen \\Flagged) INTERNALDATE "28-Nov-2026 20:56:56 +0000" BODY[] '
)


@pytest.mark.parametrize(
    ("parts", "uid", "body", "flags"),
    [
        ([SIZES], 7, b"", ()),
        ([DOVECOT, Literal(b"hello"), b")\r\n"], 7, b"hello", (b"\\Seen", b"\\Flagged")),
        # UID after the literal (other servers' order)
        (
            [
                b'* 3 FETCH (FLAGS () INTERNALDATE "28-Nov-2026 20:56:56 +0000" BODY[] ',
                Literal(b"x"),
                b" UID 9)\r\n",
            ],
            9,
            b"x",
            (),
        ),
        # a quoted string elsewhere: the general tokeniser reads it
        (
            [b'* 3 FETCH (X-GM-LABELS ("a \\"b\\"") UID 11 BODY[] ', Literal(b"y"), b")\r\n"],
            11,
            b"y",
            (),
        ),
        # two literals: general path, the body is the one after BODY[]
        (
            [
                b"* 3 FETCH (X-GM-LABELS (",
                Literal(b"label"),
                b") UID 12 BODY[] ",
                Literal(b"z"),
                b")\r\n",
            ],
            12,
            b"z",
            (),
        ),
    ],
    ids=["sizes", "dovecot", "uid-after-body", "quoted-elsewhere", "two-literals"],
)
def test_fetch_responses(parts, uid, body, flags):
    message = _fetched(parts)
    assert (message.uid, message.body, message.flags) == (uid, body, flags)


@pytest.mark.parametrize(
    "parts",
    [[b"* 3 FETCH (UID 7 BODY[] NIL)\r\n"], [b"* 3 FETCH (FLAGS (\\Seen))\r\n"]],
    ids=["gone", "unsolicited-flags"],
)
def test_responses_without_a_message(parts):
    assert _fetched(parts) is None


def test_internal_date_with_offsets_and_padded_day():
    assert internal_date(b"28-Nov-2026 20:56:56 +0100") == datetime(
        2026, 11, 28, 20, 56, 56, tzinfo=timezone(timedelta(hours=1))
    )
    assert internal_date(b" 8-Nov-2026 20:56:56 -0330").utcoffset() == -timedelta(
        hours=3, minutes=30
    )
    assert internal_date(b"01-Jan-2020 00:00:00 +0000") == datetime(2020, 1, 1, tzinfo=UTC)


def test_uid_sets_are_compact():
    assert _uid_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"


class ScriptedServer:
    """An imaplib connection's reading and sending ends over a scripted answer: what a server
    that runs pipelined commands in parallel may send, which Dovecot does not."""

    def __init__(self, answer: bytes) -> None:
        self.tagged_commands: dict[bytes, list[bytes] | None] = {}
        self.sent: list[bytes] = []
        self.sent_before_reading: int | None = None
        self._answer = io.BytesIO(answer)
        self._tags = 0

    def _new_tag(self) -> bytes:
        self._tags += 1
        tag = b"A%d" % self._tags
        self.tagged_commands[tag] = None
        return tag

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def readline(self) -> bytes:
        if self.sent_before_reading is None:
            self.sent_before_reading = len(self.sent)
        return self._answer.readline()

    def read(self, size: int) -> bytes:
        return self._answer.read(size)


def test_batches_are_fetched_pipelined_and_told_apart_by_uid():
    # Given a server that finishes the second FETCH before the first, answers interleaved
    server = ScriptedServer(
        b"* 3 FETCH (UID 3 BODY[] {1}\r\nc)\r\n"
        b"A2 OK done\r\n"
        b"* 1 FETCH (UID 1 BODY[] {1}\r\na)\r\n"
        b"* 2 FETCH (UID 2 BODY[] {1}\r\nb)\r\n"
        b"A1 OK done\r\n"
    )
    # When two batches are fetched
    answers = list(fetch_batches(server, [[1, 2], [3]], "UID BODY.PEEK[]"))
    # Then the second command went out before the first answer was read
    assert server.sent_before_reading == 2
    assert server.sent == [
        b"A1 UID FETCH 1:2 (UID BODY.PEEK[])\r\n",
        b"A2 UID FETCH 3 (UID BODY.PEEK[])\r\n",
    ]
    # And each batch has its own messages, however they came
    assert [{uid: m.body for uid, m in batch.items()} for batch in answers] == [
        {1: b"a", 2: b"b"},
        {3: b"c"},
    ]
    assert server.tagged_commands == {}


def test_a_refused_batch_fails_after_the_batches_before_it():
    # Given a server that refuses the second FETCH
    server = ScriptedServer(
        b"* 1 FETCH (UID 1 BODY[] {1}\r\na)\r\nA1 OK done\r\nA2 NO [SERVERBUG] broken\r\n"
    )
    answers = fetch_batches(server, [[1], [2]], "UID BODY.PEEK[]")
    # When the batches are read
    first = next(answers)
    # Then the first is whole and the second raises the server's words
    assert list(first) == [1]
    with pytest.raises(IMAPClientError, match="UID FETCH failed: A2 NO \\[SERVERBUG\\] broken"):
        next(answers)


def test_sizes_are_read_in_the_order_asked_and_in_any_other():
    # Given a server that answers a size listing mostly as asked, once in another order, once
    # with an unsolicited flag update, and once with a message expunged meanwhile (no answer)
    server = ScriptedServer(
        b"* 1 FETCH (UID 4 RFC822.SIZE 100)\r\n"
        b"* 2 FETCH (RFC822.SIZE 250 UID 5)\r\n"
        b"* 2 FETCH (FLAGS (\\Seen) UID 5)\r\n"
        b"* 3 FETCH (uid 9 rfc822.size 7)\r\n"
        b"A1 OK done\r\n"
    )
    # When the sizes of 4:* are fetched
    sizes = fetch_sizes(server, "4:*")
    # Then every size is read, whatever the shape, and the flag update is not a size
    assert server.sent == [b"A1 UID FETCH 4:* (UID RFC822.SIZE)\r\n"]
    assert sizes == {4: 100, 5: 250, 9: 7}
    assert server.tagged_commands == {}
