"""Accounts in the web API: added only after the server accepted the login, changed, removed."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from mailpipe import health, oauth2
from mailpipe.accounts import account_folders, account_settings, add_account
from mailpipe.imap import ImapSettings
from mailpipe.models import Email, MailAccount
from mailpipe.models import User as UserRow
from mailpipe.vocabulary import CircuitState, ErrorClass, Gate, Health, ParseStatus
from tests.support.policy import LOOPBACK
from tests.test_web_api import CLOSED_PORT, logged_in, make_site
from web.openapi import OPENAPI


@pytest.fixture
def site(tmp_path):
    yield from make_site(tmp_path)


def new_account(dovecot, login: str, password: str, **extra) -> dict:
    return {
        "host": dovecot.host,
        "port": dovecot.port,
        "security": "none",
        "login": login,
        "password": password,
        **extra,
    }


def accounts(client) -> list[dict]:
    return client.get("/api/accounts/health").json["accounts"]


def stored_accounts(site) -> int:
    with site.sessions() as session:
        return session.scalar(select(func.count()).select_from(MailAccount))


def test_the_openapi_document_has_add_change_and_remove():
    # Given the API's document
    paths = OPENAPI["paths"]
    # Then it describes adding, changing and removing accounts, and the presets
    assert "post" in paths["/api/accounts"]
    assert {"patch", "delete"} <= set(paths["/api/accounts/{account_id}"])
    assert "get" in paths["/api/accounts/presets"]


def test_wrong_password_answers_422_in_the_users_language_and_stores_nothing(site, dovecot):
    # Given a logged-in user and a mailbox whose password they mistype
    user = site.user("anna")
    client, headers = logged_in(site, user)
    login, _password = dovecot.new_user()
    # When they add the account with the wrong password, asking in German and in English
    german = client.post(
        "/api/accounts?lang=de", json=new_account(dovecot, login, "wrong"), headers=headers
    )
    english = client.post(
        "/api/accounts?lang=en", json=new_account(dovecot, login, "wrong"), headers=headers
    )
    # Then both are refused with the reason in that language, and nothing is stored
    assert german.status_code == english.status_code == 422
    assert german.json["error_class"] == ErrorClass.INVALID_CREDENTIALS
    assert german.json["error"].startswith("Anmeldung fehlgeschlagen")
    assert english.json["error"].startswith("Login failed")
    assert stored_accounts(site) == 0 and accounts(client) == []


def test_an_unreachable_server_answers_422_and_stores_nothing(site):
    # Given a server address where nothing listens
    user = site.user("anna")
    client, headers = logged_in(site, user)
    body = {"host": "127.0.0.1", "port": CLOSED_PORT, "security": "none"}
    # When the user adds an account there
    answer = client.post(
        "/api/accounts?lang=en", json={**body, "login": "x", "password": "y"}, headers=headers
    )
    # Then it is refused as temporarily unavailable, in words, and nothing is stored
    assert answer.status_code == 422
    assert answer.json["error_class"] == ErrorClass.TEMPORARILY_UNAVAILABLE
    assert answer.json["error"] == "The mail server cannot be reached right now."
    assert stored_accounts(site) == 0


def test_add_list_change_password_and_remove(site, dovecot):
    # Given a logged-in user and a mailbox with its right password
    user = site.user("anna")
    client, headers = logged_in(site, user)
    login, password = dovecot.new_user()
    # When they add it
    added = client.post(
        "/api/accounts",
        json=new_account(dovecot, login, password, folders=["INBOX"], interval=600),
        headers=headers,
    )
    # Then it is stored, healthy, and listed with its login
    assert added.status_code == 201, added.json
    account_id = added.json["account_id"]
    assert added.headers["Location"] == f"/api/accounts/{account_id}"
    [listed] = accounts(client)
    assert listed["account_id"] == account_id and login in listed["label"]
    # When the provider's password changes and the account goes BROKEN with an open circuit
    new_password = password + "-2"
    dovecot.add_user(login, new_password)
    time.sleep(1.1)  # Dovecot re-reads a passwd-file at most once a second
    with site.sessions.begin() as session:
        row = session.get_one(MailAccount, account_id)
        row.health_status = Health.BROKEN
        row.circuit_state = CircuitState.OPEN
        row.last_error_class = ErrorClass.INVALID_CREDENTIALS
    # And the user first types the old password again
    refused = client.patch(
        f"/api/accounts/{account_id}", json={"password": password}, headers=headers
    )
    # Then that is refused and the account stays BROKEN
    assert refused.status_code == 422
    assert accounts(client)[0]["health"] == Health.BROKEN
    # When they enter the new password
    changed = client.patch(
        f"/api/accounts/{account_id}", json={"password": new_password}, headers=headers
    )
    # Then it is checked, stored, and the account is healthy with its circuit closed
    assert changed.status_code == 200, changed.json
    assert changed.json["health"] == Health.HEALTHY
    with site.sessions() as session:
        row = session.get_one(MailAccount, account_id)
        assert account_settings(row, user.key, policy=LOOPBACK).password == new_password
        assert row.circuit_state == CircuitState.CLOSED and row.last_error_class is None
        gate = health.circuit_gate(session, account_id, circuit=health.CircuitPolicy())
        assert gate == Gate.PASS and row.next_sync_at is not None
    # When they remove it
    removed = client.delete(f"/api/accounts/{account_id}", headers=headers)
    # Then it is gone from the list and from the database
    assert removed.status_code == 204
    assert accounts(client) == [] and stored_accounts(site) == 0


def test_removing_an_account_removes_its_mail(site):
    # Given an account with a stored mail
    user = site.user("anna")
    account_id = site.account(user)
    with site.sessions.begin() as session:
        session.add(
            Email(
                account_id=account_id,
                folder="INBOX",
                uidvalidity=1,
                uid=1,
                size=1,
                content_hash=b"0" * 32,
                raw_enc=b"x",
                status=ParseStatus.QUARANTINED,
            )
        )
    client, headers = logged_in(site, user)
    # When the account is removed
    assert client.delete(f"/api/accounts/{account_id}", headers=headers).status_code == 204
    # Then its mail is gone with it
    with site.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Email)) == 0


def test_folders_interval_and_enabled_change_without_a_login(site):
    # Given an account whose server is not reachable right now
    user = site.user("anna")
    account_id = site.account(user)
    client, headers = logged_in(site, user)
    # When the user changes its folders, interval and switches it off
    answer = client.patch(
        f"/api/accounts/{account_id}",
        json={"folders": ["INBOX", "Archiv"], "interval": 900, "enabled": False},
        headers=headers,
    )
    # Then that is stored without any connection, the folder list sealed, and shown to her
    assert answer.status_code == 200, answer.json
    assert answer.json["folders"] == ["INBOX", "Archiv"]
    with site.sessions() as session:
        row = session.get_one(MailAccount, account_id)
        assert (account_folders(row, user.key), row.sync_interval_seconds, row.enabled) == (
            ["INBOX", "Archiv"],
            900,
            False,
        )
        assert row.folders is None


@pytest.mark.parametrize("method", ["patch", "delete"])
def test_another_users_account_is_not_found_and_stays(site, method):
    # Given bob's account and alice logged in
    alice, bob = site.user("alice"), site.user("bob")
    account_id = site.account(bob)
    client, headers = logged_in(site, alice)
    # When alice changes or removes it
    answer = getattr(client, method)(
        f"/api/accounts/{account_id}", json={"interval": 900}, headers=headers
    )
    # Then it is "not found" and unchanged
    assert answer.status_code == 404
    with site.sessions() as session:
        assert session.get_one(MailAccount, account_id).sync_interval_seconds == 300


@pytest.mark.parametrize("method", ["post", "patch", "delete"])
def test_changes_without_the_csrf_token_are_refused(site, method):
    # Given a logged-in user with an account
    user = site.user("anna")
    account_id = site.account(user)
    client, _headers = logged_in(site, user)
    path = "/api/accounts" if method == "post" else f"/api/accounts/{account_id}"
    # When a request comes without the session's CSRF token
    answer = getattr(client, method)(path, json={"interval": 900})
    # Then it is refused and the account is untouched
    assert answer.status_code == 403
    assert stored_accounts(site) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"login": "a", "password": "b"}, "host"),
        ({"host": "bad host", "login": "a", "password": "b"}, "host"),
        ({"host": "h", "login": "a", "password": "b", "security": "ssl"}, "security"),
        ({"host": "h", "login": "a", "password": "b", "port": 0}, "port"),
        ({"host": "h", "login": "a", "password": "b", "interval": 5}, "interval"),
        ({"host": "h", "login": "a", "password": "b", "folders": []}, "folders"),
        ({"host": "h", "login": "a", "password": "b", "push": "yes"}, "push"),
    ],
)
def test_bad_account_input_gets_400_naming_the_field(site, body, field):
    # Given a logged-in user
    user = site.user("anna")
    client, headers = logged_in(site, user)
    # When they send an account with a bad field
    answer = client.post("/api/accounts", json=body, headers=headers)
    # Then the answer names that field, and nothing is stored
    assert answer.status_code == 400 and answer.json["field"] == field
    assert stored_accounts(site) == 0


def test_presets_fill_host_port_and_security(site):
    # Given a logged-in user
    user = site.user("anna")
    client, _headers = logged_in(site, user)
    # When the page asks for the presets
    presets = {p["id"]: p for p in client.get("/api/accounts/presets").json["presets"]}
    # Then the common providers are there with their IMAP servers
    assert presets["gmx"]["host"] == "imap.gmx.net" and presets["gmx"]["port"] == 993
    assert presets["gmail"]["oauth2"] == "google"
    assert presets["outlook"]["oauth2"] == "microsoft"
    assert {"webde", "t-online", "icloud", "yahoo", "posteo", "mailbox-org"} <= set(presets)


def test_an_oauth2_account_gets_no_password_but_the_advice_to_connect_again(site):
    # Given an account that logs in with OAuth2
    user = site.user("anna")
    with site.sessions.begin() as session:
        owner = session.get_one(UserRow, user.id)
        settings = ImapSettings(
            host="127.0.0.1", port=CLOSED_PORT, username="a", access_token="", security="none"
        )
        grant = oauth2.grant(token_url="http://127.0.0.1:1/token", client_id="c", refresh_token="r")
        account_id = add_account(session, owner, user.key, settings, oauth2=grant).id
    client, headers = logged_in(site, user)
    # When a password is sent for it
    answer = client.patch(
        f"/api/accounts/{account_id}?lang=de", json={"password": "x"}, headers=headers
    )
    # Then it is refused with the advice to connect the account again, and nothing changed
    assert answer.status_code == 400 and answer.json["code"] == "oauth2_account"
    assert "neu verbinden" in answer.json["error"]
    with site.sessions() as session:
        assert (
            account_settings(
                session.get_one(MailAccount, account_id), user.key, policy=LOOPBACK
            ).password
            is None
        )


def test_a_server_the_address_policy_refuses_answers_422_and_stores_nothing(site):
    # Given the tests' policy (loopback allowed, other private networks not)
    user = site.user("anna")
    client, headers = logged_in(site, user)
    body = {"host": "10.20.30.40", "port": 993, "login": "x", "password": "y"}
    # When the user adds an account on a private address
    answer = client.post("/api/accounts?lang=en", json=body, headers=headers)
    # Then it is refused before any connection, with the reason, and nothing is stored
    assert answer.status_code == 422
    assert answer.json["error_class"] == ErrorClass.ADDRESS_NOT_ALLOWED
    assert stored_accounts(site) == 0
