"""OAuth2 refresh: a fresh access token before the old one lapses, rotated refresh tokens kept.

An OAuth2 account stores, inside its encrypted credentials, the token endpoint, the client id,
the current refresh token and access token, and when that access token expires. The client
secret is the operator's (environment or file) and is never stored with an account.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from .accounts import OAUTH2_GRANT, read_credentials, write_credentials
from .crypto import DataKey
from .errors import MailpipeError
from .imap import ImapSettings, TokenRefused
from .models import MailAccount
from .observer import Observer
from .providers import Provider
from .vocabulary import RefreshOutcome

REFRESH_MARGIN_SECONDS = 60.0
TOKEN_TIMEOUT_SECONDS = 15.0


def client_secret(
    providers: Mapping[str, Provider], *, token_url: str, client_id: str
) -> str | None:
    """The configured secret of the client a stored grant names; None for a public client."""
    for provider in providers.values():
        if provider.token_url == token_url and provider.client_id == client_id:
            return provider.client_secret
    return None


class TokenEndpointDown(MailpipeError):
    """The token endpoint could not be reached or failed on its side: transient, retried."""


class GrantRefused(MailpipeError):
    """The provider refused the refresh token (`invalid_grant`): the user must connect again."""


class TokenRequestRefused(MailpipeError):
    """The token endpoint refused the client itself (`invalid_client` and the like)."""


@dataclass(frozen=True)
class Tokens:
    """What a token endpoint answered: an access token, its lifetime, maybe a new refresh token."""

    access_token: str = field(repr=False)
    expires_in: float | None
    refresh_token: str | None = field(default=None, repr=False)


Post = Callable[[str, dict[str, str]], tuple[int, bytes]]


def http_post(url: str, form: dict[str, str]) -> tuple[int, bytes]:
    """POST a form and return status and body; an unreachable endpoint raises TokenEndpointDown."""
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TOKEN_TIMEOUT_SECONDS) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())
    except (OSError, ValueError) as error:  # refused, DNS, timeout, TLS
        raise TokenEndpointDown(f"token endpoint {_host(url)} unreachable") from error


def refresh(
    *,
    token_url: str,
    client_id: str,
    refresh_token: str,
    client_secret: str | None = None,
    post: Post = http_post,
) -> Tokens:
    """Trade a refresh token for a new access token (RFC 6749 section 6)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    if client_secret:
        form["client_secret"] = client_secret
    return _tokens(token_url, *post(token_url, form))


def _tokens(token_url: str, status: int, body: bytes) -> Tokens:
    """The token endpoint's answer, or the failure it means (RFC 6749 section 5)."""
    try:
        answer = json.loads(body) if body else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if status >= 500 or status == 429:
        raise TokenEndpointDown(f"token endpoint {_host(token_url)} answered {status}")
    if status != 200:
        error = str(answer.get("error", "")) or f"HTTP {status}"
        if error == "invalid_grant":
            raise GrantRefused(f"token endpoint {_host(token_url)} refused the grant")
        raise TokenRequestRefused(f"token endpoint {_host(token_url)} refused: {error[:40]}")
    if not isinstance(answer.get("access_token"), str):
        raise TokenEndpointDown(f"token endpoint {_host(token_url)} sent no access token")
    expires_in = answer.get("expires_in")
    rotated = answer.get("refresh_token")
    return Tokens(
        access_token=answer["access_token"],
        expires_in=float(expires_in) if isinstance(expires_in, int | float | str) else None,
        refresh_token=rotated if isinstance(rotated, str) and rotated else None,
    )


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    provider: Provider, *, redirect_uri: str, state: str, code_challenge: str, login_hint: str
) -> str:
    """Where the user's browser goes to let this installation read their mail (code flow)."""
    query = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": provider.scope,
        "state": state,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
        "login_hint": login_hint,
        "access_type": "offline",  # Google: issue a refresh token
        "prompt": "consent",
    }
    separator = "&" if "?" in provider.authorize_url else "?"
    return provider.authorize_url + separator + urllib.parse.urlencode(query)


def exchange_code(
    provider: Provider,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    post: Post = http_post,
) -> Tokens:
    """Trade the authorization code (and the PKCE verifier) for the first tokens."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": provider.client_id,
        "code_verifier": code_verifier,
    }
    if provider.client_secret:
        form["client_secret"] = provider.client_secret
    return _tokens(provider.token_url, *post(provider.token_url, form))


def grant(
    *, token_url: str, client_id: str, refresh_token: str, tokens: Tokens | None = None
) -> dict[str, Any]:
    """A new grant as stored in an account's encrypted credentials; with the `tokens` of a first
    refresh, their rotated refresh token and their access token's expiry."""
    return {
        "token_url": token_url,
        "client_id": client_id,
        "refresh_token": (tokens and tokens.refresh_token) or refresh_token,
        "expires_at": None if tokens is None else _expires_at(tokens, time.time()),
    }


