"""Settings come from the environment once, each value checked, every variable documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailpipe import settings as settings_module
from mailpipe.digests import ServerSecretError
from mailpipe.health import CircuitPolicy
from mailpipe.retry import RetryPolicy
from mailpipe.settings import Settings, SettingsError, provider_caps

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_KEY = "A" * 43 + "="  # base64 of 32 zero bytes
# A valid value, other than the default, for every variable mailpipe reads.
VALID = {
    "MAILPIPE_DATA_DIR": "/srv/mailpipe",
    "MAILPIPE_DATABASE_URL": "postgresql+psycopg://mailpipe@db/mailpipe",
    "MAILPIPE_BROKER_URL": "redis://redis:6379/0",
    "MAILPIPE_REDIS_NAMESPACE": "mp",
    "MAILPIPE_MAX_RETRIES": "5",
    "MAILPIPE_MIN_BACKOFF_MS": "100",
    "MAILPIPE_MAX_BACKOFF_MS": "2000",
    "MAILPIPE_REDIS_HEARTBEAT_MS": "30000",
    "MAILPIPE_REDIS_MAINTENANCE_CHANCE": "10",
    "MAILPIPE_MAX_CONNECTIONS_PER_HOST": "4",
    "MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER": "gmail=40, Outlook=20",
    "MAILPIPE_HOST_SLOT_TTL_MS": "60000",
    "MAILPIPE_WORKER_KEY_FILE": "/run/keys/worker.key",
    "MAILPIPE_OWNER_KEY_DIR": "/home/operator/.config/mailpipe/keys",
    "MAILPIPE_WORKER_PUBLIC_KEY": PUBLIC_KEY,
    "MAILPIPE_JOB_GRANT_TTL_SECONDS": "600",
    "MAILPIPE_JOB_RETENTION_DAYS": "7",
    "MAILPIPE_CIRCUIT_FAILURES": "3",
    "MAILPIPE_CIRCUIT_WINDOW_SECONDS": "60",
    "MAILPIPE_CIRCUIT_COOLDOWN_SECONDS": "30",
    "MAILPIPE_ALERT_TOKEN": "t",
    "MAILPIPE_ALERT_TOKEN_FILE": "/run/secrets/token",
    "MAILPIPE_METRICS_TOKEN_FILE": "/run/secrets/metrics_token",
    "MAILPIPE_SERVER_SECRET_FILE": "/run/secrets/server_secret",
    "MAILPIPE_MAX_QUEUED_JOBS": "5",
    "MAILPIPE_SESSION_IDLE_SECONDS": "60",
    "MAILPIPE_SESSION_MAX_SECONDS": "600.5",
    "MAILPIPE_BACKGROUND_GRANT_HOURS": "1",
    "MAILPIPE_COOKIE_SECURE": "true",
    "MAILPIPE_TRUSTED_PROXIES": "1",
    "MAILPIPE_DEBUG": "1",
    "MAILPIPE_OAUTH2_GOOGLE_CLIENT_ID": "123.apps.googleusercontent.com",
    "MAILPIPE_OAUTH2_GOOGLE_CLIENT_SECRET": "s",
    "MAILPIPE_OAUTH2_GOOGLE_CLIENT_SECRET_FILE": __file__,
    "MAILPIPE_OAUTH2_MICROSOFT_CLIENT_ID": "0000-1111",
    "MAILPIPE_OAUTH2_MICROSOFT_CLIENT_SECRET": "s",
    "MAILPIPE_OAUTH2_MICROSOFT_CLIENT_SECRET_FILE": __file__,
    "MAILPIPE_OAUTH2_GENERIC_CLIENT_ID": "mailpipe",
    "MAILPIPE_OAUTH2_GENERIC_CLIENT_SECRET": "s",
    "MAILPIPE_OAUTH2_GENERIC_CLIENT_SECRET_FILE": __file__,
    "MAILPIPE_OAUTH2_GENERIC_AUTHORIZE_URL": "https://id.example.org/authorize",
    "MAILPIPE_OAUTH2_GENERIC_TOKEN_URL": "https://id.example.org/token",
    "MAILPIPE_OAUTH2_GENERIC_SCOPE": "imap offline_access",
    "MAILPIPE_OAUTH2_GENERIC_IMAP_HOST": "imap.example.org",
    "MAILPIPE_OAUTH2_GENERIC_IMAP_PORT": "1993",
    "MAILPIPE_OAUTH2_GENERIC_IMAP_SECURITY": "starttls",
    "MAILPIPE_ALLOW_PRIVATE_HOSTS": "dovecot.internal, 10.0.0.0/8",
    "MAILPIPE_EXTRA_IMAP_PORTS": "1993",
    "MAILPIPE_LOG_FORMAT": "json",
    "MAILPIPE_WATCH_LEASE_SECONDS": "20",
    "MAILPIPE_WATCH_CAPACITY": "1000",
    "MAILPIPE_IDLE_RENEW_SECONDS": "300",
    "MAILPIPE_WATCH_CONNECT_THREADS": "4",
    "MAILPIPE_WATCH_RETRY_SECONDS": "120",
}


def test_an_empty_environment_gives_the_embedded_defaults(tmp_path, monkeypatch):
    # Given no MAILPIPE_* variable, in some working directory
    monkeypatch.chdir(tmp_path)
    # When the settings are read
    found = Settings.from_env({})
    # Then jobs run in process on SQLite in ./data, with the documented policies
    assert found.embedded and found.broker_url == "stub"
    assert found.database_url == f"sqlite:///{tmp_path / 'data' / 'mailpipe.db'}"
    assert found.worker_key_path == Path("data/worker.key")
    assert found.retry == RetryPolicy(max_retries=3, min_backoff_ms=1000, max_backoff_ms=30000)
    assert found.circuit == CircuitPolicy(failures=5, window_seconds=3600, cooldown_seconds=600)


def test_the_server_secret_is_made_once_in_the_data_directory_readable_by_its_owner(tmp_path):
    # Given no MAILPIPE_SERVER_SECRET_FILE and an empty data directory
    settings = Settings(data_dir=tmp_path / "data")
    # When two processes ask for the secret
    first, second = settings.server_secret(), Settings(data_dir=tmp_path / "data").server_secret()
    # Then the first made it (32 random bytes, mode 0600) and the second reads the same
    path = tmp_path / "data" / "server.secret"
    assert first == second == path.read_bytes() and len(first) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    # And another installation's data directory gets another secret
    assert Settings(data_dir=tmp_path / "other").server_secret() != first


def test_a_configured_server_secret_file_is_read_never_made(tmp_path):
    # Given MAILPIPE_SERVER_SECRET_FILE naming a file that is missing, then one too short
    missing = Settings.from_env({"MAILPIPE_SERVER_SECRET_FILE": str(tmp_path / "nope")})
    short = tmp_path / "short"
    short.write_bytes(b"x" * 8)
    # When the secret is read, Then each is one line naming the variable, and nothing is made
    with pytest.raises(ServerSecretError, match="MAILPIPE_SERVER_SECRET_FILE: cannot read"):
        missing.server_secret()
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ServerSecretError, match="holds 8 bytes, at least 32"):
        Settings(server_secret_file=short).server_secret()
    # And a file of enough random bytes is the secret
    good = tmp_path / "good"
    good.write_bytes(bytes(range(40)))
    assert Settings(server_secret_file=good).server_secret() == bytes(range(40))


def test_variables_fill_the_fields_they_name():
    # Given a few variables set, one of them empty
    environ = {
        "MAILPIPE_MAX_QUEUED_JOBS": "5",
        "MAILPIPE_COOKIE_SECURE": "true",
        "MAILPIPE_ALERT_TOKEN": "t",
        "MAILPIPE_SESSION_IDLE_SECONDS": "",
        "MAILPIPE_MAX_RETRIES": "1",
        "MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER": "gmail=40, Outlook=20",
        "MAILPIPE_WORKER_PUBLIC_KEY": PUBLIC_KEY,
    }
    # When they are read
    found = Settings.from_env(environ)
    # Then each lands typed in its field, and the empty one keeps its default
    assert (found.max_queued_jobs, found.cookie_secure, found.alert_token) == (5, True, "t")
    assert found.session_idle_seconds == Settings().session_idle_seconds
    assert found.retry.max_retries == 1
    assert found.max_connections_by_provider == {"gmail": 40, "outlook": 20}
    assert found.worker_public_key == bytes(32)


@pytest.mark.parametrize("variable", sorted(VALID))
def test_every_variable_changes_the_settings(variable):
    # Given one variable set to a valid value other than its default
    # When the settings are read, Then they differ from the defaults
    assert Settings.from_env({variable: VALID[variable]}) != Settings()


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("MAILPIPE_MAX_RETRIES", "three", "must be a whole number, not 'three'"),
        ("MAILPIPE_MAX_RETRIES", "-1", "must be 0 or more"),
        ("MAILPIPE_MIN_BACKOFF_MS", "99999", "at most MAILPIPE_MAX_BACKOFF_MS"),
        ("MAILPIPE_CIRCUIT_FAILURES", "0", "must be at least 1"),
        ("MAILPIPE_BROKER_URL", "amqp://rabbit", "must be 'stub' or a redis:// URL"),
        ("MAILPIPE_MAX_QUEUED_JOBS", "many", "must be a whole number"),
        ("MAILPIPE_MAX_QUEUED_JOBS", "0", "must be at least 1"),
        ("MAILPIPE_SESSION_MAX_SECONDS", "soon", "must be a number"),
        ("MAILPIPE_COOKIE_SECURE", "maybe", "must be true or false"),
        ("MAILPIPE_WORKER_PUBLIC_KEY", "***", "base64 of a raw 32-byte X25519 public key"),
        ("MAILPIPE_WORKER_PUBLIC_KEY", "AAAA", "base64 of a raw 32-byte X25519 public key"),
        ("MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER", "gmial=3", "unknown provider 'gmial'"),
        ("MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER", "gmail=many", "needs a number"),
        ("MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER", "gmail=0", "must be at least 1"),
        ("MAILPIPE_LOG_FORMAT", "xml", "must be one of text, json, not 'xml'"),
        ("MAILPIPE_IDLE_RENEW_SECONDS", "1800", "below 1740"),
        ("MAILPIPE_WATCH_CAPACITY", "0", "must be at least 1"),
        ("MAILPIPE_WATCH_RETRY_SECONDS", "0", "must be above 0"),
    ],
)
def test_a_wrong_value_is_one_line_naming_its_variable(variable, value, said):
    # Given a variable with a value mailpipe cannot use
    # When the settings are read, Then the error is one line naming the variable and the fault
    with pytest.raises(SettingsError, match=re.escape(said)) as refused:
        Settings.from_env({variable: value})
    message = str(refused.value)
    assert variable in message and "\n" not in message


def test_oauth2_providers_come_with_their_endpoints_and_a_secret_from_a_file(tmp_path):
    # Given Google's client id and its secret in a file, and a generic provider's endpoints
    secret = tmp_path / "google.secret"
    secret.write_text("google-secret\n")
    environ = {
        "MAILPIPE_OAUTH2_GOOGLE_CLIENT_ID": "id.apps.googleusercontent.com",
        "MAILPIPE_OAUTH2_GOOGLE_CLIENT_SECRET_FILE": str(secret),
        "MAILPIPE_OAUTH2_GENERIC_CLIENT_ID": "mailpipe",
        "MAILPIPE_OAUTH2_GENERIC_TOKEN_URL": "https://id.example.org/token",
    }
    # When the settings are read
    providers = Settings.from_env(environ).oauth2_providers
    # Then Google has its preset endpoints and the file's secret, and is ready to offer;
    # the generic provider without its authorization endpoint and IMAP host is not
    google = providers["google"]
    assert google.token_url == "https://oauth2.googleapis.com/token"
    assert google.client_secret == "google-secret" and google.configured
    assert not providers["generic"].configured and "microsoft" not in providers
    # And no secret shows in the settings' repr
    assert "google-secret" not in repr(Settings.from_env(environ))


def test_an_unreadable_secret_file_is_one_line_naming_its_variable(tmp_path):
    # Given a secret file that does not exist
    variable = "MAILPIPE_OAUTH2_MICROSOFT_CLIENT_SECRET_FILE"
    # When the settings are read, Then the error names the variable
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: str(tmp_path / "missing")})


def test_provider_caps_are_read_from_a_short_list():
    assert provider_caps("") == {}
    assert provider_caps("gmail=40, Outlook=20") == {"gmail": 40, "outlook": 20}


def test_secrets_stay_out_of_the_repr():
    # Given settings holding the alert token and URLs with passwords
    found = Settings.from_env(
        {
            "MAILPIPE_ALERT_TOKEN": "token-secret",
            "MAILPIPE_DATABASE_URL": "postgresql+psycopg://mp:db-secret@db/mp",
            "MAILPIPE_BROKER_URL": "redis://:redis-secret@redis:6379/0",
        }
    )
    # Then a log line showing them shows none of the secrets
    assert not {"token-secret", "db-secret", "redis-secret"} & set(
        re.findall(r"\w+-secret", repr(found))
    )


def test_the_readme_documents_every_variable_and_no_other():
    # Given the README's configuration table and the variables the settings read
    table = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n### ")[0]
    documented = set(re.findall(r"`(MAILPIPE_[A-Z0-9_]+)`", table))
    source = Path(settings_module.__file__).read_text()
    read = set(re.findall(r'"(MAILPIPE_[A-Z0-9_]+)"', source)) | {
        settings_module.WORKER_KEY_FILE_ENV,
        settings_module.WORKER_PUBLIC_KEY_ENV,
        settings_module.PROVIDER_CAPS_ENV,
    }
    # Then they are the same, and each has a valid example here
    assert documented == read == set(VALID)
