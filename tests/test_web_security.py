"""The web app against an attacker: throttled logins, no 500 on hostile JSON, rate-limited
connection checks, background grants that end, cookies and headers for TLS, purged sessions."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import redis
from prometheus_client import REGISTRY

from mailpipe import crypto, grants
from mailpipe.crypto import DataKey
from mailpipe.diagnostics.requests import RATE_LIMIT
from mailpipe.settings import Settings
from tests.support.workers import REDIS_URL, ROOT, delete_namespace, new_namespace
from tests.test_web_api import (  # noqa: F401  (fixtures)
    ALERT_TOKEN,
    LOGIN_TOKEN,
    PASSWORD,
    logged_in,
    site,
    site_with,
)
from web.app import LOGIN_COOKIE, SESSION_COOKIE, create_app
from web.sessions import SessionStore
from web.throttle import PER_NAME, WINDOW_SECONDS, LoginThrottle, RedisFailures, name_digest

WRONG = "wrong horse"


def post_login(client, name: str, password: str, *, address: str = "192.0.2.10"):
    """One login through the form, as a browser at `address` would post it."""
    token = LOGIN_TOKEN.search(client.get("/login").text).group(1)
    return client.post(
        "/login",
        data={"login_token": token, "username": name, "password": password},
        environ_base={"REMOTE_ADDR": address},
    )


@pytest.fixture
def derivations(monkeypatch) -> list[int]:
    """Counts every password-based key derivation (the real one still runs)."""
    calls: list[int] = []
    real = crypto.derive_kek

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(crypto, "derive_kek", counted)
    monkeypatch.setattr("web.app.derive_kek", counted)
    return calls


def logins(outcome: str) -> float:
    return REGISTRY.get_sample_value("mailpipe_web_logins_total", {"outcome": outcome}) or 0.0


# -- login throttling ------------------------------------------------------------------------


def test_after_twelve_wrong_passwords_the_right_one_gets_429(site, derivations, caplog):  # noqa: F811
    # Given alice, and someone guessing her password from ever new addresses
    site.user("alice")
    client = site.app.test_client()
    failed_before, throttled_before = logins("failed"), logins("throttled")
    caplog.set_level(logging.WARNING, logger="web.app")
    answers = [
        post_login(client, "alice", f"{WRONG} {n}", address=f"192.0.2.{n}").status_code
        for n in range(12)
    ]
    # Then the first ten are checked and refused, the next ones are throttled
    assert answers == [401] * PER_NAME + [429] * (12 - PER_NAME)
    # When the right password comes now
    derived = len(derivations)
    right = post_login(client, "alice", PASSWORD, address="198.51.100.7")
    # Then it gets 429 with Retry-After, answered before any key derivation, and no session
    assert right.status_code == 429
    assert 0 < int(right.headers["Retry-After"]) <= WINDOW_SECONDS
    assert len(derivations) == derived
    assert "Zu viele fehlgeschlagene Anmeldungen" in right.text
    assert client.get_cookie(SESSION_COOKIE) is None
    # And each failure was counted and logged with a digest of the name, never the password
    assert logins("failed") - failed_before == PER_NAME
    assert logins("throttled") - throttled_before == 12 - PER_NAME + 1
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.count("login failed") == PER_NAME
    assert name_digest("alice")[:12] in logged
    assert WRONG not in logged and PASSWORD not in logged and "alice" not in logged


def test_the_throttle_is_shared_by_every_web_process_on_the_database(site_with):  # noqa: F811
    # Given two web processes (two apps, each with its own memory) on one database, no Redis
    first = site_with()
    first.user("alice")
    second = create_app(Settings(), pipeline=first.pipeline)
    # When the guesses go to the first one
    for n in range(PER_NAME):
        post_login(first.app.test_client(), "alice", f"{WRONG} {n}")
    # Then the second one refuses alice too, and another user there is not held back
    assert post_login(second.test_client(), "alice", PASSWORD).status_code == 429
    first.user("bob")
    assert post_login(second.test_client(), "bob", PASSWORD).status_code == 303


def test_a_right_password_clears_the_names_count(site):  # noqa: F811
    site.user("alice")
    client = site.app.test_client()
    for n in range(PER_NAME - 1):
        assert post_login(client, "alice", f"{WRONG} {n}").status_code == 401
    assert post_login(client, "alice", PASSWORD).status_code == 303
    # Then the typos before the right password no longer count
    assert post_login(site.app.test_client(), "alice", WRONG).status_code == 401
    assert post_login(site.app.test_client(), "alice", PASSWORD).status_code == 303


def test_the_throttle_on_redis_keeps_no_name_and_ends_with_its_window():
    # Given the Redis store under a namespace of its own, and a clock we move
    namespace = new_namespace()
    client = redis.Redis.from_url(REDIS_URL)
    now = [1_000_000.0]
    throttle = LoginThrottle(RedisFailures(client, namespace), clock=lambda: now[0])
    try:
        # When a name fails PER_NAME times
        for _ in range(PER_NAME):
            assert throttle.retry_after(name="alice", address="192.0.2.1") is None
            throttle.failed(name="alice", address="192.0.2.1")
            now[0] += 1
        # Then it must wait until the first failure leaves the window
        assert throttle.retry_after(name="Alice ", address="203.0.113.9") == WINDOW_SECONDS - 10
        # And Redis holds digests only, with an expiry
        keys = [key.decode() for key in client.scan_iter(match=f"{namespace}*")]
        assert keys and not any("alice" in key or "192.0.2.1" in key for key in keys)
        assert all(0 < client.ttl(key) <= WINDOW_SECONDS for key in keys)
        # When the window has passed, Then the name may try again
        now[0] += WINDOW_SECONDS
        assert throttle.retry_after(name="alice", address="192.0.2.1") is None
    finally:
        delete_namespace(namespace, REDIS_URL)
        client.close()


# -- background grants -----------------------------------------------------------------------


def test_a_login_without_background_sync_ends_an_earlier_grant(site):  # noqa: F811
    # Given alice allowed background sync at an earlier login
    alice = site.user("alice")
    logged_in(site, alice, background=True)
    with site.sessions() as session:
        assert alice.id in grants.users_with_background_grant(session)
    # When she logs in again without ticking it
    logged_in(site, alice)
    # Then the earlier grant has ended
    with site.sessions() as session:
        assert alice.id not in grants.users_with_background_grant(session)


# -- hostile input ---------------------------------------------------------------------------


def test_json_nested_too_deep_is_a_400_not_a_500(site):  # noqa: F811
    alice = site.user("alice")
    client, headers = logged_in(site, alice)
    deep = "[" * 100_000 + "]" * 100_000
    fetch = client.post(
        "/api/jobs/fetch", data=deep, headers=headers, content_type="application/json"
    )
    hook = client.post(
        "/api/alerts/alertmanager",
        data=deep,
        headers={"Authorization": f"Bearer {ALERT_TOKEN}"},
        content_type="application/json",
    )
    assert (fetch.status_code, hook.status_code) == (400, 400)
    assert fetch.json["code"] == hook.json["code"] == "bad_request"


@pytest.mark.parametrize("where", ["fingerprint", "label", "annotation"])
def test_an_alert_with_a_lone_surrogate_is_a_400(site, where):  # noqa: F811
    alert = {
        "status": "firing",
        "fingerprint": "abc",
        "startsAt": "2026-01-01T00:00:00Z",
        "labels": {"alertname": "X"},
        "annotations": {"summary": "s"},
    }
    if where == "fingerprint":
        alert["fingerprint"] = "\ud800"
    elif where == "label":
        alert["labels"]["alertname"] = "\udfff"
    else:
        alert["annotations"]["summary"] = "a \ud83d b"
    body = json.dumps({"alerts": [alert]})  # ensure_ascii: the surrogate travels as \\ud800
    response = site.app.test_client().post(
        "/api/alerts/alertmanager",
        data=body,
        headers={"Authorization": f"Bearer {ALERT_TOKEN}"},
        content_type="application/json",
    )
    assert response.status_code == 400 and response.json["code"] == "bad_request"


# -- connection checks -----------------------------------------------------------------------


def test_connection_checks_are_rate_limited_per_user(site):  # noqa: F811
    # Given alice and bob, each with an account
    alice, bob = site.user("alice"), site.user("bob")
    account, bobs = site.account(alice), site.account(bob)
    client, headers = logged_in(site, alice)
    # When alice asks for more checks within a minute than allowed
    answers = [
        client.post(f"/api/accounts/{account}/diagnostics", headers=headers)
        for _ in range(RATE_LIMIT + 1)
    ]
    # Then the last is 429 with Retry-After and a code the page has words for
    assert [a.status_code for a in answers] == [202] * RATE_LIMIT + [429]
    assert answers[-1].json["code"] == "too_many_checks"
    assert 0 < int(answers[-1].headers["Retry-After"]) <= 60
    # And bob is not held back by alice's checks
    bob_client, bob_headers = logged_in(site, bob)
    assert (
        bob_client.post(f"/api/accounts/{bobs}/diagnostics", headers=bob_headers).status_code == 202
    )


# -- TLS deployments -------------------------------------------------------------------------


def test_behind_tls_cookies_are_secure_and_hsts_is_sent(site_with):  # noqa: F811
    secure = site_with(cookie_secure=True)
    alice = secure.user("alice")
    client = secure.app.test_client()
    form = client.get("/login")
    assert client.get_cookie(LOGIN_COOKIE, path="/login").secure
    assert form.headers["Strict-Transport-Security"].startswith("max-age=")
    logged_in(secure, alice)
    # And without TLS (the default) neither is claimed
    plain = site_with()
    response = plain.app.test_client().get("/login")
    assert "Strict-Transport-Security" not in response.headers


def test_idle_sessions_are_purged_on_a_timer_without_another_login():
    # Given a session whose idle time has run out, and no login after it
    now = [0.0]
    store = SessionStore(idle_seconds=10, max_seconds=100, clock=lambda: now[0])
    store.create(user_id=1, user_name="alice", key=DataKey.generate())
    now[0] = 11
    # When the purge timer runs
    store.purge_every(0.01)
    deadline = time.monotonic() + 5
    while len(store) and time.monotonic() < deadline:
        time.sleep(0.01)
    # Then the session and its data key are gone from memory
    assert len(store) == 0


# -- operator alerts -------------------------------------------------------------------------


def test_operators_read_the_alerts_the_webhook_stored(site):  # noqa: F811
    # Given an alert Alertmanager delivered to the webhook (it belongs to no user)
    alert = {
        "status": "firing",
        "fingerprint": "f1",
        "startsAt": "2026-01-01T00:00:00Z",
        "labels": {"alertname": "MailpipeWorkerDown", "severity": "critical"},
        "annotations": {"summary": "A worker exporter is down"},
    }
    stored = site.app.test_client().post(
        "/api/alerts/alertmanager",
        json={"alerts": [alert]},
        headers={"Authorization": f"Bearer {ALERT_TOKEN}"},
    )
    assert stored.json == {"received": 1, "stored": 1}
    # When an operator asks the command line for alerts
    url = site.sessions.kw["bind"].url.render_as_string(hide_password=False)
    env = {"PATH": "/usr/bin:/bin", "MAILPIPE_DATABASE_URL": url}
    shown = subprocess.run(
        [sys.executable, "-m", "cli", "alerts", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it is there, with its severity and words, and the instant has its offset
    [note] = json.loads(shown.stdout)
    assert (note["severity"], note["message"]) == (
        "critical",
        "MailpipeWorkerDown (firing): A worker exporter is down",
    )
    assert note["created_at"].endswith("+00:00")
