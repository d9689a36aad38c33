"""Turn raw messages into the fields the assistant needs, and quarantine what cannot be read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fast_mail_parser
from selectolax.lexbor import LexborHTMLParser

MAX_TEXT_CHARS = 200_000
MAX_HEADER_CHARS = 1_000
NON_TEXT_TAGS = ("script", "style", "head", "noscript", "template")
QUARANTINE_REASONS = {
    "DecodeError": "decode_error",
    "HeaderParseError": "header_error",
    "MimeStructureError": "mime_structure_error",
}


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """The outcome for one message: fields when it parsed, a reason when it is quarantined."""

    fields: dict[str, Any] | None
    message_id: str | None
    sent_date: datetime | None
    quarantine_reason: str | None = None
    detail: str | None = None

    @property
    def quarantined(self) -> bool:
        return self.quarantine_reason is not None


def parse_messages(raws: Sequence[bytes]) -> list[ParsedMessage]:
    """Parse a batch in parallel (the parser runs in native threads); one failure costs one slot."""
    outcomes = fast_mail_parser.parse_many(list(raws), mode="lazy")
    return [
        _quarantine(outcome) if isinstance(outcome, Exception) else _fields(outcome)
        for outcome in outcomes
    ]


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse one message; never raises for bad input."""
    return parse_messages([raw])[0]


def _quarantine(error: Exception) -> ParsedMessage:
    # The error text may quote message content, so it stays in the encrypted detail only.
    return ParsedMessage(
        fields=None,
        message_id=None,
        sent_date=None,
        quarantine_reason=QUARANTINE_REASONS.get(type(error).__name__, "parse_error"),
        detail=str(error)[:MAX_HEADER_CHARS],
    )


def _fields(mail: fast_mail_parser.PyLazyMail) -> ParsedMessage:
    headers = {name.lower(): values for name, values in mail.headers.items()}
    if not headers:
        return ParsedMessage(
            fields=None,
            message_id=None,
            sent_date=None,
            quarantine_reason="not_a_message",
            detail="no RFC 5322 header block found (another file format?)",
        )
    message_id = _header(headers, "message-id")
    sent_date = mail.date_parsed
    text = "\n".join(part for part in mail.text_plain if part)
    if not text.strip() and mail.text_html:
        text = "\n".join(html_to_text(part) for part in mail.text_html)
    fields = {
        "message_id": message_id,
        "subject": (mail.subject or "")[:MAX_HEADER_CHARS],
        "from": _addresses(mail.from_),
        "to": _addresses(mail.to),
        "cc": _addresses(mail.cc),
        "date": sent_date.isoformat() if sent_date else None,
        "in_reply_to": _header(headers, "in-reply-to"),
        "references": (_header(headers, "references") or "").split(),
        "text": text[:MAX_TEXT_CHARS],
        "attachments": [
            {
                "name": attachment.filename,
                "type": attachment.mimetype,
                "encoded_size": attachment.encoded_size,
            }
            for attachment in mail.attachments
        ],
        "warnings": [str(warning) for warning in mail.warnings],
    }
    return ParsedMessage(
        fields=fields,
        message_id=message_id[:MAX_HEADER_CHARS] if message_id else None,
        sent_date=sent_date,
    )


def html_to_text(html: str) -> str:
    """Readable text from an HTML body, without scripts, styles or markup."""
    tree = LexborHTMLParser(html)
    for tag in NON_TEXT_TAGS:
        for node in tree.css(tag):
            node.decompose()
    root = tree.body or tree.root
    if root is None:
        return ""
    return " ".join(root.text(separator=" ").split())


def _header(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    value = values[0] if isinstance(values, list) else values
    return value.strip() or None


def _addresses(
    addresses: fast_mail_parser.PyAddress | list[fast_mail_parser.PyAddress] | None,
) -> list[dict[str, str]]:
    if not addresses:
        return []
    if not isinstance(addresses, list):
        addresses = [addresses]
    return [{"name": a.display_name or "", "address": a.address or ""} for a in addresses]
