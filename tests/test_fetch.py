"""The lean FETCH reader: common responses by regular expression, the rest by the tokeniser."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailpipe.fetch import Literal, _fetched, _uid_set, internal_date

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
