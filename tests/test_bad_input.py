"""Bad input ends stored, quarantined or classified, with a clear message: never a hang or a crash.

Covered elsewhere and not repeated here: the malformed messages of ../shared/corpus
(tests/test_sync.py::test_whole_corpus_through_imap) and folder names with quotes, backslashes
and non-ASCII (tests/test_sync.py::test_folder_names_round_trip).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select

import broker_config
from mailpipe import db, names
from mailpipe.accounts import add_account, create_user, unlock_owner
from mailpipe.crypto import DataKey
from mailpipe.imap import ImapSettings
from mailpipe.models import Email
from mailpipe.parse import QUARANTINE_REASONS
from mailpipe.sync import sync_account
from tests.support.policy import LOOPBACK
from tests.support.scripted_imap import CAPABILITIES, Close, ScriptedImap, tagged, uid_fetch
from tests.support.workers import ROOT

FAST_KDF = 1_000
ATTACHMENT_BYTES = 25 * 1024 * 1024
MAX_RSS_BYTES = 300 * 1024 * 1024
SYNC_TIMEOUT = 120.0
CLI_TIMEOUT = 60.0
PASSWORD_ENV = "MAILPIPE_TEST_IMAP_PASSWORD"
ATTEMPTS = broker_config.SETTINGS.retry.max_retries + 1
UNKNOWN_ATTEMPTS = 2  # anything unclassified is retried once (design: error table)
REASONS = {*QUARANTINE_REASONS.values(), "parse_error", "not_a_message"}
CRLF = b"\r\n"
LAUNCHER = """
import json, os, sys
report, command = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(command[0], command)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as out:
    json.dump({"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, out)
"""


# -- helpers -------------------------------------------------------------------------------


def sync_command(*, port: int, user: str, db_url: str, timeout: float = 10.0) -> list[str]:
    """`mailpipe sync` of one account, as an operator would run it."""
    return [
        sys.executable,
        "-m",
        "cli",
        "sync",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--user",
        user,
        "--password-env",
        PASSWORD_ENV,
        "--security",
        "none",
        "--db",
        db_url,
        "--timeout",
        str(timeout),
        "--json",
    ]


def cli_env(tmp_path: Path, password: str) -> dict[str, str]:
    env = {**os.environ, PASSWORD_ENV: password, "MAILPIPE_DATA_DIR": str(tmp_path)}
    env.pop("MAILPIPE_DEBUG", None)  # a traceback is what the test must not see
    return env


def run_measured(command: list[str], env: dict[str, str], timeout: float):
    """Run a command to its end; return (exit status, stdout, stderr, peak RSS in bytes).

    The peak is ru_maxrss from os.wait4, taken by a small launcher that forks the command: a
    child forked straight from pytest would start with pytest's own high-water mark (the kernel
    carries it over the exec), which holds the 34 MB message this test built.
    """
    workdir = Path(env["MAILPIPE_DATA_DIR"])
    out_path, err_path, report = workdir / "stdout", workdir / "stderr", workdir / "rusage.json"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(report), *command],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        launcher.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        raise AssertionError(
            f"{' '.join(command[2:4])} still running after {timeout:.0f} s"
        ) from None
    measured = json.loads(report.read_text())
    return (
        measured["status"],
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        measured["maxrss_kb"] * 1024,  # Linux reports kilobytes
    )


def big_message(attachment: bytes) -> bytes:
    """A text part and one attachment, base64 in lines of 76, CRLF throughout."""
    encoded = base64.encodebytes(attachment).replace(b"\n", CRLF)
    return CRLF.join(
        [
            b"From: Absender <absender@example.org>",
            b"To: empfaenger@example.org",
            b"Subject: Der Scan, 25 MB",
            b"Message-ID: <big-attachment@example.org>",
            b"MIME-Version: 1.0",
            b'Content-Type: multipart/mixed; boundary="b1"',
            b"",
            b"--b1",
            b'Content-Type: text/plain; charset="utf-8"',
            b"",
            b"Anbei der Scan.",
            b"--b1",
            b"Content-Type: application/octet-stream",
            b"Content-Transfer-Encoding: base64",
            b'Content-Disposition: attachment; filename="scan.bin"',
            b"",
            encoded + b"--b1--",
            b"",
        ]
    )


def parsed_fields(key: DataKey, email: Email) -> dict:
    return orjson.loads(
        key.decrypt(email.parsed_enc, table="emails", column="parsed", row=email.id)
    )


# -- a 25 MB attachment --------------------------------------------------------------------


def test_a_25_mb_attachment_is_stored_and_parsed_within_the_memory_bound(
    dovecot, imap_user, tmp_path, capsys
):
    # Given a mailbox holding a message with a 25 MB attachment (about 34 MB as sent)
    user, password = imap_user
    attachment = os.urandom(ATTACHMENT_BYTES)
    raw = big_message(attachment)
    dovecot.append(user, password, [raw])
    db_url = f"sqlite:///{tmp_path / 'big.db'}"
    # When `mailpipe sync` fetches it in a process of its own
    status, out, err, peak = run_measured(
        sync_command(port=dovecot.port, user=user, db_url=db_url, timeout=60),
        cli_env(tmp_path, password),
        SYNC_TIMEOUT,
    )
    with capsys.disabled():
        print(
            f"\n25 MB attachment ({len(raw) / 2**20:.1f} MB message): peak RSS {peak / 2**20:.0f} MB"
        )
    # Then it succeeds within the memory bound, and the message is stored whole and parsed
    assert status == 0, err
    counts = json.loads(out)
    assert (counts["fetched"], counts["saved"], counts["quarantined"]) == (1, 1, 0)
    assert peak <= MAX_RSS_BYTES, f"peak RSS {peak / 2**20:.0f} MB over {MAX_RSS_BYTES / 2**20} MB"
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    with sessions() as session:
        # the owner `mailpipe sync` made is unlocked by its key file (tests/conftest.py's dir)
        owner_keys = Path(os.environ["MAILPIPE_OWNER_KEY_DIR"])
        _owner, key = unlock_owner(session, "operator", password, key_dir=owner_keys)
        [email] = session.scalars(select(Email)).all()
    engine.dispose()
    assert email.status == "parsed"
    stored = key.decrypt(email.raw_enc, table="emails", column="raw", row=email.id)
    assert hashlib.sha256(stored).digest() == hashlib.sha256(raw).digest()
    fields = parsed_fields(key, email)
    assert fields["subject"] == "Der Scan, 25 MB"
    [scan] = fields["attachments"]
    assert scan["name"] == "scan.bin"
    assert scan["encoded_size"] >= ATTACHMENT_BYTES


# -- 8-bit and odd-charset headers ---------------------------------------------------------

ODD_HEADERS: dict[str, bytes] = {
    # raw Latin-1 bytes, no RFC 2047
    "latin1-subject": b"Subject: Gr\xfc\xdfe aus K\xf6ln\r\nFrom: a@example.org",
    # raw UTF-8 in a display name
    "utf8-from": "From: Jürgen Müller <j@example.org>\r\nSubject: Grüße".encode(),
    # a charset label nobody knows
    "unknown-charset": b"Subject: =?x-unknown-42?Q?Hallo_Welt?=\r\nFrom: a@example.org",
    # a good encoded word beside an unknown one
    "mixed-words": b"Subject: =?utf-8?q?=C3=BCber?= =?x-unknown?q?foo?=\r\nFrom: a@example.org",
    # base64 that is not base64, and one cut short
    "bad-base64": b"From: =?utf-8?B?not base64!!?= <a@example.org>\r\nSubject: =?utf-8?B?w6?=",
    # quoted-printable with a bad escape and bytes that are not UTF-8
    "bad-qp": b"Subject: =?utf-8?Q?=ZZbroken_=FC?=\r\nFrom: a@example.org",
    # an encoding letter that does not exist
    "bad-encoding-letter": b"Subject: =?iso-8859-1?X?abc?=\r\nFrom: a@example.org",
    # control characters in a header
    "control-characters": b"Subject: a\x01b\x1bc\x7f\r\nFrom: a@example.org",
    # a body in a charset nobody knows, 8-bit on the wire
    "body-unknown-charset": b'Subject: body\r\nFrom: a@example.org\r\nContent-Type: text/plain; charset="x-made-up"\r\nContent-Transfer-Encoding: 8bit',
}


def odd_message(name: str) -> bytes:
    """The odd headers with a Message-ID naming the case, and a short 8-bit body."""
    return ODD_HEADERS[name] + b"\r\nMessage-ID: <%s@example.org>\r\n\r\nGr\xfc\xdfe\r\n" % (
        name.encode()
    )


NOT_A_MESSAGE = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe binary, no header block"


def test_8bit_and_odd_charset_headers_end_parsed_or_quarantined_with_a_reason(
    dovecot, imap_user, tmp_path
):
    # Given a mailbox of messages with raw 8-bit headers, unknown charsets and broken RFC 2047
    user, password = imap_user
    dovecot.append(user, password, [odd_message(name) for name in ODD_HEADERS] + [NOT_A_MESSAGE])
    engine = db.make_engine(f"sqlite:///{tmp_path / 'odd.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        owner, key = create_user(session, "owner", "pw", iterations=FAST_KDF)
        settings = ImapSettings(
            host=dovecot.host, port=dovecot.port, username=user, password=password, security="none"
        )
        account_id = add_account(session, owner, key, settings).id
    # When the account is synced
    result = sync_account(sessions, account_id=account_id, key=key, policy=LOOPBACK)
    # Then every message is stored, each parsed or quarantined with a known reason
    with sessions() as session:
        emails = list(session.scalars(select(Email).where(Email.account_id == account_id)))
    engine.dispose()
    assert result.fetched == len(emails) == len(ODD_HEADERS) + 1
    by_id = {}
    for email in emails:
        assert email.status in {"parsed", "quarantined"}
        if email.status == "quarantined":
            assert email.quarantine_reason in REASONS
            by_id[email.quarantine_reason] = email
            continue
        fields = parsed_fields(key, email)
        assert isinstance(fields["subject"], str)
        assert all(isinstance(a["name"], str) for a in fields["from"])
        by_id[names.email_message_id(key, email)] = fields
    # And what can be read is read right; what cannot is kept as it came, not dropped
    assert set(by_id) == {f"<{name}@example.org>" for name in ODD_HEADERS} | {"not_a_message"}
    assert by_id["<latin1-subject@example.org>"]["subject"] == "Grüße aus Köln"
    assert by_id["<utf8-from@example.org>"]["from"][0]["name"] == "Jürgen Müller"
    assert by_id["<mixed-words@example.org>"]["subject"].startswith("über")
    assert "Hallo" in by_id["<unknown-charset@example.org>"]["subject"]
    assert by_id["<body-unknown-charset@example.org>"]["text"].startswith("Gr")


# -- a server that answers BAD or sends literals it should not -----------------------------


def bad(text: bytes):
    """An answer of BAD to the command."""
    return lambda tag, args: tagged(tag, b"BAD " + text)


def unexpected_literal(tag: bytes, args: bytes) -> bytes:
    """A literal where a number belongs: `UID {5}` then `hello`."""
    return b"* 1 FETCH (UID {5}\r\nhello RFC822.SIZE 10)\r\n" + tagged(tag, b"OK done")


def short_literal_then_close(tag: bytes, args: bytes):
    """Sizes as usual; the body literal announces 5000 bytes, 30 follow, then the server hangs up."""
    if b"BODY" not in args.upper():
        return uid_fetch(tag, args)
    return Close(b"* 1 FETCH (UID 1 BODY[] {5000}\r\nSubject: cut short\r\n\r\nparti")


OLD_CAPABILITIES = b"IMAP4 AUTH=PLAIN"
NOT_IMAP4REV1 = {
    "CAPABILITY": lambda tag, args: (
        b"* CAPABILITY " + OLD_CAPABILITIES + b"\r\n" + tagged(tag, b"OK done")
    ),
    "LOGIN": lambda tag, args: tagged(tag, b"OK [CAPABILITY " + OLD_CAPABILITIES + b"] in"),
}

# name -> (replies, greeting capabilities, error class, the cause named in the message)
SCRIPTS = {
    "bad-to-examine": (
        {"EXAMINE": bad(b"[CLIENTBUG] EXAMINE not understood")},
        CAPABILITIES,
        "unknown",
        "answered with an error",
    ),
    "bad-to-uid-fetch": (
        {"UID FETCH": bad(b"Error in IMAP command UID FETCH: Invalid uidset")},
        CAPABILITIES,
        "unknown",
        "answered with an error",
    ),
    "unexpected-literal": (
        {"UID FETCH": unexpected_literal},
        CAPABILITIES,
        "unknown",
        "not valid IMAP",
    ),
    "short-literal-then-close": (
        {"UID FETCH": short_literal_then_close},
        CAPABILITIES,
        "connection_reset",
        "closed the connection",
    ),
    "not-imap4rev1": (NOT_IMAP4REV1, OLD_CAPABILITIES, "unknown", "does not offer IMAP4rev1"),
}


def scripted(name: str) -> ScriptedImap:
    replies, capabilities, _cls, _cause = SCRIPTS[name]
    greeting = b"* OK [CAPABILITY " + capabilities + b"] scripted server ready\r\n"
    return ScriptedImap(replies, greeting=greeting)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_mailpipe_sync_against_a_misbehaving_server_fails_in_one_line(name, tmp_path):
    _replies, _caps, error_class, cause = SCRIPTS[name]
    # Given a server that misbehaves in one way
    with scripted(name) as server:
        # When `mailpipe sync` runs against it
        done = subprocess.run(
            sync_command(port=server.port, user="alice", db_url=f"sqlite:///{tmp_path / 'm.db'}"),
            env=cli_env(tmp_path, "secret"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
    # Then it ends at once with exit status 1 and one line naming the class and the cause
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"mailpipe: sync failed ({error_class}): ")
    assert cause in line
    assert done.stdout == ""


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_misbehaving_server_ends_the_run_failed_after_bounded_attempts(world, name):
    _replies, _caps, error_class, cause = SCRIPTS[name]
    alice = world.user("alice")
    with scripted(name) as server:
        account = world.account(alice, port=server.port)
        # When a fetch job runs through the pipeline (stub broker, in-process worker)
        status = world.run(alice, account, timeout_seconds=5)
        connections = server.connections
    # Then the run fails with the error class after a bounded number of attempts, one
    # connection each, and the job ends failed: no crash loop, no hung worker
    [run] = status["accounts"]
    assert (status["status"], run["status"], run["error_class"]) == (
        "failed",
        "failed",
        error_class,
    )
    attempts = UNKNOWN_ATTEMPTS if error_class == "unknown" else ATTEMPTS
    assert run["attempt"] == attempts
    assert connections == attempts
    assert cause in run["error"]
    assert "\n" not in run["error"]
    assert world.emails(account) == []
