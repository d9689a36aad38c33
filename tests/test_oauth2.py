"""XOAUTH2 against a real Dovecot whose oauth2 passdb asks a local token-introspection endpoint."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
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
from tests.support.policy import LOOPBACK

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


class Introspection(ThreadingHTTPServer):
    """RFC 7662 token introspection: active for the tokens it was given, inactive otherwise."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens: dict[str, str] = {}
        self.asked: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: Introspection

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        token = form.get("token", [""])[0]
        self.server.asked.append(token)
        user = self.server.tokens.get(token)
        body = json.dumps({"active": True, "username": user} if user else {"active": False})
        self.send_response(200)
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
