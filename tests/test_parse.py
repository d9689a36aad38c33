"""Parsing is tolerant: real-world mail parses or is quarantined with a reason, never raises."""

import os
from pathlib import Path

from mailpipe.parse import html_to_text, parse_message, parse_messages

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "mail-parser"


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.glob("mail_*") if p.is_file())


def cpython_email_files() -> list[Path]:
    try:
        import test.test_email
    except ImportError:
        return []
    return sorted(Path(os.path.dirname(test.test_email.__file__), "data").glob("msg_*.txt"))


def test_every_corpus_message_parses_or_is_quarantined():
    files = corpus_files() + cpython_email_files()
    assert corpus_files(), f"the shared corpus is missing at {CORPUS}"
    # When the whole corpus is parsed as one batch
    outcomes = parse_messages([p.read_bytes() for p in files])
    # Then each message has fields or a quarantine reason, never both nor neither
    assert len(outcomes) == len(files)
    for path, outcome in zip(files, outcomes, strict=True):
        assert (outcome.fields is None) == outcome.quarantined, path.name
    parsed = [o for o in outcomes if not o.quarantined]
    assert len(parsed) > len(files) * 0.9


def test_a_file_that_is_not_a_message_is_quarantined():
    # mail_outlook_1 is an Outlook .msg compound file, not RFC 5322
    outcome = parse_message((CORPUS / "mail_outlook_1").read_bytes())
    assert outcome.quarantine_reason == "not_a_message"


def test_broken_base64_is_quarantined_with_reason_but_no_content():
    raw = (
        b"From: a@example.org\r\nSubject: geheim\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"a\r\n--b--\r\n"
    )
    outcome = parse_message(raw)
    assert outcome.quarantined
    assert outcome.quarantine_reason == "decode_error"
    assert "geheim" not in outcome.quarantine_reason


def test_fields_of_a_reply_with_attachment():
    raw = (
        "From: Jörg Müller <joerg@example.de>\r\n"
        "To: anna@example.de, Bob <bob@example.de>\r\n"
        "Cc: team@example.de\r\n"
        "Subject: =?utf-8?q?Re=3A_Gr=C3=BC=C3=9Fe?=\r\n"
        "Date: Tue, 03 Mar 2026 10:00:00 +0100\r\n"
        "Message-ID: <reply-1@example.de>\r\n"
        "In-Reply-To: <orig-1@example.de>\r\n"
        "References: <root@example.de> <orig-1@example.de>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        "--XX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        "<html><head><style>p{}</style></head><body><p>Viele Grüße</p><script>x()</script></body></html>\r\n"
        "--XX\r\nContent-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="Rechnung.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XX--\r\n"
    ).encode()
    fields = parse_message(raw).fields
    assert fields["subject"] == "Re: Grüße"
    assert fields["from"] == [{"name": "Jörg Müller", "address": "joerg@example.de"}]
    assert [a["address"] for a in fields["to"]] == ["anna@example.de", "bob@example.de"]
    assert fields["cc"][0]["address"] == "team@example.de"
    assert fields["message_id"] == "<reply-1@example.de>"
    assert fields["in_reply_to"] == "<orig-1@example.de>"
    assert fields["references"] == ["<root@example.de>", "<orig-1@example.de>"]
    assert fields["date"].startswith("2026-03-03T09:00:00")
    assert fields["text"] == "Viele Grüße"
    assert fields["attachments"][0]["name"] == "Rechnung.pdf"
    assert fields["attachments"][0]["type"] == "application/pdf"


def test_html_to_text_drops_scripts_and_styles():
    assert (
        html_to_text("<style>a{}</style><b>Hallo</b> <i>Welt</i><script>1</script>") == "Hallo Welt"
    )
