"""Synthetic but realistic messages, deterministic for a given seed, for seeding test mailboxes.

Built by hand rather than with `email.message.EmailMessage`, which is ten times slower: seeding
10,000 messages for the benchmark must take seconds, not a minute. Lines end in CRLF, so the
bytes a server returns for BODY[] are exactly the bytes seeded.
"""

from __future__ import annotations

import base64
import binascii
import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "grüße", "mail", "pipeline")
SENDERS = 97
SUBJECT_WORDS = "=?utf-8?q?=C3=BCber_=C3=84pfel?="  # "über Äpfel", RFC 2047 encoded
CRLF = "\r\n"


def message_date(i: int) -> datetime:
    """Give message i a stable Date (one minute apart) so INTERNALDATE can be set to match it."""
    return EPOCH + timedelta(minutes=i)


def _qp(text: str) -> str:
    """Quoted-printable with CRLF line ends, as a MIME text part carries it."""
    encoded = binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii")
    return encoded.replace("\n", CRLF)


def _text_part(subtype: str, text: str) -> str:
    """One text/* part with its headers, quoted-printable UTF-8."""
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"{CRLF}'
        f"Content-Transfer-Encoding: quoted-printable{CRLF}{CRLF}{_qp(text)}{CRLF}"
    )


def _multipart(subtype: str, boundary: str, parts: list[str]) -> str:
    """A multipart/* entity (headers and body) holding the given parts."""
    body = "".join(f"--{boundary}{CRLF}{part}" for part in parts)
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"{CRLF}{CRLF}'
        f"{body}--{boundary}--{CRLF}"
    )


def synthetic_message(i: int, rnd: random.Random) -> bytes:
    """Build message i: text only, text+HTML, or (1 in 10) with a 20-120 kB binary attachment."""
    headers = (
        f"From: Sender {i % SENDERS} <sender{i % SENDERS}@example.org>{CRLF}"
        f"To: bench@example.com{CRLF}"
        f"Subject: Message {i}: Quarterly report {SUBJECT_WORDS} #{rnd.randint(1, 10**6)}{CRLF}"
        f"Date: {format_datetime(message_date(i))}{CRLF}"
        f"Message-ID: <{i}.{rnd.getrandbits(64):016x}@example.org>{CRLF}"
        f"MIME-Version: 1.0{CRLF}"
    )
    words = " ".join(rnd.choices(WORDS, k=rnd.randint(50, 600)))
    kind = i % 10
    if kind < 4:
        body = _text_part("plain", words)
    else:
        html = f"<html><body><p>{words}</p></body></html>"
        body = _multipart(
            "alternative", f"alt-{i}", [_text_part("plain", words), _text_part("html", html)]
        )
    if kind == 9:
        data = rnd.randbytes(rnd.randint(20_000, 120_000))
        attachment = (
            f"Content-Type: application/octet-stream{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}"
            f'Content-Disposition: attachment; filename="file{i}.bin"{CRLF}{CRLF}'
            + base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
        )
        body = _multipart("mixed", f"mix-{i}", [body, attachment])
    return (headers + body).encode("utf-8")


def plain_message(i: int, *, subject: str | None = None, size: int = 200) -> bytes:
    """A small German test message numbered i, with a unique Message-ID."""
    mail = EmailMessage()
    mail["From"] = "Absender <absender@example.org>"
    mail["To"] = "empfaenger@example.org"
    mail["Subject"] = subject or f"Nachricht {i}"
    mail["Message-ID"] = f"<m{i}@example.org>"
    mail.set_content(f"Inhalt {i} " + "x" * size)
    return mail.as_bytes()
