"""The built-in demo IMAP server: real pymap on loopback, seeded with demo/mail/*.eml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from demo.imap_server import DEMO_DIR, DemoServer, demo_messages

NEW_MAIL = (
    b"From: Oma Hilde <hilde@beispiel.example>\r\n"
    b"To: demo@mustermann.example\r\n"
    b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_dem_Urlaub?=\r\n"
    b"Date: Mon, 01 Apr 2024 09:00:00 +0200\r\n"
    b"Message-ID: <urlaub-1@beispiel.example>\r\n"
    b"\r\n"
    b"Liebe Gr\xc3\xbc\xc3\x9fe von der Ostsee!\r\n"
)
GONE_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    with DemoServer(workdir=tmp_path_factory.mktemp("demo-imap")) as running:
        yield running


@contextmanager
def logged_in(server: DemoServer, user: str = "demo") -> Iterator[IMAPClient]:
    client = IMAPClient(server.host, port=server.port, ssl=False, timeout=30)
    try:
        client.login(user, server.users[user])
        yield client
    finally:
        client.logout()


def inbox_bodies(client: IMAPClient) -> dict[int, bytes]:
    client.select_folder("INBOX", readonly=True)
    fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
    return {uid: data[b"BODY[]"] for uid, data in sorted(fetched.items())}


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by a busy init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_TIMEOUT
    while process_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_demo_data_is_eight_to_twelve_crlf_messages() -> None:
    # Given the committed demo mail
    messages = demo_messages()
    # Then there are 8 to 12 messages, and every line ends in CRLF (so APPEND keeps their bytes)
    assert 8 <= len(messages) <= 12
    assert list(messages) == sorted(path.name for path in DEMO_DIR.glob("*.eml"))
    for name, raw in messages.items():
        assert b"\n" not in raw.replace(b"\r\n", b""), name
        assert b"\r" not in raw.replace(b"\r\n", b""), name


def test_demo_user_sees_every_demo_message_byte_for_byte(server: DemoServer) -> None:
    # Given a started demo server
    # When the demo user logs in with the demo password and fetches INBOX with BODY.PEEK[]
    with logged_in(server) as client:
        bodies = inbox_bodies(client)
        flags = client.get_flags(list(bodies))
    # Then INBOX holds exactly the demo messages, in file-name order, byte for byte, still unseen
    assert server.users == {"demo": "demo"}
    assert list(bodies.values()) == list(demo_messages().values())
    assert all(b"\\Seen" not in message_flags for message_flags in flags.values())


def test_wrong_password_is_rejected(server: DemoServer) -> None:
    # Given a started demo server
    client = IMAPClient(server.host, port=server.port, ssl=False, timeout=30)
    try:
        # When someone logs in with a wrong password, or as an unknown user
        # Then the server says NO, which imapclient raises as LoginError
        with pytest.raises(LoginError, match="AUTHENTICATIONFAILED"):
            client.login("demo", "falsch")
        with pytest.raises(LoginError):
            client.login("niemand", "demo")
    finally:
        client.shutdown()


def test_server_offers_what_the_sync_engine_relies_on(server: DemoServer) -> None:
    # Given a started demo server
    with logged_in(server) as client:
        # When the client asks what the sync engine asks: capabilities, folders, STATUS, SELECT
        capabilities = client.capabilities()
        folders = [name for _, _, name in client.list_folders()]
        status = client.folder_status("INBOX", [b"UIDNEXT", b"UIDVALIDITY", b"MESSAGES"])
        selected = client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
    # Then UIDPLUS is there, INBOX is listed, and STATUS agrees with SELECT and the messages
    assert b"UIDPLUS" in capabilities
    assert "INBOX" in folders
    assert status[b"UIDVALIDITY"] == selected[b"UIDVALIDITY"]
    assert status[b"UIDNEXT"] == selected[b"UIDNEXT"] > max(uids)
    assert status[b"MESSAGES"] == len(uids) == len(demo_messages())


def test_deliver_adds_a_message_with_a_higher_uid(tmp_path: Path) -> None:
    # Given a started demo server and the UIDs a client has already seen
    with DemoServer(workdir=tmp_path) as server:
        with logged_in(server) as client:
            before = client.select_folder("INBOX", readonly=True)
            seen_uids = client.search("ALL")
        # When new mail arrives
        server.deliver("demo", NEW_MAIL)
        # Then a later SELECT shows it under a higher UID, in the same UIDVALIDITY
        with logged_in(server) as client:
            after = client.select_folder("INBOX", readonly=True)
            new_uids = [uid for uid in client.search("ALL") if uid not in seen_uids]
            body = client.fetch(new_uids, ["BODY.PEEK[]"])[new_uids[0]][b"BODY[]"]
    assert after[b"UIDVALIDITY"] == before[b"UIDVALIDITY"]
    assert len(new_uids) == 1
    assert new_uids[0] > max(seen_uids)
    assert after[b"UIDNEXT"] > new_uids[0]
    assert body == NEW_MAIL


def test_deliver_makes_a_missing_folder(tmp_path: Path) -> None:
    # Given a started demo server without a "Familie/Urlaub" folder
    with DemoServer(workdir=tmp_path) as server:
        # When mail is delivered into that folder
        server.deliver("demo", NEW_MAIL, folder="Familie/Urlaub")
        # Then the folder exists and holds just that message
        with logged_in(server) as client:
            folders = [name for _, _, name in client.list_folders()]
            client.select_folder("Familie/Urlaub", readonly=True)
            fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
    assert "Familie/Urlaub" in folders
    assert [data[b"BODY[]"] for data in fetched.values()] == [NEW_MAIL]


def test_each_user_has_a_password_and_a_mailbox_of_their_own(tmp_path: Path) -> None:
    # Given a demo server with two users (one password not ASCII)
    users = {"anna": "geheim-1", "bert@example.org": "Grüße-2"}
    with DemoServer(workdir=tmp_path, users=users) as server:
        # When mail is delivered to anna only
        server.deliver("anna", NEW_MAIL)
        with logged_in(server, "anna") as client:
            anna = inbox_bodies(client)
        bert_client = IMAPClient(server.host, port=server.port, ssl=False, timeout=30)
        bert_client.plain_login("bert@example.org", "Grüße-2")
        bert = inbox_bodies(bert_client)
        bert_client.logout()
    # Then both got the demo mail, and only anna the new message
    demo = list(demo_messages().values())
    assert list(anna.values()) == [*demo, NEW_MAIL]
    assert list(bert.values()) == demo


def test_exit_stops_the_server_and_removes_only_what_it_made(tmp_path: Path) -> None:
    # Given a work directory that already holds someone else's file, and a server started in it
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("not the server's")
    with DemoServer(workdir=workdir) as server:
        pid, host, port = server.pid, server.host, server.port
        assert pid is not None and port_accepts(host, port)
        assert len(list(workdir.iterdir())) == 2
    # When the with-block ends
    # Then the process is gone, the port is closed, and only the server's own files are removed
    assert not process_exists(pid)
    assert not port_accepts(host, port)
    assert [p.name for p in workdir.iterdir()] == ["keep.txt"]


def test_exit_removes_a_work_directory_it_made(tmp_path: Path) -> None:
    # Given a work directory that does not exist yet
    workdir = tmp_path / "new" / "work"
    # When a server starts and stops there
    with DemoServer(workdir=workdir):
        assert workdir.is_dir()
    # Then the directories it had to make are gone as well
    assert not (tmp_path / "new").exists()


def test_server_stops_when_its_parent_is_killed(tmp_path: Path) -> None:
    # Given a process that runs a demo server and is then killed without any chance to clean up
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from demo.imap_server import DemoServer
        with DemoServer(workdir=Path({str(tmp_path)!r})) as server:
            print(server.pid, server.port, flush=True)
            time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],  # the demo package runs from the checkout
    )
    try:
        pid, port = (int(word) for word in parent.stdout.readline().split())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        parent.stdout.close()
    # When the orphaned pymap notices its stdin pipe closing
    # Then it shuts down by itself and frees the port
    assert wait_until_gone(pid)
    assert not port_accepts("127.0.0.1", port)


def mailpipe(*args: str, password: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={
            **env,
            "DEMO_PW": password,
            "MAILPIPE_DATA_DIR": str(cwd),
            "MAILPIPE_OWNER_KEY_DIR": str(cwd / "keys"),
        },
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mailpipe_diagnose_passes_against_the_demo_server(server: DemoServer, tmp_path: Path):
    # Given the demo server (plain IMAP, as the README says: --security none)
    address = ["--host", server.host, "--port", str(server.port), "--user", "demo"]
    # When `mailpipe diagnose` checks the demo mailbox
    done = mailpipe(
        "diagnose",
        *address,
        "--password-env",
        "DEMO_PW",
        "--security",
        "none",
        "--json",
        password=server.users["demo"],
        cwd=tmp_path,
    )
    # Then every check passes (leaving the read-only INBOX too)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {check["name"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["inbox"]["status"] == "ok"
    # And the server's empty identity (pymap answers ID NIL) is said, not printed as nothing
    assert checks["server_id"]["details"]["fields"] == {}
    said = mailpipe(
        "diagnose",
        *address,
        "--password-env",
        "DEMO_PW",
        "--security",
        "none",
        password=server.users["demo"],
        cwd=tmp_path,
    )
    [line] = [line for line in said.stdout.splitlines() if " server_id " in line]
    assert "the server does not say what it is (ID NIL)" in line


def test_starttls_against_a_plain_server_says_it_is_not_offered(server: DemoServer, tmp_path: Path):
    # Given the demo server, which offers no STARTTLS
    # When `mailpipe sync --security starttls` runs against it
    done = mailpipe(
        "sync",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--user",
        "demo",
        "--password-env",
        "DEMO_PW",
        "--security",
        "starttls",
        password=server.users["demo"],
        cwd=tmp_path,
    )
    # Then it says so in one line, as a TLS error (a setting to fix), not "answered with an error"
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("mailpipe: sync failed (tls_error): ")
    assert "does not offer STARTTLS" in line


def test_a_second_account_with_another_password_joins_the_owner_its_key_file_unlocks(
    tmp_path: Path,
):
    # Given two demo mailboxes with different passwords, the first synced into the default db
    with DemoServer(workdir=tmp_path / "imap", users={"anna": "anna-pw", "ben": "ben-pw"}) as s:
        address = ["--host", s.host, "--port", str(s.port), "--security", "none"]
        anna = ["sync", *address, "--user", "anna", "--password-env", "DEMO_PW"]
        ben = ["sync", *address, "--user", "ben", "--password-env", "DEMO_PW"]
        first = mailpipe(*anna, password="anna-pw", cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        # When the second is synced with its own, right IMAP password
        second = mailpipe(*ben, password="ben-pw", cwd=tmp_path)
        # Then the owner is unlocked by the key file the first sync made, not by a password
        assert second.returncode == 0, second.stderr
        # When that key file is gone
        shutil.rmtree(tmp_path / "keys")
        third = mailpipe(*ben, password="ben-pw", cwd=tmp_path)
        # Then the one line names the owner, the missing key file and the option that solves it
        assert third.returncode == 1
        [line] = third.stderr.splitlines()
        assert "'operator'" in line and "key file" in line and "--owner NAME" in line
        # And with an owner of its own, the sync works
        own = mailpipe(*ben, "--owner", "ben", password="ben-pw", cwd=tmp_path)
        assert own.returncode == 0, own.stderr