@dataclass
class TokenSource:
    """An account's access token, refreshed in a locked transaction so rotation is never lost.

    The account row is locked while the token endpoint is asked, so a second worker waits and
    then finds the fresh token instead of spending the same refresh token again. A `fallback`
    refresh token (the one an operator passes again) is tried when the stored one is refused.
    """

    sessions: sessionmaker[Session]
    account_id: int
    key: DataKey
    client_secret: str | None = field(default=None, repr=False)
    post: Post = http_post
    clock: Callable[[], float] = time.time
    margin: float = REFRESH_MARGIN_SECONDS
    providers: Mapping[str, Provider] = field(default_factory=dict)
    observer: Observer = field(default_factory=Observer)
    fallback: str | None = field(default=None, repr=False)
    refreshed: int = 0

    def token(self, *, refused: str | None = None) -> str:
        """A valid access token: the stored one while it lasts and was not `refused`, else new."""
        with self.sessions() as session:
            credentials = read_credentials(session.get_one(MailAccount, self.account_id), self.key)
        current = self._usable(credentials, refused)
        if current is not None:
            return current
        with self.sessions.begin() as session:
            # lock the row first (a no-op UPDATE: a row lock on PostgreSQL, the write lock on
            # SQLite), then read again: a worker that waited here finds the other's fresh token
            session.execute(
                update(MailAccount)
                .where(MailAccount.id == self.account_id)
                .values(credentials_enc=MailAccount.credentials_enc)
            )
            account = session.get_one(MailAccount, self.account_id, populate_existing=True)
            credentials = read_credentials(account, self.key)
            current = self._usable(credentials, refused)
            if current is not None:
                return current
            stored = credentials[OAUTH2_GRANT]
            spent = stored["refresh_token"]
            try:
                tokens = self._refresh(stored, spent)
            except GrantRefused:
                if self.fallback is None or self.fallback == spent:
                    raise
                tokens = self._refresh(stored, self.fallback)  # the operator's new token
                spent = self.fallback
            credentials["access_token"] = tokens.access_token
            credentials[OAUTH2_GRANT] = {
                **stored,
                "refresh_token": tokens.refresh_token or spent,
                "expires_at": _expires_at(tokens, self.clock()),
            }
            write_credentials(account, self.key, credentials)
            self.refreshed += 1
            return tokens.access_token

    def _usable(self, credentials: dict[str, Any], refused: str | None) -> str | None:
        """The stored access token if it lasts beyond the margin and was not refused."""
        stored = credentials.get(OAUTH2_GRANT)
        if not isinstance(stored, dict):
            raise MailpipeError(f"account {self.account_id} has no OAuth2 grant")
        current = credentials.get("access_token")
        expires_at = stored.get("expires_at")
        if not current or current == refused:
            return None
        if expires_at is not None and expires_at - self.clock() <= self.margin:
            return None
        return str(current)

    def _refresh(self, stored: dict[str, Any], refresh_token: str) -> Tokens:
        """One refresh at the token endpoint, told to the observer however it ends."""
        secret = self.client_secret or client_secret(
            self.providers, token_url=stored["token_url"], client_id=stored["client_id"]
        )
        outcome = RefreshOutcome.FAILED
        try:
            tokens = refresh(
                token_url=stored["token_url"],
                client_id=stored["client_id"],
                refresh_token=refresh_token,
                client_secret=secret,
                post=self.post,
            )
            outcome = RefreshOutcome.SUCCESS
            return tokens
        except GrantRefused:
            outcome = RefreshOutcome.REFUSED
            raise
        except TokenEndpointDown:
            outcome = RefreshOutcome.UNAVAILABLE
            raise
        finally:
            self.observer.after_token_refresh(outcome)


def _expires_at(tokens: Tokens, now: float) -> float | None:
    return None if tokens.expires_in is None else now + tokens.expires_in


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or "?"


_Connection = TypeVar("_Connection")


def logged_in(
    connect: Callable[[ImapSettings], _Connection],
    settings: ImapSettings,
    tokens: TokenSource | None,
) -> tuple[_Connection, int]:
    """Log in with `connect`; with OAuth2 a fresh token first, and a refused one refreshed once
    more (the one home of that rule, for syncs and watchers). Also the round trips a refused
    login took (its connection is gone)."""
    if tokens is None:
        return connect(settings), 0
    settings = replace(settings, access_token=tokens.token())
    try:
        return connect(settings), 0
    except TokenRefused as refused:
        fresh = replace(settings, access_token=tokens.token(refused=settings.access_token))
        return connect(fresh), refused.round_trips
