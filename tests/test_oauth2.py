"""XOAUTH2 against a real Dovecot whose oauth2 passdb asks a local token-introspection endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from imapclient.exceptions import LoginError
from prometheus_client import REGISTRY

from mailpipe import db, grants, health, imap, oauth2
from mailpipe.accounts import add_account, create_user, read_credentials, write_credentials
from mailpipe.failures import classify
from mailpipe.imap import ImapSettings
from mailpipe.models import MailAccount
from mailpipe.models import User as UserRow
from mailpipe.policies import WatchPolicy
from mailpipe.retry import RetryPolicy
from mailpipe.sync import sync_account
from mailpipe.vocabulary import ErrorClass, Health
from mailpipe.watcher import Watcher
from metrics.observer import MetricsObserver, WatchMetrics
from tests.support.dovecot import DOVECOT, Dovecot
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK
from tests.support.turnproxy import TurnProxy
from tests.test_web_api import embedded_worker, logged_in, make_site, wait_checked, wait_final

OAUTH2_CONFIG = """
auth_mechanisms = plain login xoauth2 oauthbearer
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {conf}
}}
"""
INTROSPECTION = """introspection_mode = post
introspection_url = http://127.0.0.1:{port}/introspect
username_attribute = username
active_attribute = active
active_value = true
"""


ACCESS_SECONDS = 2.0
CLIENT_ID = "mailpipe-test"
HANG_GUARD = 60.0  # only so a broken build fails instead of hanging; no timing is asserted


class Introspection(ThreadingHTTPServer):
    """A small OAuth2 authorization server: RFC 7662 introspection for Dovecot, and a token
    endpoint whose access tokens live 2 s and whose refresh tokens are rotated on every use."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens: dict[str, str] = {}  # access token -> user
        self.expiry: dict[str, float] = {}  # access token -> when it stops being active
        self.refresh_tokens: dict[str, str] = {}  # live refresh token -> user
        self.asked: list[str] = []
        self.refreshes: list[str] = []  # refresh tokens presented, in order
        self.codes: dict[str, dict[str, str]] = {}  # authorization code -> what was asked
        self.down = False
        self.deny = False  # the user declines at the provider
        self.delay = 0.0  # seconds each refresh takes, to hold two refreshes side by side
        self.lock = threading.Lock()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/token"

    def provider(self, server: Dovecot) -> oauth2.Provider:
        """This server as the operator's generic provider, with the Dovecot as its IMAP host."""
        return oauth2.Provider(
            name="generic",
            display="Testanbieter",
            authorize_url=self.token_url.replace("/token", "/authorize"),
            token_url=self.token_url,
            scope="imap offline_access",
            imap_host=server.host,
            imap_port=server.port,
            imap_security="none",
            client_id=CLIENT_ID,
        )

    def issue_refresh_token(self, user: str) -> str:
        token = "rt-" + secrets.token_urlsafe(16)
        self.refresh_tokens[token] = user
        return token

    def active(self, token: str) -> str | None:
        user = self.tokens.get(token)
        if user is None or self.expiry.get(token, float("inf")) <= time.time():
            return None
        return user

    def exchange(self, form: dict[str, list[str]]) -> tuple[int, dict]:
        if form.get("client_id") != [CLIENT_ID]:
            return 401, {"error": "invalid_client"}
        if self.down:
            return 503, {"error": "temporarily_unavailable"}
        if form.get("grant_type") == ["authorization_code"]:
            return self.redeem(form)
        refresh_token = form.get("refresh_token", [""])[0]
        time.sleep(self.delay)
        with self.lock:
            self.refreshes.append(refresh_token)
            user = self.refresh_tokens.pop(refresh_token, None)  # spent: rotation
            if form.get("grant_type") != ["refresh_token"] or user is None:
                return 400, {"error": "invalid_grant"}
            return 200, self.issue(user)

    def authorize(self, query: dict[str, list[str]]) -> str:
        """The user agrees at once (unless `deny`): a one-time code bound to the PKCE challenge
        and the redirect."""
        redirect = query["redirect_uri"][0]
        if self.deny:
            return f"{redirect}?{urlencode({'error': 'access_denied', 'state': query['state'][0]})}"
        code = "code-" + secrets.token_urlsafe(16)
        self.codes[code] = {name: values[0] for name, values in query.items()}
        return f"{redirect}?{urlencode({'code': code, 'state': query['state'][0]})}"

    def redeem(self, form: dict[str, list[str]]) -> tuple[int, dict]:
        """RFC 6749 4.1.3 with RFC 7636: the code once, the same redirect, the right verifier."""
        asked = self.codes.pop(form.get("code", [""])[0], None)
        verifier = form.get("code_verifier", [""])[0].encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if (
            asked is None
            or asked.get("redirect_uri") != form.get("redirect_uri", [""])[0]
            or asked.get("code_challenge_method") != "S256"
            or asked.get("code_challenge", "").encode() != challenge
        ):
            return 400, {"error": "invalid_grant"}
        with self.lock:
            return 200, self.issue(asked["login_hint"])

    def issue(self, user: str) -> dict:
        """An access token living 2 s and a new refresh token (the caller holds the lock)."""
        access = "at-" + secrets.token_urlsafe(16)
        self.tokens[access] = user
        self.expiry[access] = time.time() + ACCESS_SECONDS
        rotated = self.issue_refresh_token(user)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_SECONDS,
            "refresh_token": rotated,
        }


