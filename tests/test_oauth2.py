"""XOAUTH2 against a real Dovecot whose oauth2 passdb asks a local token-introspection endpoint."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from imapclient.exceptions import LoginError

from mailpipe import db, imap
from mailpipe.accounts import add_account, create_user
from mailpipe.failures import classify
from mailpipe.imap import ImapSettings
from mailpipe.sync import sync_account
from mailpipe.vocabulary import ErrorClass
from tests.support.dovecot import DOVECOT, Dovecot
from tests.support.messages import plain_message as message

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
        self.down = False
        self.lock = threading.Lock()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/token"

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
        if self.down:
            return 503, {"error": "temporarily_unavailable"}
        refresh_token = form.get("refresh_token", [""])[0]
        with self.lock:
            self.refreshes.append(refresh_token)
            user = self.refresh_tokens.pop(refresh_token, None)  # spent: rotation
            if form.get("grant_type") != ["refresh_token"] or user is None:
                return 400, {"error": "invalid_grant"}
            access = "at-" + secrets.token_urlsafe(16)
            self.tokens[access] = user
            self.expiry[access] = time.time() + ACCESS_SECONDS
            rotated = self.issue_refresh_token(user)
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_SECONDS,
            "refresh_token": rotated,
        }


class _Handler(BaseHTTPRequestHandler):
    server: Introspection

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


@pytest.fixture(scope="module")
def oauth() -> Iterator[tuple[Dovecot, Introspection]]:
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
    result = sync_account(sessions, account_id=account.id, key=key)
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
            "mailpipe-test",
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
