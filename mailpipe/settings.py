"""Settings: every `MAILPIPE_*` variable, read once by a process's entry point and handed on.

`Settings.from_env()` is called by the entry points only (the `mailpipe` command, the exporter,
`broker_config` in worker processes); they hand the one object to the broker builder, the worker
runtime and the web app, so no module reads the environment when it is imported. Each value is
checked here, and a wrong one is a one-line `SettingsError` naming its variable.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .addresses import AddressPolicy
from .digests import SERVER_SECRET_FILENAME, server_secret
from .errors import MailpipeError
from .logs import LOG_FORMATS
from .logs import TEXT as TEXT_LOGS
from .policies import CircuitPolicy, WatchPolicy
from .providers import PRESETS as OAUTH2_PRESETS
from .providers import PROVIDER_NAMES, Provider
from .retry import RetryPolicy

STUB_BROKER = "stub"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DATABASE_FILENAME = "mailpipe.db"
WORKER_KEY_FILENAME = "worker.key"
WORKER_KEY_FILE_ENV = "MAILPIPE_WORKER_KEY_FILE"
WORKER_PUBLIC_KEY_ENV = "MAILPIPE_WORKER_PUBLIC_KEY"
X25519_KEY_BYTES = 32
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
PROVIDER_CAPS_ENV = "MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER"


class SettingsError(MailpipeError, ValueError):
    """A setting with a value mailpipe cannot use; the message names the variable."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, with the embedded defaults that need no service."""

    data_dir: Path = Path("data")
    # URLs may hold passwords and the alert token is one: none of them is shown in a repr
    database_url: str = field(default="", repr=False)  # empty: mailpipe.db in data_dir
    broker_url: str = field(default=STUB_BROKER, repr=False)
    redis_namespace: str = "mailpipe"
    redis_heartbeat_ms: int = 60_000
    redis_maintenance_chance: int = 1_000  # per million commands
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    address_policy: AddressPolicy = field(default_factory=AddressPolicy)
    watch: WatchPolicy = field(default_factory=WatchPolicy)
    max_connections_per_host: int = 10
    max_connections_by_provider: Mapping[str, int] = field(default_factory=dict)
    host_slot_ttl_ms: int = 15 * 60 * 1000
    worker_key_file: Path | None = None  # None: worker.key in data_dir
    worker_public_key: bytes | None = None  # None: the key file's public half
    owner_key_dir: Path | None = None  # None: ~/.config/mailpipe/keys
    job_grant_ttl_seconds: int = 3600
    job_retention_days: int = 30
    alert_token: str | None = field(default=None, repr=False)
    alert_token_file: Path | None = None
    metrics_token_file: Path | None = None  # None: the web app serves no /metrics
    server_secret_file: Path | None = None  # None: server.secret in data_dir, made at first use
    max_queued_jobs: int = 3
    session_idle_seconds: float = 30 * 60
    session_max_seconds: float = 12 * 60 * 60
    background_grant_hours: float = 24.0
    cookie_secure: bool = False
    trusted_proxies: int = 0  # reverse proxies in front of the web app whose X-Forwarded-* count
    debug: bool = False
    log_format: str = TEXT_LOGS  # or "json": one JSON object per line (mailpipe/logs.py)
    oauth2_providers: Mapping[str, Provider] = field(default_factory=dict)  # configured only

    def __post_init__(self) -> None:
        if not self.database_url:
            path = (Path(self.data_dir) / DATABASE_FILENAME).resolve()
            object.__setattr__(self, "database_url", f"sqlite:///{path}")
        if self.broker_url != STUB_BROKER and not self.broker_url.startswith(REDIS_SCHEMES):
            raise SettingsError("MAILPIPE_BROKER_URL must be 'stub' or a redis:// URL")
        if self.worker_public_key is not None and len(self.worker_public_key) != X25519_KEY_BYTES:
            raise SettingsError(f"{WORKER_PUBLIC_KEY_ENV} must be a raw 32-byte X25519 key")
        for provider, cap in self.max_connections_by_provider.items():
            if provider not in PROVIDER_NAMES:
                raise SettingsError(_unknown_provider(provider))
            _at_least(1, f"{PROVIDER_CAPS_ENV} ({provider})", cap)
        _at_least(1, "MAILPIPE_REDIS_HEARTBEAT_MS", self.redis_heartbeat_ms)
        _at_least(0, "MAILPIPE_REDIS_MAINTENANCE_CHANCE", self.redis_maintenance_chance)
        _at_least(1, "MAILPIPE_MAX_CONNECTIONS_PER_HOST", self.max_connections_per_host)
        _at_least(1, "MAILPIPE_HOST_SLOT_TTL_MS", self.host_slot_ttl_ms)
        _at_least(1, "MAILPIPE_JOB_GRANT_TTL_SECONDS", self.job_grant_ttl_seconds)
        _at_least(1, "MAILPIPE_JOB_RETENTION_DAYS", self.job_retention_days)
        _at_least(1, "MAILPIPE_MAX_QUEUED_JOBS", self.max_queued_jobs)
        _at_least(0, "MAILPIPE_TRUSTED_PROXIES", self.trusted_proxies)
        _positive("MAILPIPE_SESSION_IDLE_SECONDS", self.session_idle_seconds)
        _positive("MAILPIPE_SESSION_MAX_SECONDS", self.session_max_seconds)
        _positive("MAILPIPE_BACKGROUND_GRANT_HOURS", self.background_grant_hours)
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"MAILPIPE_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, "
                f"not {self.log_format!r}"
            )

    @property
    def worker_key_path(self) -> Path:
        """The workers' private key file: `MAILPIPE_WORKER_KEY_FILE`, else worker.key in data_dir."""
        return self.worker_key_file or Path(self.data_dir) / WORKER_KEY_FILENAME

    def server_secret(self) -> bytes:
        """The key of the digests Redis and the database key by (`mailpipe.digests`): the
        configured file, else server.secret in data_dir, made there on first use."""
        if self.server_secret_file is not None:
            return server_secret(self.server_secret_file, create=False)
        return server_secret(Path(self.data_dir) / SERVER_SECRET_FILENAME, create=True)

    @property
    def owner_key_path(self) -> Path:
        """Where one-shot commands keep key files: `MAILPIPE_OWNER_KEY_DIR`, else in the
        operator's home, away from the database (whose copy alone must unlock nothing)."""
        return self.owner_key_dir or Path.home() / ".config" / "mailpipe" / "keys"

    @property
    def embedded(self) -> bool:
        """Whether jobs run on the in-process stub broker (the demo, a single process)."""
        return self.broker_url == STUB_BROKER

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings the environment gives; unset or empty variables keep their defaults."""
        given = _Given(environ)
        try:
            return cls(
                **given.fields(
                    data_dir=("MAILPIPE_DATA_DIR", Path),
                    database_url=("MAILPIPE_DATABASE_URL", str),
                    broker_url=("MAILPIPE_BROKER_URL", str),
                    redis_namespace=("MAILPIPE_REDIS_NAMESPACE", str),
                    redis_heartbeat_ms=("MAILPIPE_REDIS_HEARTBEAT_MS", _integer),
                    redis_maintenance_chance=("MAILPIPE_REDIS_MAINTENANCE_CHANCE", _integer),
                    max_connections_per_host=("MAILPIPE_MAX_CONNECTIONS_PER_HOST", _integer),
                    max_connections_by_provider=(PROVIDER_CAPS_ENV, provider_caps),
                    host_slot_ttl_ms=("MAILPIPE_HOST_SLOT_TTL_MS", _integer),
                    worker_key_file=(WORKER_KEY_FILE_ENV, Path),
                    worker_public_key=(WORKER_PUBLIC_KEY_ENV, _public_key),
                    owner_key_dir=("MAILPIPE_OWNER_KEY_DIR", Path),
                    job_grant_ttl_seconds=("MAILPIPE_JOB_GRANT_TTL_SECONDS", _integer),
                    job_retention_days=("MAILPIPE_JOB_RETENTION_DAYS", _integer),
                    alert_token=("MAILPIPE_ALERT_TOKEN", str),
                    alert_token_file=("MAILPIPE_ALERT_TOKEN_FILE", Path),
                    metrics_token_file=("MAILPIPE_METRICS_TOKEN_FILE", Path),
                    server_secret_file=("MAILPIPE_SERVER_SECRET_FILE", Path),
                    max_queued_jobs=("MAILPIPE_MAX_QUEUED_JOBS", _integer),
                    session_idle_seconds=("MAILPIPE_SESSION_IDLE_SECONDS", _number),
                    session_max_seconds=("MAILPIPE_SESSION_MAX_SECONDS", _number),
                    background_grant_hours=("MAILPIPE_BACKGROUND_GRANT_HOURS", _number),
                    cookie_secure=("MAILPIPE_COOKIE_SECURE", _flag),
                    trusted_proxies=("MAILPIPE_TRUSTED_PROXIES", _integer),
                    debug=("MAILPIPE_DEBUG", _flag),
                    log_format=("MAILPIPE_LOG_FORMAT", str.lower),
                ),
                retry=RetryPolicy(
                    **given.fields(
                        max_retries=("MAILPIPE_MAX_RETRIES", _integer),
                        min_backoff_ms=("MAILPIPE_MIN_BACKOFF_MS", _integer),
                        max_backoff_ms=("MAILPIPE_MAX_BACKOFF_MS", _integer),
                    )
                ),
                oauth2_providers=_oauth2_providers(given),
                circuit=CircuitPolicy(
                    **given.fields(
                        failures=("MAILPIPE_CIRCUIT_FAILURES", _integer),
                        window_seconds=("MAILPIPE_CIRCUIT_WINDOW_SECONDS", _integer),
                        cooldown_seconds=("MAILPIPE_CIRCUIT_COOLDOWN_SECONDS", _integer),
                    )
                ),
                address_policy=AddressPolicy(
                    **given.fields(
                        allow=("MAILPIPE_ALLOW_PRIVATE_HOSTS", _words),
                        extra_ports=("MAILPIPE_EXTRA_IMAP_PORTS", _ports),
                    )
                ),
                watch=WatchPolicy(
                    **given.fields(
                        lease_seconds=("MAILPIPE_WATCH_LEASE_SECONDS", _number),
                        capacity=("MAILPIPE_WATCH_CAPACITY", _integer),
                        renew_seconds=("MAILPIPE_IDLE_RENEW_SECONDS", _number),
                        connect_threads=("MAILPIPE_WATCH_CONNECT_THREADS", _integer),
                        retry_seconds=("MAILPIPE_WATCH_RETRY_SECONDS", _number),
                    )
                ),
            )
        except SettingsError:
            raise
        except ValueError as error:  # the policies check their own numbers and name them
            raise SettingsError(str(error)) from None


def _oauth2_providers(given: _Given) -> dict[str, Provider]:
    """The OAuth2 providers the variables name; Google and Microsoft bring their endpoints.
    A provider is offered only when `configured` (client id, endpoints and IMAP host known)."""
    found = {
        "google": given.fields(
            client_id=("MAILPIPE_OAUTH2_GOOGLE_CLIENT_ID", str),
            client_secret=("MAILPIPE_OAUTH2_GOOGLE_CLIENT_SECRET", str),
            secret_file=("MAILPIPE_OAUTH2_GOOGLE_CLIENT_SECRET_FILE", Path),
        ),
        "microsoft": given.fields(
            client_id=("MAILPIPE_OAUTH2_MICROSOFT_CLIENT_ID", str),
            client_secret=("MAILPIPE_OAUTH2_MICROSOFT_CLIENT_SECRET", str),
            secret_file=("MAILPIPE_OAUTH2_MICROSOFT_CLIENT_SECRET_FILE", Path),
        ),
        "generic": given.fields(
            client_id=("MAILPIPE_OAUTH2_GENERIC_CLIENT_ID", str),
            client_secret=("MAILPIPE_OAUTH2_GENERIC_CLIENT_SECRET", str),
            secret_file=("MAILPIPE_OAUTH2_GENERIC_CLIENT_SECRET_FILE", Path),
            authorize_url=("MAILPIPE_OAUTH2_GENERIC_AUTHORIZE_URL", str),
            token_url=("MAILPIPE_OAUTH2_GENERIC_TOKEN_URL", str),
            scope=("MAILPIPE_OAUTH2_GENERIC_SCOPE", str),
            imap_host=("MAILPIPE_OAUTH2_GENERIC_IMAP_HOST", str),
            imap_port=("MAILPIPE_OAUTH2_GENERIC_IMAP_PORT", _integer),
            imap_security=("MAILPIPE_OAUTH2_GENERIC_IMAP_SECURITY", str),
        ),
    }
    providers = {}
    for name, values in found.items():
        if not values:
            continue
        secret_file = values.pop("secret_file", None)
        if secret_file is not None:
            variable = f"MAILPIPE_OAUTH2_{name.upper()}_CLIENT_SECRET_FILE"
            try:
                values["client_secret"] = secret_file.read_text().strip()
            except OSError as error:
                raise SettingsError(
                    f"{variable}: cannot read {secret_file}: {error.strerror}"
                ) from None
        providers[name] = replace(OAUTH2_PRESETS[name], **values)
    return providers


def provider_caps(value: str) -> dict[str, int]:
    """Parse `gmail=40,outlook=20`: connection caps for the hosts of some providers."""
    caps = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        provider, _, number = item.partition("=")
        provider = provider.strip().lower()
        if provider not in PROVIDER_NAMES:
            raise SettingsError(_unknown_provider(provider))
        try:
            caps[provider] = int(number)
        except ValueError:
            raise SettingsError(
                f"{PROVIDER_CAPS_ENV}: {item!r} needs a number, like gmail=40"
            ) from None
    return caps


class _Given:
    """The set variables of an environment, each parsed into its field's type."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def fields(self, **wanted: tuple[str, Callable[[str], Any]]) -> dict[str, Any]:
        found = {}
        for name, (variable, parse) in wanted.items():
            value = self.environ.get(variable, "")
            if value == "":
                continue
            try:
                found[name] = parse(value)
            except SettingsError:
                raise
            except ValueError:
                raise SettingsError(f"{variable} must be {KINDS[parse]}, not {value!r}") from None
        return found


def _integer(value: str) -> int:
    return int(value)


def _number(value: str) -> float:
    return float(value)


def _words(value: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in value.split(","))))


def _ports(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _words(value))


def _flag(value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ValueError(value)


def _public_key(value: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        raise ValueError(value) from None
    if len(raw) != X25519_KEY_BYTES:
        raise ValueError(value)
    return raw


KINDS: dict[Callable[[str], Any], str] = {
    _integer: "a whole number",
    _number: "a number",
    _flag: "true or false",
    _words: "a comma-separated list",
    _ports: "a comma-separated list of port numbers",
    _public_key: "the base64 of a raw 32-byte X25519 public key",
}


def _unknown_provider(provider: str) -> str:
    return (
        f"{PROVIDER_CAPS_ENV}: unknown provider {provider!r} "
        f"(known: {', '.join(sorted(PROVIDER_NAMES))})"
    )


def _at_least(minimum: int, variable: str, value: int) -> None:
    if value < minimum:
        raise SettingsError(f"{variable} must be at least {minimum}, not {value}")


def _positive(variable: str, value: float) -> None:
    if not value > 0:
        raise SettingsError(f"{variable} must be above 0, not {value}")