class _Handler(BaseHTTPRequestHandler):
    server: Introspection

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path != "/authorize":
            self.send_error(404)
            return
        self.send_response(302)
        self.send_header("Location", self.server.authorize(parse_qs(query)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        if self.path == "/token":
            status, answer = self.server.exchange(form)
        else:
            token = form.get("token", [""])[0]
            self.server.asked.append(token)
            user = self.server.active(token)
            status, answer = (
                200,
                ({"active": True, "username": user} if user else {"active": False}),
            )
        body = json.dumps(answer)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def oauth(oauth_module) -> tuple[Dovecot, Introspection]:
    """The module's Dovecot and authorization server, with this test's counts starting at 0."""
    _server, auth = oauth_module
    auth.refreshes.clear()
    auth.asked.clear()
    auth.down, auth.delay, auth.deny = False, 0.0, False
    return oauth_module


@pytest.fixture(scope="module")
def oauth_module() -> Iterator[tuple[Dovecot, Introspection]]:
    if not DOVECOT.exists():
        pytest.skip(f"{DOVECOT} is missing: `make test` installs dovecot-imapd")
    introspection = Introspection()
    threading.Thread(target=introspection.serve_forever, daemon=True).start()
    # Dovecot's auth process must read the passdb's file: not from pytest's 0700 directories
    conf_dir = Path(tempfile.mkdtemp(prefix="mailpipe-oauth2-"))
    conf_dir.chmod(0o755)
    conf = conf_dir / "oauth2.conf.ext"
    conf.write_text(INTROSPECTION.format(port=introspection.server_address[1]))
    conf.chmod(0o644)
    server = Dovecot.start(
        Path(tempfile.gettempdir()), extra_config=OAUTH2_CONFIG.format(conf=conf)
    )
    try:
        yield server, introspection
    finally:
        server.close()
        introspection.shutdown()
        introspection.server_close()
        shutil.rmtree(conf_dir)


def test_account_with_an_access_token_syncs_over_xoauth2(oauth, tmp_path):
    # Given a mailbox with two messages and an access token its provider vouches for
    server, introspection = oauth
    user, password = server.new_user()
    server.append(user, password, [message(1), message(2)])
    introspection.tokens["token-for-test"] = user
    engine = db.make_engine(f"sqlite:///{tmp_path / 'oauth.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        owner, key = create_user(session, "owner", "pw", iterations=1_000)
        settings = ImapSettings(
            host=server.host,
            port=server.port,
            username=user,
            access_token="token-for-test",
            security="none",
        )
        account = add_account(session, owner, key, settings)
    # When the account, stored with its token and no password, is synced
    result = sync_account(sessions, account_id=account.id, key=key, policy=LOOPBACK)
    # Then it logged in with XOAUTH2 (the server asked the introspection endpoint) and stored both
    assert result.saved == 2
    assert introspection.asked == ["token-for-test"]
    assert f"Login: user=<{user}>, method=XOAUTH2" in server.log_path.read_text()


def test_a_token_the_provider_no_longer_accepts_is_invalid_credentials(oauth):
    # Given a token the provider has revoked
    server, _introspection = oauth
    user, _password = server.new_user()
    settings = ImapSettings(
        host=server.host, port=server.port, username=user, access_token="revoked", security="none"
    )
    # When mailpipe logs in with it
    with pytest.raises(LoginError) as refused:
        imap.connect(settings)
    failure = classify(refused.value, host=server.host)
    # Then the failure is permanent (no retries), says the token was refused, and names neither
    # token nor user
    assert failure.error_class == ErrorClass.INVALID_CREDENTIALS and not failure.transient
    assert failure.message == f"login to {server.host} failed: the access token was refused"
    assert "revoked" not in failure.message and user not in failure.message


def _sync(server: Dovecot, user: str, url: str, token_url: str, **env: str):
    """`mailpipe sync` with OAuth2 options and no password, as an operator runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "sync",
            "--host",
            server.host,
            "--port",
            str(server.port),
            "--security",
            "none",
            "--user",
            user,
            "--oauth2-token-url",
            token_url,
            "--oauth2-client-id",
            CLIENT_ID,
            "--oauth2-client-secret-env",
            "CLIENT_SECRET",
            "--oauth2-refresh-token-env",
            "REFRESH_TOKEN",
            "--db",
            url,
            "--json",
        ],
        env={**os.environ, "CLIENT_SECRET": "not-so-secret", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_one_shot_sync_refreshes_with_the_rotated_token_it_kept(oauth, tmp_path):
    # Given a mailbox with two messages and a refresh token the authorization server issued
    server, auth = oauth
    user, password = server.new_user()
    server.append(user, password, [message(1), message(2)])
    first_token = auth.issue_refresh_token(user)
    url = f"sqlite:///{tmp_path / 'oneshot.db'}"
    # When `mailpipe sync` runs with the OAuth2 options and no password
    first = _sync(server, user, url, auth.token_url, REFRESH_TOKEN=first_token)
    # Then it refreshed once (spending the token) and stored the mailbox over XOAUTH2
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["saved"] == 2
    assert auth.refreshes == [first_token] and first_token not in auth.refresh_tokens
    # When new mail arrives and a second run starts after the 2 s access token has expired,
    # with the same, now spent, refresh token in the variable
    server.append(user, password, [message(3)])
    time.sleep(ACCESS_SECONDS + 1)
    second = _sync(server, user, url, auth.token_url, REFRESH_TOKEN=first_token)
    # Then it refreshed with the rotated token it kept, and stored the new mail
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["saved"] == 1
    assert len(auth.refreshes) == 2 and auth.refreshes[1] != first_token
    # And neither refresh token is in the database in clear
    stored = (tmp_path / "oneshot.db").read_bytes()
    for token in auth.refreshes:
        assert token.encode() not in stored


def test_one_shot_sync_with_a_revoked_refresh_token_says_connect_again(oauth, tmp_path):
    # Given a refresh token the authorization server no longer knows
    server, auth = oauth
    user, _password = server.new_user()
    url = f"sqlite:///{tmp_path / 'revoked.db'}"
    # When `mailpipe sync` runs with it
    result = _sync(server, user, url, auth.token_url, REFRESH_TOKEN="rt-revoked")
    # Then it fails with one line, permanent, naming no token
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "(invalid_credentials)" in result.stderr and "connected again" in result.stderr
    assert "rt-revoked" not in result.stderr


def oauth2_account(url: str, server: Dovecot, auth: Introspection, user: str):
    """An account stored with a fresh refresh token and no access token yet."""
    engine = db.make_engine(url)
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        owner, key = create_user(session, "owner", "pw", iterations=1_000)
        settings = ImapSettings(
            host=server.host, port=server.port, username=user, access_token="", security="none"
        )
        grant = oauth2.grant(
            token_url=auth.token_url,
            client_id=CLIENT_ID,
            refresh_token=auth.issue_refresh_token(user),
        )
        account = add_account(session, owner, key, settings, oauth2=grant)
    return engine, sessions, account.id, key


def stored_grant(sessions, account_id: int, key) -> dict:
    with sessions() as session:
        return read_credentials(session.get_one(MailAccount, account_id), key)["oauth2"]


def test_an_account_keeps_syncing_across_several_token_lifetimes(oauth, tmp_path):
    # Given an OAuth2 account whose access tokens live 2 s
    server, auth = oauth
    user, password = server.new_user()
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'lifetimes.db'}", server, auth, user
    )
    tokens = oauth2.TokenSource(sessions, account_id, key, margin=0.5)
    saved = []
    # When mail arrives and the account is synced three times, each after the token lapsed
    for round_ in range(3):
        server.append(user, password, [message(round_ + 1)])
        saved.append(
            sync_account(
                sessions, account_id=account_id, key=key, tokens=tokens, policy=LOOPBACK
            ).saved
        )
        time.sleep(ACCESS_SECONDS + 0.1)
    # Then every sync logged in with a fresh token and stored its new mail
    assert saved == [1, 1, 1]
    assert tokens.refreshed == 3 and len(auth.refreshes) == 3
    # And each refresh used the token the one before it rotated in, which is the one kept
    assert len(set(auth.refreshes)) == 3
    assert stored_grant(sessions, account_id, key)["refresh_token"] in auth.refresh_tokens
    engine.dispose()


def test_a_refused_access_token_is_refreshed_once_more(oauth, tmp_path):
    # Given an OAuth2 account with an access token still within its lifetime
    server, auth = oauth
    user, password = server.new_user()
    server.append(user, password, [message(1)])
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'refused.db'}", server, auth, user
    )
    tokens = oauth2.TokenSource(sessions, account_id, key, margin=0.0)
    first = tokens.token()
    # When the provider withdraws that token early, and the account is synced (through a proxy
    # that counts each connection's round trips)
    del auth.tokens[first]
    with TurnProxy(upstream=(server.host, server.port), delay=0.02) as proxy:
        settings = ImapSettings(
            host=server.host, port=proxy.port, username=user, access_token="", security="none"
        )
        result = sync_account(
            sessions, account_id=account_id, key=key, tokens=tokens, settings=settings
        )
        seen = proxy.turns()
    # Then the refused token was refreshed once more and the sync went ahead
    assert result.saved == 1
    assert tokens.refreshed == 2
    # And the round trips of the refused connection are counted with the second's
    assert len(seen) == 2
    assert result.round_trips == sum(seen)
    engine.dispose()


def test_a_token_endpoint_that_is_down_is_transient_and_recovers(oauth, tmp_path):
    # Given an OAuth2 account and a token endpoint that answers 503
    server, auth = oauth
    user, password = server.new_user()
    server.append(user, password, [message(1)])
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'down.db'}", server, auth, user
    )
    before = stored_grant(sessions, account_id, key)
    auth.down = True
    tokens = oauth2.TokenSource(sessions, account_id, key)
    # When the account is synced
    with pytest.raises(oauth2.TokenEndpointDown) as down:
        sync_account(sessions, account_id=account_id, key=key, tokens=tokens, policy=LOOPBACK)
    # Then the failure is transient (retried), and the stored grant is untouched
    failure = classify(down.value)
    assert failure.error_class == ErrorClass.TEMPORARILY_UNAVAILABLE and failure.transient
    assert stored_grant(sessions, account_id, key) == before
    # When the endpoint is back
    auth.down = False
    # Then the next sync refreshes and stores the mail
    assert (
        sync_account(sessions, account_id=account_id, key=key, tokens=tokens, policy=LOOPBACK).saved
        == 1
    )
    engine.dispose()


def test_an_unreachable_token_endpoint_is_transient(oauth, tmp_path):
    # Given a token endpoint where nothing listens
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    # When a refresh is tried there
    with pytest.raises(oauth2.TokenEndpointDown) as down:
        oauth2.refresh(
            token_url=f"http://127.0.0.1:{port}/token", client_id=CLIENT_ID, refresh_token="rt"
        )
    # Then it is a transient failure that names no token
    assert classify(down.value).transient and "rt" not in str(down.value).split()


def test_a_revoked_refresh_token_is_permanent_and_asks_to_connect_again(oauth, tmp_path):
    # Given an OAuth2 account whose refresh token the provider revoked
    server, auth = oauth
    user, _password = server.new_user()
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'revoked.db'}", server, auth, user
    )
    auth.refresh_tokens.clear()
    tokens = oauth2.TokenSource(sessions, account_id, key)
    # When the account is synced
    with pytest.raises(oauth2.GrantRefused) as refused:
        sync_account(sessions, account_id=account_id, key=key, tokens=tokens, policy=LOOPBACK)
    failure = classify(refused.value)
    # Then the failure is permanent invalid credentials, which breaks the account with the
    # OAuth2 advice ("connect the account again", not "re-enter the password")
    assert failure.error_class == ErrorClass.INVALID_CREDENTIALS and not failure.transient
    with sessions.begin() as session:
        transition = health.record_outcome(
            session,
            account_id,
            error_class=failure.error_class,
            retry_policy=RetryPolicy(),
            circuit=health.CircuitPolicy(),
        )
    assert transition.health_after == Health.BROKEN
    with sessions() as session:
        [note] = health.notifications(session, session.get_one(MailAccount, account_id).user_id)
    assert "connect the account again" in note.message
    engine.dispose()


def test_two_workers_refreshing_at_once_keep_the_newest_token(oauth, db_url):
    # Given an OAuth2 account (on SQLite and on PostgreSQL) and a token endpoint that takes a
    # moment, so two refreshes overlap
    server, auth = oauth
    user, _password = server.new_user()
    engine, sessions, account_id, key = oauth2_account(db_url, server, auth, user)
    auth.delay = 0.3
    barrier = threading.Barrier(2)
    got: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        tokens = oauth2.TokenSource(sessions, account_id, key, margin=0.5)
        barrier.wait()
        try:
            got.append(tokens.token())
        except BaseException as error:  # the test reports it below
            errors.append(error)

    # When two workers ask for the account's token at the same moment
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    auth.delay = 0.0
    # Then neither failed, both use the same fresh token, the endpoint was asked once, and the
    # stored refresh token is the newest one (still live at the provider)
    assert errors == [] and len(got) == 2 and got[0] == got[1]
    assert len(auth.refreshes) == 1
    assert stored_grant(sessions, account_id, key)["refresh_token"] in auth.refresh_tokens
    engine.dispose()


@pytest.fixture
def site(tmp_path):
    yield from make_site(tmp_path)


def test_workers_keep_an_oauth2_account_syncing_and_a_revoked_grant_breaks_it_once(oauth, site):
    # Given a user with an OAuth2 account (access tokens living 2 s) and a worker
    server, auth = oauth
    imap_user, imap_password = server.new_user()
    anna = site.user("anna")
    with site.sessions.begin() as session:
        owner = session.get_one(UserRow, anna.id)
        settings = ImapSettings(
            host=server.host, port=server.port, username=imap_user, access_token="", security="none"
        )
        grant = oauth2.grant(
            token_url=auth.token_url,
            client_id=CLIENT_ID,
            refresh_token=auth.issue_refresh_token(imap_user),
        )
        add_account(session, owner, anna.key, settings, oauth2=grant)
    client, headers = logged_in(site, anna)
    with embedded_worker(site):
        # When mail arrives and she fetches, twice, the second time after the token lapsed
        fetched = []
        for number in (1, 2):
            server.append(imap_user, imap_password, [message(number)])
            job_id = client.post("/api/jobs/fetch", headers=headers).json["job_id"]
            fetched.append(wait_final(client, job_id))
            time.sleep(ACCESS_SECONDS + 0.1)
        # Then both fetches succeeded, each with its new mail, after a refresh each
        assert [(job["status"], job["emails_fetched"]) for job in fetched] == [
            ("success", 1),
            ("success", 1),
        ]
        assert len(auth.refreshes) == 2
        # When the provider revokes the grant and she fetches twice more
        auth.refresh_tokens.clear()
        failed = []
        for _ in range(2):
            job_id = client.post("/api/jobs/fetch", headers=headers).json["job_id"]
            failed.append(wait_final(client, job_id))
    # Then both fail without retries, the account is BROKEN, and she is told once, in German,
    # to connect the account again
    assert [job["status"] for job in failed] == ["failed", "failed"]
    [account] = client.get("/api/accounts/health").json["accounts"]
    assert account["health"] == Health.BROKEN
    assert account["last_error_text"].endswith("bitte das Konto neu verbinden.")
    notes = client.get("/api/notifications?lang=de").json["notifications"]
    broken = [note for note in notes if note["kind"] == "account_broken"]
    assert len(broken) == 1 and "neu verbinden" in broken[0]["text"]


def test_operator_adds_an_oauth2_account_through_a_configured_provider(oauth, tmp_path):
    # Given a generic provider configured to the local authorization server, and a user
    server, auth = oauth
    imap_user, imap_password = server.new_user()
    server.append(imap_user, imap_password, [message(1)])
    first_token = auth.issue_refresh_token(imap_user)
    env = {
        **os.environ,
        "MAILPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'operator.db'}",
        "MAILPIPE_OAUTH2_GENERIC_CLIENT_ID": CLIENT_ID,
        "MAILPIPE_OAUTH2_GENERIC_AUTHORIZE_URL": auth.token_url.replace("/token", "/authorize"),
        "MAILPIPE_OAUTH2_GENERIC_TOKEN_URL": auth.token_url,
        "MAILPIPE_OAUTH2_GENERIC_IMAP_HOST": server.host,
        "MAILPIPE_OAUTH2_GENERIC_IMAP_PORT": str(server.port),
        "USER_PW": "geheim",
        "REFRESH_TOKEN": first_token,
    }

    def mailpipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True
        )

    assert mailpipe("user", "add", "anna", "--password-env", "USER_PW").returncode == 0
    # When the operator adds her account with --oauth2 and the refresh token's variable
    added = mailpipe(
        "account", "add", "--user", "anna", "--password-env", "USER_PW", "--oauth2",
        "generic", "--refresh-token-env", "REFRESH_TOKEN", "--login", imap_user,
        "--security", "none",
    )  # fmt: skip
    # Then the token was refreshed, the login checked over XOAUTH2, and the account stored
    # with the rotated token, encrypted
    assert added.returncode == 0, added.stderr
    assert auth.refreshes == [first_token]
    assert f"Login: user=<{imap_user}>, method=XOAUTH2" in server.log_path.read_text()
    stored = (tmp_path / "operator.db").read_bytes()
    assert first_token.encode() not in stored
    assert not any(token.encode() in stored for token in auth.refresh_tokens)
    # When the refresh token is spent again by a second add
    again = mailpipe(
        "account", "add", "--user", "anna", "--password-env", "USER_PW", "--oauth2",
        "generic", "--refresh-token-env", "REFRESH_TOKEN", "--login", imap_user,
    )  # fmt: skip
    # Then it is one line saying the provider refused it
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "refused the grant" in again.stderr and first_token not in again.stderr


def test_token_refreshes_are_counted_by_provider_and_outcome(oauth, tmp_path):
    # Given a Gmail-labelled observer, an OAuth2 account, and the refresh counters
    server, auth = oauth
    user, _password = server.new_user()
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'metrics.db'}", server, auth, user
    )
    observer = MetricsObserver(provider="gmail")
    before = {
        outcome: REGISTRY.get_sample_value(
            "mailpipe_oauth2_token_refreshes_total", {"provider": "gmail", "outcome": outcome}
        )
        for outcome in ("success", "refused", "unavailable")
    }
    tokens = oauth2.TokenSource(sessions, account_id, key, observer=observer)
    # When one refresh succeeds, one finds the endpoint down, and one is refused
    first = tokens.token()
    auth.down = True
    with pytest.raises(oauth2.TokenEndpointDown):
        tokens.token(refused=first)
    auth.down = False
    auth.refresh_tokens.clear()
    with pytest.raises(oauth2.GrantRefused):
        tokens.token(refused=first)
    # Then each outcome was counted once under the provider
    for outcome, value in before.items():
        after = REGISTRY.get_sample_value(
            "mailpipe_oauth2_token_refreshes_total", {"provider": "gmail", "outcome": outcome}
        )
        assert after == value + 1, outcome
    engine.dispose()


def test_the_authorization_code_flow_with_pkce_stores_the_refresh_token_encrypted(oauth, tmp_path):
    # Given the local authorization server configured as the operator's provider, and anna
    # logged in to the web app
    server, auth = oauth
    imap_user, imap_password = server.new_user()
    server.append(imap_user, imap_password, [message(1)])
    sites = make_site(tmp_path, oauth2_providers={"generic": auth.provider(server)})
    site = next(sites)
    anna = site.user("anna")
    client, headers = logged_in(site, anna)
    # When she starts "connect with" for her address
    started = client.post("/api/oauth2/generic/start", json={"login": imap_user}, headers=headers)
    # Then she is sent to the provider with state and an S256 PKCE challenge, and no verifier
    assert started.status_code == 200, started.json
    url = urlsplit(started.json["authorization_url"])
    asked = parse_qs(url.query)
    assert asked["code_challenge_method"] == ["S256"] and asked["state"][0]
    assert "code_verifier" not in url.query
    # When the provider sends her back (it agrees at once) with a forged state
    back = urlsplit(auth.authorize(asked))
    forged = client.get(f"{back.path}?code=x&state=forged")
    # Then she is back on the dashboard with the reason's text named, and nothing is stored
    assert forged.status_code == 303
    assert forged.headers["Location"] == "/#oauth2-error=oauth2_state"
    assert client.get("/api/accounts/health").json["accounts"] == []
    # When it sends her back with the real code and state (the forged try cleared the cookie:
    # she starts again)
    started = client.post("/api/oauth2/generic/start", json={"login": imap_user}, headers=headers)
    back = urlsplit(auth.authorize(parse_qs(urlsplit(started.json["authorization_url"]).query)))
    done = client.get(f"{back.path}?{back.query}")
    # Then the account is stored, logged in over XOAUTH2, and she is back on the dashboard
    assert done.status_code == 303 and done.headers["Location"] == "/"
    [account] = client.get("/api/accounts/health").json["accounts"]
    assert account["auth"] == "oauth2" and imap_user in account["label"]
    assert f"Login: user=<{imap_user}>, method=XOAUTH2" in server.log_path.read_text()
    # And the refresh token is stored only encrypted, and a fetch with it works
    stored = (tmp_path / "web.db").read_bytes()
    assert auth.refresh_tokens and not any(t.encode() in stored for t in auth.refresh_tokens)
    with embedded_worker(site):
        job_id = client.post("/api/jobs/fetch", headers=headers).json["job_id"]
        status = wait_final(client, job_id)
    assert (status["status"], status["emails_fetched"]) == ("success", 1)
    sites.close()


def test_the_connection_check_of_an_oauth2_account_refreshes_its_token(oauth, site):
    # Given an OAuth2 account whose access token has lapsed
    server, auth = oauth
    imap_user, _imap_password = server.new_user()
    anna = site.user("anna")
    with site.sessions.begin() as session:
        owner = session.get_one(UserRow, anna.id)
        settings = ImapSettings(
            host=server.host, port=server.port, username=imap_user, access_token="", security="none"
        )
        grant = oauth2.grant(
            token_url=auth.token_url,
            client_id=CLIENT_ID,
            refresh_token=auth.issue_refresh_token(imap_user),
        )
        account_id = add_account(session, owner, anna.key, settings, oauth2=grant).id
    client, headers = logged_in(site, anna)
    # When she asks for a check of its connection and a worker runs it
    with embedded_worker(site):
        asked = client.post(f"/api/accounts/{account_id}/diagnostics", headers=headers)
        check = wait_checked(client, asked.json["status_url"])
    # Then the worker refreshed the token and the login over XOAUTH2 passed
    assert check["status"] == "done" and check["ok"], check
    assert len(auth.refreshes) == 1


class WatchSeen(WatchMetrics):
    """What a watcher tells its observer: IDLE connections made, failed connections, and (to
    the metrics) token refreshes."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.reconnects: list[str] = []

    def idle_connected(self, *, provider: str) -> None:
        self.connected.set()

    def reconnect(self, *, error_class: str) -> None:
        self.reconnects.append(error_class)


@contextlib.contextmanager
def watcher(sessions, account_id: int, key) -> Iterator[tuple[queue.Queue, WatchSeen]]:
    """A watcher (in this process, on a thread of its own) holding the account through its
    owner's background grant; yields the account lists it marks for a run, and its observer."""
    private_key = X25519PrivateKey.generate()
    with sessions.begin() as session:
        user_id = session.get_one(MailAccount, account_id).user_id
        grants.grant_background(
            session,
            user_id=user_id,
            key=key,
            public_key=grants.public_key_bytes(private_key),
            ttl_seconds=3600,
        )
    marked: queue.Queue[list[int]] = queue.Queue()
    seen = WatchSeen()
    watching = Watcher(
        sessions,
        owner="test-watcher",
        private_key=private_key,
        enqueue=lambda _user, accounts, _noticed: marked.put(accounts),
        retry=RetryPolicy(min_backoff_ms=100, max_backoff_ms=200),
        policy=WatchPolicy(lease_seconds=4),
        address_policy=LOOPBACK,
        observer=seen,
    )
    loop = asyncio.new_event_loop()
    task = loop.create_task(watching.run())

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield marked, seen
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(HANG_GUARD)


def store_access_token(sessions, account_id: int, key, token: str, *, expires_at) -> None:
    """Put an access token (and when it expires) into the account's stored credentials."""
    with sessions.begin() as session:
        account = session.get_one(MailAccount, account_id)
        credentials = read_credentials(account, key)
        credentials["access_token"] = token
        credentials["oauth2"]["expires_at"] = expires_at
        write_credentials(account, key, credentials)


def refreshes_counted() -> float:
    """Successful refreshes counted for accounts of no named provider (the tests' server)."""
    labels = {"provider": "other", "outcome": "success"}
    return REGISTRY.get_sample_value("mailpipe_oauth2_token_refreshes_total", labels) or 0.0


def stored_access_token(sessions, account_id: int, key) -> str:
    with sessions() as session:
        return read_credentials(session.get_one(MailAccount, account_id), key)["access_token"]


def synced_oauth2_account(tmp_path, server: Dovecot, auth: Introspection):
    """An OAuth2 account synced once (so only mail after it is new); its IMAP user and password."""
    user, password = server.new_user()
    engine, sessions, account_id, key = oauth2_account(
        f"sqlite:///{tmp_path / 'watched.db'}", server, auth, user
    )
    tokens = oauth2.TokenSource(sessions, account_id, key)
    sync_account(sessions, account_id=account_id, key=key, tokens=tokens, policy=LOOPBACK)
    return engine, sessions, account_id, key, user, password


def test_a_watched_account_whose_token_was_withdrawn_logs_in_with_a_fresh_one(oauth, tmp_path):
    # Given an OAuth2 account synced once, whose stored access token looks good for an hour
    # but has been withdrawn by the provider
    server, auth = oauth
    engine, sessions, account_id, key, user, password = synced_oauth2_account(
        tmp_path, server, auth
    )
    withdrawn = stored_access_token(sessions, account_id, key)
    store_access_token(sessions, account_id, key, withdrawn, expires_at=time.time() + 3600)
    del auth.tokens[withdrawn]
    # When a watcher holds the account
    with watcher(sessions, account_id, key) as (marked, seen):
        # Then it connects at its first login (the refused token refreshed once more), and
        # connecting alone marks nothing
        assert seen.connected.wait(HANG_GUARD), f"no IDLE connection; failures: {seen.reconnects}"
        assert seen.reconnects == [] and marked.empty()
        # When a message arrives
        server.append(user, password, [message(1)])
        # Then the watcher notices it: the account is marked for a run
        assert marked.get(timeout=HANG_GUARD) == [account_id]
    # And the token was refreshed for it (one refresh for the sync, one for the watcher) and
    # the fresh one stored
    assert len(auth.refreshes) == 2
    assert stored_access_token(sessions, account_id, key) not in ("", withdrawn)
    engine.dispose()


def test_a_watched_account_with_no_token_stored_yet_logs_in_with_a_fresh_one(oauth, tmp_path):
    # Given an OAuth2 account synced once, with no access token stored (only its refresh token)
    server, auth = oauth
    engine, sessions, account_id, key, user, password = synced_oauth2_account(
        tmp_path, server, auth
    )
    store_access_token(sessions, account_id, key, "", expires_at=None)
    before = refreshes_counted()
    # When a watcher holds the account
    with watcher(sessions, account_id, key) as (marked, seen):
        # Then its first login refreshes the token before connecting, and connects
        assert seen.connected.wait(HANG_GUARD), f"no IDLE connection; failures: {seen.reconnects}"
        assert seen.reconnects == [] and marked.empty()
        assert len(auth.refreshes) == 2  # the sync's and the watcher's
        # And the refresh is counted as the workers' are
        assert refreshes_counted() == before + 1
        # When a message arrives
        server.append(user, password, [message(1)])
        # Then the watcher notices it: the account is marked for a run
        assert marked.get(timeout=HANG_GUARD) == [account_id]
    assert stored_access_token(sessions, account_id, key) != ""
    engine.dispose()


def failed_logins(seen, count: int) -> None:
    """Wait until the watcher has failed `count` logins (HANG_GUARD only stops a broken build)."""
    deadline = time.monotonic() + HANG_GUARD
    while len(seen.reconnects) < count:
        assert time.monotonic() < deadline, f"the watcher tried {len(seen.reconnects)} times"
        time.sleep(0.1)


def test_a_watcher_retries_a_refresh_while_the_token_endpoint_is_down(oauth, tmp_path):
    # Given a synced OAuth2 account with no access token stored, and a token endpoint that
    # answers 503
    server, auth = oauth
    engine, sessions, account_id, key, _user, _password = synced_oauth2_account(
        tmp_path, server, auth
    )
    store_access_token(sessions, account_id, key, "", expires_at=None)
    auth.down = True
    # When a watcher holds the account
    with watcher(sessions, account_id, key) as (_marked, seen):
        # Then its logins fail as temporarily unavailable (transient) and are tried again
        failed_logins(seen, 2)
        assert set(seen.reconnects) == {ErrorClass.TEMPORARILY_UNAVAILABLE}
        assert not seen.connected.is_set()
        # When the endpoint is back
        auth.down = False
        # Then the next try refreshes the token and connects
        assert seen.connected.wait(HANG_GUARD), f"no IDLE connection; failures: {seen.reconnects}"
    engine.dispose()


def test_a_watcher_stops_trying_an_account_whose_refresh_token_was_refused(oauth, tmp_path):
    # Given a synced OAuth2 account with no access token stored, whose refresh token the
    # provider revoked
    server, auth = oauth
    engine, sessions, account_id, key, _user, _password = synced_oauth2_account(
        tmp_path, server, auth
    )
    store_access_token(sessions, account_id, key, "", expires_at=None)
    auth.refresh_tokens.clear()
    # When a watcher holds the account
    with watcher(sessions, account_id, key) as (_marked, seen):
        failed_logins(seen, 1)
        time.sleep(2)  # ten times the longest backoff: time for tries that must not come
    # Then it asked for a token once, failed as invalid credentials (permanent: the account's
    # runs break it), and did not try again
    assert len(auth.refreshes) == 2  # the sync's and the watcher's
    assert seen.reconnects == [ErrorClass.INVALID_CREDENTIALS]
    assert not seen.connected.is_set()
    engine.dispose()
