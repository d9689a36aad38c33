"""Diagnostics against a real Dovecot: each check's verdict, reasons in plain words, no secrets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from cli.diagnose import describe_diagnosis
from mailpipe import db, diagnostics, grants, imap
from mailpipe.accounts import add_account, create_user
from mailpipe.diagnostics import (
    CHECKS,
    FAILED,
    IN_SYNC,
    MISSING,
    NEW_MAIL,
    NOT_SYNCED,
    OK,
    SKIPPED,
    UIDVALIDITY_CHANGED,
    diagnose,
    diagnosis_result,
    run_checks,
)
from mailpipe.diagnostics.suite import ALREADY_LOGGED_IN
from mailpipe.errors import NotFound
from mailpipe.imap import ImapSettings
from mailpipe.models import Base, DiagnosticsResult, utcnow
from mailpipe.sync import sync_account
from tests.support.dovecot import Dovecot
from tests.support.faultproxy import FaultProxy
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK

FAST_KDF = 1_000
AFTER_LOGIN = CHECKS[CHECKS.index("login") + 1 :]


class GmailLikeDovecot(Dovecot):
    """The test Dovecot plus what the shared one lacks: a quota, special-use folders, Gimap's ID
    and a greeting that names the host (which the output must not repeat)."""

    def _write_config(self) -> None:
        super()._write_config()
        config = self.config_path.read_text()
        config = config.replace(
            "mail_plugins = $mail_plugins listescape",
            "mail_plugins = $mail_plugins listescape quota",
        )
        config = config.replace(
            "  separator = /\n}",
            "  separator = /\n"
            "  mailbox Sent {\n    auto = subscribe\n    special_use = \\Sent\n  }\n"
            "  mailbox Trash {\n    auto = create\n    special_use = \\Trash\n  }\n}",
        )
        config = config.replace(
            "protocol imap {\n",
            "protocol imap {\n  mail_plugins = $mail_plugins imap_quota\n"
            '  imap_id_send = name GImap vendor "Google, Inc."\n',
        )
        config += (
            "plugin {\n  quota = maildir:User quota\n  quota_rule = *:storage=10M\n}\n"
            f"login_greeting = {self.host} IMAP ready\n"
        )
        self.config_path.write_text(config)


@pytest.fixture(scope="module")
def gmail_like(dovecot) -> Dovecot:  # `dovecot` first: it skips when Dovecot is not installed
    server = GmailLikeDovecot.start(Path(dovecot.root).parent)
    try:
        yield server
    finally:
        server.close()


def settings_for(server: Dovecot, login: str, password: str, *, security: str = "none", **kw):
    port = server.tls_port if security == "tls" else server.port
    return ImapSettings(
        host=server.host, port=port, username=login, password=password, security=security, **kw
    )


def statuses(diagnosis: diagnostics.Diagnosis) -> dict[str, str]:
    return {check.name: check.status for check in diagnosis.checks}


def assert_nothing_secret(diagnosis: diagnostics.Diagnosis, *secrets: str) -> None:
    text = json.dumps(diagnosis.to_json())
    for secret in secrets:
        assert secret not in text


# -- one connection, every check ----------------------------------------------------------


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
def test_every_check_runs_over_plain_starttls_and_implicit_tls(dovecot, imap_user, security):
    # Given a mailbox with two messages, reached the way the account is set up
    login, password = imap_user
    dovecot.append(login, password, [message(1), message(2)])
    settings = settings_for(dovecot, login, password, security=security, ca_file=dovecot.ca_file)
    # When it is diagnosed
    diagnosis = diagnose(settings)
    # Then every check ran, in order, and none failed
    assert [check.name for check in diagnosis.checks] == list(CHECKS)
    assert diagnosis.ok and diagnosis.failure is None
    assert diagnosis.check("connection").details["greeting"] == "Dovecot (Debian) ready."
    tls = diagnosis.check("tls")
    if security == "none":
        assert tls.status == SKIPPED and "not encrypted" in tls.reason
    else:
        assert tls.status == OK and tls.details["protocol"] in ("TLSv1.2", "TLSv1.3")
        assert tls.details["cipher"] and tls.details["bits"] >= 128
        certificate = tls.details["certificate"]
        assert certificate["subject"] == "CN=localhost"
        assert certificate["issuer"] == "CN=mailpipe test CA"
        assert certificate["expires_in_days"] >= 0 and "127.0.0.1" in certificate["names"]
    assert diagnosis.check("login_mechanisms").details["will_use"] == "LOGIN"
    assert {"LOGIN", "PLAIN"} <= set(diagnosis.check("login_mechanisms").details["mechanisms"])
    features = diagnosis.check("capabilities").details["features"]
    assert features["IDLE"] and features["UIDPLUS"] and features["MOVE"]
    assert not features["QUOTA"] and not features["UTF8=ACCEPT"]  # Dovecot 2.3 as configured
    assert diagnosis.check("namespace").details["personal"] == [{"prefix": "", "delimiter": "/"}]
    inbox = diagnosis.check("inbox").details
    assert (inbox["exists"], inbox["uidnext"]) == (2, 3) and inbox["uidvalidity"] > 0
    assert diagnosis.check("server_id").details["fields"] == {"name": "Dovecot"}
    round_trip = diagnosis.check("round_trip").details
    assert round_trip["count"] == diagnostics.ROUND_TRIPS
    assert 0 < round_trip["min_ms"] <= round_trip["median_ms"] <= round_trip["max_ms"]
    assert diagnosis.check("quota").reason == "the server does not offer QUOTA"
    assert diagnosis.check("database").reason == "no stored account to compare with"
    # And the JSON holds neither the password nor the login name
    assert_nothing_secret(diagnosis, password, login)
    assert diagnosis.to_json()["security"] == security


def test_a_server_with_quota_and_special_use_folders_shows_them(gmail_like):
    # Given a server with a quota, special-use folders and Gimap's ID, which greets by host name
    login, password = gmail_like.new_user()
    # When it is diagnosed
    diagnosis = diagnose(settings_for(gmail_like, login, password))
    # Then the quota, the special-use folders (from a plain LIST) and the provider show
    assert diagnosis.ok
    [storage] = diagnosis.check("quota").details["resources"]
    assert (storage["resource"], storage["usage"], storage["limit"]) == ("STORAGE", 0, 10240)
    folders = diagnosis.check("folders").details
    assert folders["special_use"] == {"\\Sent": "Sent", "\\Trash": "Trash"}
    assert diagnosis.check("server_id").details["fields"]["vendor"] == "Google, Inc."
    assert diagnosis.provider == "gmail"
    # And the greeting is shown without the host name it carried
    assert diagnosis.check("connection").details["greeting"] == "[redacted] IMAP ready"
    assert_nothing_secret(diagnosis, gmail_like.host, login, password)
    # And people read one line per check
    lines = dict(
        line.split(maxsplit=2)[1:] for line in describe_diagnosis(diagnosis).splitlines()[:-1]
    )
    assert lines["quota"] == "STORAGE 0 of 10240"
    assert lines["folders"] == "3 folder(s); special use: \\Sent 'Sent', \\Trash 'Trash'"
    assert lines["server_id"] == "name=GImap vendor=Google, Inc.; provider gmail"
    assert (
        lines["tls"]
        == "the connection is not encrypted (security none): the password travels in clear"
    )


# -- failures, in plain words --------------------------------------------------------------


def test_a_wrong_password_fails_the_login_and_skips_what_follows(dovecot, imap_user):
    # Given the right login with the wrong password
    login, _password = imap_user
    # When it is diagnosed
    diagnosis = diagnose(settings_for(dovecot, login, "not-the-password"))
    # Then the login fails in plain words and nothing after it runs
    login_check = diagnosis.check("login")
    assert login_check.status == FAILED
    assert login_check.error_class == "invalid_credentials"
    assert login_check.reason == "login failed: wrong user name or password"
    assert statuses(diagnosis)["connection"] == statuses(diagnosis)["login_mechanisms"] == OK
    for name in AFTER_LOGIN:
        assert (diagnosis.check(name).status, diagnosis.check(name).reason) == (
            SKIPPED,
            "not logged in",
        )
    assert not diagnosis.ok and diagnosis.failure is login_check
    assert_nothing_secret(diagnosis, "not-the-password", login)


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_an_untrusted_certificate_fails_tls_and_shows_the_certificate(dovecot, security):
    # Given a server whose CA the client does not trust (no --ca-file)
    settings = settings_for(dovecot, "anyone", "secret-pw", security=security)
    # When it is diagnosed
    diagnosis = diagnose(settings)
    # Then TLS fails naming why, shows the certificate it was offered, and no login is tried
    tls = diagnosis.check("tls")
    assert (tls.status, tls.error_class) == (FAILED, "tls_error")
    assert "not trusted" in tls.reason
    assert tls.details["certificate"]["issuer"] == "CN=mailpipe test CA"
    assert diagnosis.check("login").status == SKIPPED
    expected = OK if security == "starttls" else FAILED  # implicit TLS fails before the greeting
    assert diagnosis.check("connection").status == expected


def test_a_refused_connection_says_so(dovecot):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    diagnosis = diagnose(
        ImapSettings(
            host="127.0.0.1", port=closed_port, username="u", password="p", security="none"
        )
    )
    connection = diagnosis.check("connection")
    assert (connection.status, connection.reason) == (FAILED, "connection refused")
    assert connection.error_class == "temporarily_unavailable"
    assert {check.status for check in diagnosis.checks[1:]} == {SKIPPED}


def test_a_stalled_server_gives_a_timeout_reason(dovecot, imap_user):
    # Given a link that passes the greeting and then nothing more
    login, password = imap_user
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as proxy:
        proxy.stall()
        settings = ImapSettings(
            host=proxy.address[0],
            port=proxy.port,
            username=login,
            password=password,
            security="none",
        )
        # When it is diagnosed with a one-second timeout
        diagnosis = diagnose(settings, timeout=1.0)
    # Then the connection is fine (the greeting named the capabilities, so nothing was asked
    # yet), and the login, the first command, fails with a timeout in plain words
    assert diagnosis.check("connection").status == OK
    login = diagnosis.check("login")
    assert (login.status, login.error_class) == (FAILED, "timeout")
    assert login.reason == "server did not answer in time"
    assert diagnosis.check("inbox").status == SKIPPED
    assert diagnosis.check("inbox").reason == "not logged in"


def test_checks_run_on_an_open_connection_and_stop_where_it_is_lost(dovecot, imap_user):
    # Given a connection already logged in (as the fetch's own connection is)
    login, password = imap_user
    client = imap.connect(
        settings_for(dovecot, login, password, security="starttls", ca_file=dovecot.ca_file)
    )
    try:
        # When the suite runs on it
        diagnosis = run_checks(client, redact=[login])
        # Then it runs without logging in again, TLS read from the STARTTLS socket
        assert diagnosis.ok
        assert diagnosis.check("login").status == OK
        assert diagnosis.check("tls").details["certificate"]["subject"] == "CN=localhost"
        mechanisms = diagnosis.check("login_mechanisms")
        assert (mechanisms.status, mechanisms.reason) == (SKIPPED, ALREADY_LOGGED_IN)
        assert diagnosis.check("inbox").status == OK
        assert_nothing_secret(diagnosis, login, password)
        # When the connection dies and the suite runs again
        client.socket().shutdown(socket.SHUT_RDWR)
        broken = run_checks(client)
    finally:
        imap.shutdown(client)
    # Then the first check that talks to the server fails, and the rest say why they were skipped
    assert broken.check("login").status == FAILED
    assert broken.check("inbox").reason == "the connection was lost during the login check"
    assert statuses(broken)["quota"] == SKIPPED


def test_checks_on_a_connection_not_logged_in_fail_the_login_check(dovecot):
    # Given a connection that has read the greeting and not logged in
    client = imap.open_connection(settings_for(dovecot, "anyone", "secret-pw"))
    try:
        # When the suite runs on it
        diagnosis = run_checks(client)
    finally:
        imap.shutdown(client)
    # Then the login check says so, and the greeting was still read
    login_check = diagnosis.check("login")
    assert (login_check.status, login_check.reason) == (FAILED, "the connection is not logged in")
    assert diagnosis.check("connection").status == OK


# -- the database's view against the server's ---------------------------------------------


@pytest.fixture
def stored(dovecot, imap_user, tmp_path):
    """An account in a fresh SQLite database, for the folder comparison."""
    login, password = imap_user
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = settings_for(dovecot, login, password)
    with sessions.begin() as session:
        user, key = create_user(session, "alice", "pw", iterations=FAST_KDF)
        account_id = add_account(session, user, key, settings, folders=["INBOX", "Archiv"]).id
    try:
        yield sessions, account_id, key, settings
    finally:
        engine.dispose()


def folder_states(diagnosis: diagnostics.Diagnosis) -> dict[str, str]:
    return {f["folder"]: f["state"] for f in diagnosis.check("database").details["folders"]}


def test_folders_compare_not_synced_in_sync_new_mail_and_uidvalidity_changed(dovecot, stored):
    sessions, account_id, key, settings = stored
    login, password = settings.username, settings.password
    dovecot.append(login, password, [message(1)], folder="Archiv")
    dovecot.append(login, password, [message(2)])

    def compare() -> dict[str, str]:
        return folder_states(diagnose(settings, sessions=sessions, account_id=account_id, key=key))

    # Given an account never synced, Then its folders are not yet synced
    assert compare() == {"INBOX": NOT_SYNCED, "Archiv": NOT_SYNCED}
    # Given a sync, Then both are in sync
    sync_account(sessions, account_id=account_id, key=key, settings=settings)
    assert compare() == {"INBOX": IN_SYNC, "Archiv": IN_SYNC}
    # Given new mail in INBOX, Then it waits there
    dovecot.append(login, password, [message(3)])
    assert compare() == {"INBOX": NEW_MAIL, "Archiv": IN_SYNC}
    # Given a server-side rebuild of Archiv, Then its UIDVALIDITY changed
    dovecot.change_uidvalidity(login, "Archiv")
    diagnosis = diagnose(settings, sessions=sessions, account_id=account_id, key=key)
    assert folder_states(diagnosis) == {"INBOX": NEW_MAIL, "Archiv": UIDVALIDITY_CHANGED}
    assert diagnosis.check("database").status == OK
    [archiv] = [
        f for f in diagnosis.check("database").details["folders"] if f["folder"] == "Archiv"
    ]
    assert archiv["database"]["uidvalidity"] != archiv["server"]["uidvalidity"]


def test_a_configured_folder_missing_on_the_server_fails_the_comparison(stored):
    # Given an account configured for INBOX and Archiv, where Archiv does not exist
    sessions, account_id, key, settings = stored
    # When it is diagnosed
    diagnosis = diagnose(settings, sessions=sessions, account_id=account_id, key=key)
    # Then the comparison fails naming the folder
    database = diagnosis.check("database")
    assert database.status == FAILED
    assert database.reason == "folder 'Archiv' is not on the server, so fetching it fails"
    assert folder_states(diagnosis) == {"INBOX": NOT_SYNCED, "Archiv": MISSING}


# -- the actor, on the stub broker ----------------------------------------------------------


def test_the_actor_runs_a_requested_diagnosis_with_a_key_grant_for_it_alone(world, monkeypatch):
    # Given a user with one account holding two messages
    alice = world.user("alice")
    account = world.account(alice, mails=2)
    login, password = alice.mailboxes[account]
    sent = []
    enqueue = world.pipeline.broker.enqueue
    monkeypatch.setattr(
        world.pipeline.broker,
        "enqueue",
        lambda message, **kw: sent.append(message) or enqueue(message, **kw),
    )
    # When she asks for a diagnosis and the worker runs it
    request_id = world.pipeline.request_diagnosis(alice.id, account, key=alice.key)
    world.wait()
    # Then the message named only the request
    assert [message.args for message in sent] == [(request_id,)]
    # And the stored report, read with her key, is the full diagnosis
    with world.sessions() as session:
        result = diagnosis_result(session, request_id, user_id=alice.id, key=alice.key)
        row = session.get_one(DiagnosticsResult, request_id)
        left = session.scalar(
            select(func.count())
            .select_from(grants.KeyGrant)
            .where(grants.KeyGrant.job_id == request_id)
        )
    assert (result.status, result.ok, result.account_id) == ("done", True, account)
    checks = {check["name"]: check for check in result.report["checks"]}
    assert checks["inbox"]["details"]["exists"] == 2
    assert checks["database"]["status"] == OK
    # And the key grant is gone, and the row keeps nothing readable of the account
    assert left == 0
    kept = repr((row.report_enc, row.error_message, row.error_class))
    for secret in (login, password, world.dovecot.host, "Dovecot"):
        assert secret not in kept
    # And nobody else can read it
    bob = world.user("bob")
    with world.sessions() as session, pytest.raises(NotFound):
        diagnosis_result(session, request_id, user_id=bob.id, key=bob.key)


def test_the_actor_records_a_failed_login_and_refuses_other_peoples_accounts(world):
    # Given alice's account with a wrong password
    alice, bob = world.user("alice"), world.user("bob")
    account = world.account(alice, password="wrong")
    # When she has it diagnosed
    request_id = world.pipeline.request_diagnosis(alice.id, account, key=alice.key)
    world.wait()
    # Then the diagnosis ran and says the login failed
    with world.sessions() as session:
        result = diagnosis_result(session, request_id, user_id=alice.id, key=alice.key)
    assert (result.status, result.ok, result.error_class) == (
        "done",
        False,
        "invalid_credentials",
    )
    # And bob cannot have her account diagnosed
    with pytest.raises(NotFound):
        world.pipeline.request_diagnosis(bob.id, account, key=bob.key)


def test_a_request_whose_grant_has_gone_fails_in_words_without_connecting(world):
    # Given a pending request whose key grant was dropped (the user logged out)
    alice = world.user("alice")
    account = world.account(alice)
    with world.sessions.begin() as session:
        request_id = diagnostics.request_diagnosis(
            session,
            user_id=alice.id,
            account_id=account,
            key=alice.key,
            public_key=grants.public_key_bytes(world.private_key),
            ttl_seconds=60,
        )
        grants.drop_job_grant(session, request_id)
    # When a worker runs it
    assert (
        diagnostics.run_requested(
            world.sessions, request_id, private_key=world.private_key, policy=LOOPBACK
        )
        is None
    )
    # Then it failed, saying the user must log in again
    with world.sessions() as session:
        result = diagnosis_result(session, request_id, user_id=alice.id, key=alice.key)
    assert (result.status, result.error) == ("failed", grants.MISSING_GRANT)
    assert result.report is None


def test_the_scheduler_tick_deletes_diagnoses_older_than_the_retention(world):
    # Given two finished diagnoses of alice's account, one 31 days old, and one still pending
    alice = world.user("alice")
    account = world.account(alice)
    old, recent = (
        world.pipeline.request_diagnosis(alice.id, account, key=alice.key) for _ in range(2)
    )
    world.wait()
    with world.sessions.begin() as session:
        session.get_one(DiagnosticsResult, old).finished_at = utcnow() - timedelta(days=31)
        pending = diagnostics.request_diagnosis(
            session,
            user_id=alice.id,
            account_id=account,
            key=alice.key,
            public_key=grants.public_key_bytes(world.private_key),
            ttl_seconds=60,
        )
    # When the scheduler ticks (the retention is 30 days)
    from actors.schedule import schedule_due

    schedule_due()
    # Then the old diagnosis is gone; the recent and the pending one stay
    with world.sessions() as session:
        left = set(session.scalars(select(DiagnosticsResult.id)))
    assert left == {recent, pending}


# -- mailpipe diagnose ---------------------------------------------------------------------


def mailpipe(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mailpipe_diagnose_a_server_by_its_address(dovecot, imap_user):
    # Given a server reached over implicit TLS with the test CA
    login, password = imap_user
    args = ["diagnose", "--host", dovecot.host, "--port", str(dovecot.tls_port), "--user", login]
    args += ["--password-env", "IMAP_PASSWORD", "--ca-file", str(dovecot.ca_file)]
    # When it is diagnosed as JSON, and with the wrong password for people
    good = mailpipe(*args, "--json", env={"IMAP_PASSWORD": password})
    wrong = mailpipe(*args, env={"IMAP_PASSWORD": "not-the-password"})
    # Then the JSON is the whole diagnosis, and the failure is one line per check and a verdict
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert report["ok"] and [check["name"] for check in report["checks"]] == list(CHECKS)
    assert wrong.returncode == 1 and wrong.stderr == ""
    lines = wrong.stdout.strip().splitlines()
    assert len(lines) == len(CHECKS) + 1
    assert " ".join(lines[3].split()) == "failed login login failed: wrong user name or password"
    assert lines[-1] == "failed at login: login failed: wrong user name or password"
    for output in (good.stdout, wrong.stdout):
        assert password not in output and "not-the-password" not in output
        assert login not in output


def test_mailpipe_diagnose_a_stored_account_with_its_owners_password(dovecot, imap_user, tmp_path):
    # Given a stored account of the user alice, synced once
    login, password = imap_user
    dovecot.append(login, password, [message(1)])
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    settings = settings_for(dovecot, login, password)
    with sessions.begin() as session:
        user, key = create_user(session, "alice", "alice-pw", iterations=FAST_KDF)
        account_id = add_account(session, user, key, settings).id
    sync_account(sessions, account_id=account_id, key=key, settings=settings)
    engine.dispose()
    env = {"MAILPIPE_DATABASE_URL": url, "ALICE_PASSWORD": "alice-pw"}
    stored = ["diagnose", "--user", "alice", "--account", str(account_id)]
    stored += ["--password-env", "ALICE_PASSWORD"]
    # When she diagnoses it, when she names no account, and when she names someone else's
    result = mailpipe(*stored, "--json", env=env)
    neither = mailpipe("diagnose", "--user", "alice", env=env)
    missing = mailpipe(*stored[:3], "--account", str(account_id + 1), *stored[5:], env=env)
    # Then the stored settings are used and the database's view is compared with the server's
    assert result.returncode == 0, result.stderr
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["database"]["details"]["counts"] == {IN_SYNC: 1}
    # And the mistakes end in one line each
    assert (neither.returncode, neither.stderr.strip()) == (
        1,
        "mailpipe: give --host (any server) or --account (a stored account)",
    )
    assert missing.stderr.strip() == f"mailpipe: account {account_id + 1} not found"


def test_the_migration_matches_the_diagnostics_results_model(db_url):
    # Given a database migrated to head
    engine = db.make_engine(db_url)
    db.migrate(engine)
    # When it is compared with the model
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    # Then nothing about diagnostics_results is left to migrate
    assert [d for d in differences if diagnostics.REPORT_TABLE in repr(d)] == []
