"""The web app against an attacker: throttled logins, no 500 on hostile JSON, rate-limited
connection checks, background grants that end, cookies and headers for TLS, purged sessions."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
import requests
from prometheus_client import REGISTRY

from actors import PipelineBroker
from mailpipe import crypto, db, grants
from mailpipe.accounts import create_user
from mailpipe.crypto import DataKey
from mailpipe.diagnostics.requests import RATE_LIMIT
from mailpipe.settings import Settings
from tests.support.dovecot import free_ports
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
from web.sessions import SealedSessionStore, SessionStore
from web.throttle import (
    PER_NAME,
    WINDOW_SECONDS,
    LoginThrottle,
    RedisFailures,
    login_throttle,
)

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
    assert site.app.extensions["mailpipe"].throttle.name_digest("alice")[:12] in logged
    assert WRONG not in logged and PASSWORD not in logged and "alice" not in logged


def test_the_throttle_is_shared_by_every_web_process_on_the_database(site_with):  # noqa: F811
    # Given two web processes (two apps, each with its own memory) on one database, no Redis
    first = site_with()
    first.user("alice")
    second = create_app(Settings(data_dir=first.settings.data_dir), pipeline=first.pipeline)
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


def test_the_throttle_on_redis_keeps_no_name_and_ends_with_its_window(tmp_path):
    # Given web processes on the Redis broker: their throttle lives in Redis
    namespace = new_namespace()
    settings = Settings(broker_url=REDIS_URL, redis_namespace=namespace, data_dir=tmp_path)
    made = login_throttle(settings, None)
    assert isinstance(made.store, RedisFailures) and made.store.namespace == namespace
    made.store.client.close()
    # Given that store under a namespace of its own, and a clock we move
    client = redis.Redis.from_url(REDIS_URL)
    now = [1_000_000.0]
    throttle = LoginThrottle(RedisFailures(client, namespace), made.secret, clock=lambda: now[0])
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
        # And the digests are keyed with the server secret: not the unkeyed SHA-256 of the
        # name or address (that a Redis reader could compute for a guess), nor a prefix of it
        for unkeyed in (b"login|name|alice", b"login|address|192.0.2.1", b"alice", b"192.0.2.1"):
            plain = hashlib.sha256(unkeyed).hexdigest()
            assert not any(key.rsplit(":", 1)[1] in plain for key in keys)
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


# -- sessions shared by several web processes ------------------------------------------------


@pytest.fixture
def redis_namespace() -> Iterator[tuple[redis.Redis, str]]:
    namespace = new_namespace()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client, namespace
    finally:
        delete_namespace(namespace, REDIS_URL)
        client.close()


def test_a_sealed_session_opens_in_any_process_and_redis_alone_opens_nothing(redis_namespace):
    client, namespace = redis_namespace
    now = [1_000.0]
    one, other = (
        SealedSessionStore(client, namespace, idle_seconds=10, max_seconds=25, clock=lambda: now[0])
        for _ in range(2)
    )
    key = DataKey.generate()
    # Given a login in one web process
    session = one.create(user_id=7, user_name="alice", key=key)
    # When another process reads the cookie, Then it opens the same session and data key
    found = other.get(session.id)
    assert (found.user_id, found.csrf_token) == (7, session.csrf_token)
    assert found.key.export() == key.export()
    # And Redis holds the key in no usable form: not in clear, and no cookie but this one opens it
    [stored] = [client.get(k) for k in client.scan_iter(match=f"{namespace}*")]
    for encoded in (key.export().hex(), base64.b64encode(key.export()).decode()):
        assert encoded.encode() not in stored
    record_id, _, secret = session.id.partition(".")
    forged = base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")
    assert other.get(f"{record_id}.{forged}") is None
    assert other.get(record_id) is None and other.get(f".{secret}") is None
    # And a record copied under another id does not open with its cookie
    client.set(f"{namespace}:web-session:moved", stored)
    assert other.get(f"moved.{secret}") is None


def test_a_sealed_session_ends_when_idle_too_old_or_logged_out(redis_namespace):
    client, namespace = redis_namespace
    now = [1_000.0]
    store = SealedSessionStore(
        client, namespace, idle_seconds=10, max_seconds=25, clock=lambda: now[0]
    )
    session = store.create(user_id=1, user_name="alice", key=DataKey.generate())
    now[0] += 9
    assert store.get(session.id) is not None  # seen again: idle time starts over
    now[0] += 9
    assert store.get(session.id) is not None
    now[0] += 9  # 27 s old: past the maximum age however active
    assert store.get(session.id) is None
    idle = store.create(user_id=1, user_name="alice", key=DataKey.generate())
    now[0] += 11
    assert store.get(idle.id) is None
    ended = store.create(user_id=1, user_name="alice", key=DataKey.generate())
    store.end(ended.id)
    assert store.get(ended.id) is None
    assert list(client.scan_iter(match=f"{namespace}*")) == []  # nothing left behind


def test_two_web_processes_on_redis_serve_one_login(site, redis_namespace):  # noqa: F811
    # Given two web apps (two processes) on the Redis broker's settings and one database
    _client, namespace = redis_namespace
    settings = Settings(
        broker_url=REDIS_URL, redis_namespace=namespace, data_dir=site.settings.data_dir
    )
    first, second = (create_app(settings, pipeline=site.pipeline) for _ in range(2))
    alice = site.user("alice")
    # When alice logs in on the first
    browser = first.test_client()
    assert post_login(browser, "alice", PASSWORD).status_code == 303
    cookie = browser.get_cookie(SESSION_COOKIE).value
    # Then the second serves her dashboard and her API with that cookie
    other = second.test_client()
    other.set_cookie(SESSION_COOKIE, cookie)
    page = other.get("/")
    assert page.status_code == 200 and "alice" in page.text
    assert other.get("/api/jobs/history").status_code == 200
    assert alice.id == second.extensions["mailpipe"].logins.get(cookie).user_id


def test_the_notice_after_login_travels_in_the_url_and_only_ours_is_shown(site, tmp_path):  # noqa: F811
    # Given an app whose workers' key is missing, so background sync cannot be granted
    pipeline = PipelineBroker(site.sessions, settings=Settings(data_dir=tmp_path / "no-key"))
    app = create_app(Settings(data_dir=site.settings.data_dir), pipeline=pipeline)
    site.user("alice")
    browser = app.test_client()
    token = LOGIN_TOKEN.search(browser.get("/login").text).group(1)
    # When alice logs in asking for background sync
    form = {"login_token": token, "username": "alice", "password": PASSWORD, "background": "on"}
    answer = browser.post("/login", data=form)
    # Then the dashboard she is sent to says why there is none (any web process can show it)
    assert answer.status_code == 303 and "notice=background_unavailable" in answer.location
    assert "Hintergrundabruf ist gerade nicht verfügbar" in browser.get(answer.location).text
    # And a notice key someone else put in a link shows nothing
    assert 'class="notice"' not in browser.get("/?notice=%3Cscript%3E").text


def test_gunicorn_processes_share_one_login(tmp_path, redis_namespace):
    # Given `mailpipe web --workers 2` on the Redis broker (gunicorn) and a user
    _client, namespace = redis_namespace
    url = f"sqlite:///{tmp_path / 'web.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    with db.session_factory(engine).begin() as session:
        create_user(session, "alice", PASSWORD, iterations=1_000)
    engine.dispose()
    [port] = free_ports(1)
    token_file = tmp_path / "metrics-token"
    token_file.write_text("scraper")
    env = {
        "PATH": "/usr/bin:/bin",
        "MAILPIPE_BROKER_URL": REDIS_URL,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_DATABASE_URL": url,
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_METRICS_TOKEN_FILE": str(token_file),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "web-metrics"),
    }
    command = [sys.executable, "-m", "cli", "web", "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        browser = requests.Session()
        deadline = time.monotonic() + 60
        while True:
            try:
                form = browser.get(f"{base}/login", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "web did not start"
                time.sleep(0.2)
        # (gunicorn spawns its workers a moment apart: wait for the second one)
        while len(subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                 text=True).stdout.split()) < 2:  # fmt: skip
            assert time.monotonic() < deadline, "the second web process did not start"
            time.sleep(0.1)
        # When she logs in once
        token = LOGIN_TOKEN.search(form.text).group(1)
        answer = browser.post(
            f"{base}/login",
            data={"login_token": token, "username": "alice", "password": PASSWORD},
            allow_redirects=False,
            timeout=30,
        )
        assert answer.status_code == 303
        # Then every request is served, whichever of the two processes takes it
        assert len(subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                  text=True).stdout.split()) == 2  # fmt: skip
        answers = [browser.get(f"{base}/api/jobs/history", timeout=30) for _ in range(20)]
        assert [a.status_code for a in answers] == [200] * 20
        # And /metrics counts the one login whichever process the scraper reaches
        scraper = {"Authorization": "Bearer scraper"}
        for _ in range(6):
            exposed = requests.get(f"{base}/metrics", headers=scraper, timeout=30).text
            assert 'mailpipe_web_logins_total{outcome="success"} 1.0' in exposed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_several_web_processes_need_the_redis_broker(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MAILPIPE_DATA_DIR": str(tmp_path)}
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "web", "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "needs MAILPIPE_BROKER_URL=redis://" in refused.stderr


def test_the_throttle_sees_the_clients_address_only_through_a_trusted_proxy(site_with, caplog):  # noqa: F811
    # Given an app behind one trusted proxy, and one that trusts none (the default)
    caplog.set_level(logging.WARNING, logger="web.app")
    for trusted, seen in ((1, "203.0.113.5"), (0, "10.0.0.1")):
        app = site_with(trusted_proxies=trusted)
        client = app.app.test_client()
        token = LOGIN_TOKEN.search(client.get("/login").text).group(1)
        caplog.clear()
        # When a wrong login arrives from the proxy, forwarded for a client
        client.post(
            "/login",
            data={"login_token": token, "username": "nobody", "password": WRONG},
            headers={"X-Forwarded-For": "203.0.113.5"},
            environ_base={"REMOTE_ADDR": "10.0.0.1"},
        )
        # Then the failure is counted for the client only when the proxy is trusted (else a
        # client could name any address and escape its limit)
        [record] = [r.getMessage() for r in caplog.records if "login failed" in r.getMessage()]
        assert record.endswith(f"from {seen}")
