"""The Dovecot fixture is a real IMAP server: these prove what other tests rely on it for."""

from __future__ import annotations

import contextlib
import email
import email.policy
import random
import secrets
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.support import dovecot as dovecot_module
from tests.support import postgres
from tests.support.dovecot import Dovecot, DovecotError, parse_uid_set
from tests.support.messages import message_date, synthetic_message

ODD_FOLDER = 'Grüße "quoted" back\\slash 日本'
MESSAGES = [
    b"From: a@example.org\r\nSubject: one\r\n\r\nfirst\r\n",
    b"From: b@example.org\r\nSubject: two\r\n\r\nsecond\r\n",
    b"From: c@example.org\r\nSubject: =?utf-8?q?dr=C3=A9i?=\r\n\r\nthird\r\n",
]


@pytest.fixture
def own_dovecot() -> Iterator[Dovecot]:
    """A private server for tests that stop or restart it, so the shared one stays untouched."""
    with Dovecot.start(Path(tempfile.gettempdir())) as server:
        yield server


# -- transport and authentication ----------------------------------------------------------


def test_plain_login_offers_starttls_and_an_empty_inbox(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    """Given a fresh user, when it logs in over the plain port, then INBOX is there and empty."""
    user, password = imap_user
    client = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    try:
        assert b"STARTTLS" in client.capabilities()
        client.login(user, password)
        assert client.select_folder("INBOX", readonly=True)[b"EXISTS"] == 0
    finally:
        client.logout()


def test_starttls_verifies_the_certificate_and_host_name(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    """Given the test CA, when upgrading with STARTTLS, then the server is verified for its IP."""
    user, password = imap_user
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    assert context.check_hostname
    client = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    try:
        client.starttls(context)
        client.login(user, password)
        sock = client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in {"TLSv1.2", "TLSv1.3"}
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        client.logout()


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_implicit_tls_matches_both_names_in_the_certificate(
    dovecot: Dovecot, imap_user: tuple[str, str], hostname: str
) -> None:
    """Given the test CA, when connecting to the imaps port by IP or name, then both verify."""
    user, password = imap_user
    client = IMAPClient(
        hostname, port=dovecot.tls_port, ssl=True, ssl_context=dovecot.ssl_context(), timeout=10
    )
    try:
        client.login(user, password)
        assert isinstance(client.socket(), ssl.SSLSocket)
    finally:
        client.logout()


def test_client_without_the_ca_gets_a_verification_error(dovecot: Dovecot) -> None:
    """Given only the system CAs, when connecting by TLS or STARTTLS, then verification fails."""
    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(
            dovecot.host,
            port=dovecot.tls_port,
            ssl=True,
            ssl_context=ssl.create_default_context(),
            timeout=10,
        )
    client = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(ssl.create_default_context())
    finally:
        with contextlib.suppress(OSError):  # the failed handshake may have closed it already
            client.shutdown()


def test_a_name_missing_from_the_certificate_fails_the_host_name_check(dovecot: Dovecot) -> None:
    """Given the right CA, when the client expects another host name, then TLS refuses it."""
    with (
        socket.create_connection((dovecot.host, dovecot.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        dovecot.ssl_context().wrap_socket(raw, server_hostname="imap.example.com")


def test_users_added_while_running_can_log_in_and_wrong_passwords_cannot(
    dovecot: Dovecot,
) -> None:
    """Given a running server, when users are added, then they log in without a reload."""
    first = dovecot.new_user()
    with dovecot.session(*first):
        pass
    name, password = dovecot.new_user()
    with dovecot.session(name, password, security="tls") as client:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    with pytest.raises(LoginError):
        dovecot.connect(name, password + "x")
    address = f"Mixed.Case-{secrets.token_hex(3)}@example.com"
    dovecot.add_user(address, "s3cret pass")
    with dovecot.session(address, "s3cret pass") as client:
        assert client.select_folder("INBOX")[b"EXISTS"] == 0
    with pytest.raises(LoginError):  # names are case-sensitive
        dovecot.connect(address.lower(), "s3cret pass")


# -- mail ----------------------------------------------------------------------------------


def test_appended_messages_are_visible_with_their_uids_and_flags(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    """Given three messages, when appended with \\Seen, then FETCH returns them byte for byte."""
    user, password = imap_user
    uids = dovecot.append(user, password, MESSAGES, flags=["\\Seen"])
    assert len(uids) == 3
    with dovecot.session(user, password) as client:
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == uids
        fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS"])
    assert [fetched[uid][b"BODY[]"] for uid in uids] == MESSAGES
    assert all(b"\\Seen" in fetched[uid][b"FLAGS"] for uid in uids)


def test_odd_folder_names_round_trip_through_list(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    """Given non-ASCII, quoted, backslashed and dotted names, when created, then LIST shows them."""
    user, password = imap_user
    names = [ODD_FOLDER, "dotted.name", "parent.v2/child", "100% & more"]
    for name in names:
        assert dovecot.append(user, password, [MESSAGES[0]], folder=name) == [1]
    with dovecot.session(user, password) as client:
        listed = {folder[2]: folder[1] for folder in client.list_folders()}
        for name in names:
            assert listed.get(name) == b"/", (name, listed)
            assert client.select_folder(name, readonly=True)[b"EXISTS"] == 1
    assert "parent.v2" in listed  # "/" is the hierarchy separator, "." is an ordinary character


def test_change_uidvalidity_is_seen_by_select(dovecot: Dovecot, imap_user: tuple[str, str]) -> None:
    """Given mailboxes with mail, when one's UIDVALIDITY changes, then SELECT reports the new one
    for it alone (a wildcard in its name must not touch the sibling it would match)."""
    user, password = imap_user
    for folder in (ODD_FOLDER, "wild*card", "wildXcard"):
        dovecot.append(user, password, MESSAGES[:1], folder=folder)

    def selected(folder: str) -> int:
        with dovecot.session(user, password) as client:
            return client.select_folder(folder, readonly=True)[b"UIDVALIDITY"]

    sibling = selected("wildXcard")
    for folder in ("INBOX", ODD_FOLDER, "wild*card"):
        before = selected(folder)
        assert dovecot.uidvalidity(user, folder) == before
        new = dovecot.change_uidvalidity(user, folder)
        assert new != before
        assert selected(folder) == new
    assert selected("wildXcard") == sibling


def test_seeded_maildir_is_served_with_sizes_and_dates(
    dovecot: Dovecot, imap_user: tuple[str, str]
) -> None:
    """Given 25 messages written into the Maildir, when fetched, then sizes and dates match."""
    user, password = imap_user
    total = dovecot.seed_maildir(user, 25, seed=7)
    with dovecot.session(user, password) as client:
        client.select_folder("INBOX", readonly=True)
        uids = client.search("ALL")
        fetched = client.fetch(uids, ["RFC822.SIZE", "INTERNALDATE", "BODY.PEEK[]"])
    assert len(uids) == 25
    assert sum(item[b"RFC822.SIZE"] for item in fetched.values()) == total
    rnd = random.Random(7)
    expected = {synthetic_message(i, rnd): message_date(i) for i in range(25)}
    for item in fetched.values():
        when = expected[item[b"BODY[]"]]
        assert item[b"INTERNALDATE"].timestamp() == when.timestamp()


def test_expunge_removes_only_the_given_uids(dovecot: Dovecot, imap_user: tuple[str, str]) -> None:
    """Given three messages, when the middle one is expunged, then the other two remain."""
    user, password = imap_user
    uids = dovecot.append(user, password, MESSAGES)
    dovecot.expunge(user, password, [uids[1]])
    with dovecot.session(user, password) as client:
        client.select_folder("INBOX", readonly=True)
        assert client.search("ALL") == [uids[0], uids[2]]


def test_synthetic_messages_are_deterministic_and_well_formed() -> None:
    """Given one seed, when messages are built twice, then bytes match and parse without defects."""
    first = [synthetic_message(i, random.Random(3)) for i in range(10)]
    again = [synthetic_message(i, random.Random(3)) for i in range(10)]
    assert first == again
    parsed = email.message_from_bytes(first[9], policy=email.policy.default)
    assert parsed["Subject"].startswith("Message 9: Quarterly report über Äpfel")
    types = [part.get_content_type() for part in parsed.walk()]
    assert types[-1] == "application/octet-stream"
    assert "text/html" in types
    assert not any(part.defects for part in parsed.walk())


def test_parse_uid_set() -> None:
    """APPENDUID answers with uid-sets; ranges in either order expand to every UID."""
    assert parse_uid_set(b"5:7,9,12:11") == [5, 6, 7, 9, 11, 12]


# -- lifecycle -----------------------------------------------------------------------------


@pytest.mark.dovecot
def test_restart_keeps_ports_users_and_mail(own_dovecot: Dovecot) -> None:
    """Given a user with mail, when the server restarts (cleanly or killed), then the same ports
    serve the same mail."""
    user, password = own_dovecot.new_user()
    uids = own_dovecot.append(user, password, MESSAGES)
    port, tls_port = own_dovecot.port, own_dovecot.tls_port
    for kill in (False, True):
        own_dovecot.restart(kill=kill)
        assert (own_dovecot.port, own_dovecot.tls_port) == (port, tls_port)
        with own_dovecot.session(user, password, security="starttls") as client:
            client.select_folder("INBOX", readonly=True)
            assert client.search("ALL") == uids


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """An empty world-searchable directory under /tmp (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailpipe-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.dovecot
def test_close_stops_the_server_and_removes_only_its_directory(public_dir: Path) -> None:
    """Given a server started beside another file, when closed, then only its own files go."""
    neighbour = public_dir / "keep-me"
    neighbour.write_text("not Dovecot's")
    server = Dovecot.start(public_dir)
    root, port = server.root, server.port
    assert root.parent == public_dir
    server.close()
    assert list(public_dir.iterdir()) == [neighbour]
    assert neighbour.read_text() == "not Dovecot's"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=5).close()


@pytest.mark.dovecot
def test_start_refuses_a_directory_the_mail_user_cannot_reach(public_dir: Path) -> None:
    """Given a 0700 directory, when starting there, then it says why and leaves nothing behind."""
    private = public_dir / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DovecotError, match="not searchable"):
        Dovecot.start(private)
    assert list(private.iterdir()) == []


@pytest.mark.dovecot
def test_start_retries_when_a_chosen_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the first port pick is already in use, when starting, then it retries on new ports."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    real_free_ports = dovecot_module.free_ports
    picks: list[list[int]] = []

    def first_pick_taken(count: int, *, host: str = "127.0.0.1") -> list[int]:
        ports = real_free_ports(count, host=host)
        picks.append([taken, *ports[1:]] if not picks else ports)
        return picks[-1]

    monkeypatch.setattr(dovecot_module, "free_ports", first_pick_taken)
    try:
        with Dovecot.start(Path(tempfile.gettempdir())) as server:
            assert len(picks) >= 2
            assert server.port != taken
            user, password = server.new_user()
            with server.session(user, password):
                pass
    finally:
        busy.close()


# -- database fixtures (conftest.py) ---------------------------------------------------------


def test_db_url_is_an_empty_database_of_its_own(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    """Given the db_url fixture, when a table is created, then the database started empty."""
    engine = sqlalchemy.create_engine(db_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE probe (id INTEGER PRIMARY KEY)"))
            conn.execute(sqlalchemy.text("INSERT INTO probe (id) VALUES (1)"))
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT count(*) FROM probe")).scalar() == 1
        expected = "sqlite" if request.node.callspec.params["db_url"] == "sqlite" else "postgresql"
        assert engine.dialect.name == expected
    finally:
        engine.dispose()


def test_postgres_databases_are_dropped_even_with_open_connections(pg_admin_url: str) -> None:
    """Given a throwaway database in use, when dropped, then it is gone; others are refused."""
    name = postgres.create_database(pg_admin_url)
    engine = sqlalchemy.create_engine(postgres.database_url(pg_admin_url, name))
    connection = engine.connect()  # an open connection must not block DROP ... WITH (FORCE)
    try:
        assert postgres.database_exists(name, pg_admin_url)
        postgres.drop_database(name, pg_admin_url)
    finally:
        connection.invalidate()
        engine.dispose()
    assert not postgres.database_exists(name, pg_admin_url)
    with pytest.raises(ValueError, match="refusing"):
        postgres.drop_database("postgres", pg_admin_url)
