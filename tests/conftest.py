"""Shared fixtures: a real Dovecot, fresh IMAP users, and throwaway SQLite/PostgreSQL databases.

Nothing here imports `mailpipe`, so the support code works while the package is being written.
Every test server listens on loopback, which mailpipe refuses for stored accounts unless allowed:
the allowance is set here, explicitly, for everything the tests start (workers, web, commands).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `.venv/bin/pytest` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

os.environ.setdefault(
    "MAILPIPE_MIN_BACKOFF_MS", "100"
)  # retries in tests wait 0.1-0.2 s, not 1-2 s
os.environ["MAILPIPE_ALLOW_PRIVATE_HOSTS"] = "127.0.0.1,::1"  # tests.support.policy.LOOPBACK_HOSTS
# one-shot commands' key files go to a directory of the test run's own, removed at its end
OWNER_KEY_DIR = tempfile.mkdtemp(prefix="mailpipe-test-keys-")
os.environ["MAILPIPE_OWNER_KEY_DIR"] = OWNER_KEY_DIR
atexit.register(shutil.rmtree, OWNER_KEY_DIR, ignore_errors=True)

from tests.support import postgres  # noqa: E402
from tests.support.dovecot import DOVECOT, Dovecot  # noqa: E402

# -- markers -------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real servers they use, so `-m "not postgres"` works without bookkeeping.

    Tests marked `dovecot` (by hand, or by using the fixture) skip when Dovecot is not installed.
    """
    missing = pytest.mark.skip(reason=f"{DOVECOT} is missing: `make test` installs dovecot-imapd")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "dovecot" in fixtures:
            item.add_marker(pytest.mark.dovecot)
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("db_url") == "postgres"
        if on_postgres or {"pg_url", "pg_admin_url"} & fixtures:  # also indirect db_url params
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("dovecot") and not DOVECOT.exists():
            item.add_marker(missing)


# -- Dovecot -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """One real Dovecot for the whole session; each test gets its own users, so it is shared."""
    if not DOVECOT.exists():
        pytest.skip(f"{DOVECOT} is missing: `make test` installs dovecot-imapd (needs root)")
    # pytest's own temp dirs are 0700 and Dovecot's vmail/auth processes must reach the mail, so
    # the server lives in its own dir under the system temp dir and is removed at the end; its
    # log is copied into pytest's temp dir (kept for the last three runs) for post-mortems.
    server = Dovecot.start(Path(tempfile.gettempdir()))
    try:
        yield server
    finally:
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, tmp_path_factory.getbasetemp() / "dovecot.log")
        server.close()


@pytest.fixture
def imap_user(dovecot: Dovecot) -> tuple[str, str]:
    """A fresh (user, password) with an empty mailbox, so tests never see each other's mail."""
    return dovecot.new_user()


# -- PostgreSQL ----------------------------------------------------------------------------


def _create(admin_url: str) -> str:
    """Create a database, failing (not skipping) the test when the server is not there."""
    try:
        return postgres.create_database(admin_url)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL at {admin_url} is not usable (`make test` starts it): {error}")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """SQLAlchemy URL of the maintenance database, for tests that manage databases themselves."""
    return postgres.ADMIN_URL


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """SQLAlchemy URL of a database created for this session and dropped at its end."""
    name = _create(pg_admin_url)
    try:
        yield postgres.database_url(pg_admin_url, name)
    finally:
        postgres.drop_database(name, pg_admin_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database per test, on SQLite and on PostgreSQL (test ids end in [sqlite]/[postgres]).

    PostgreSQL gets a whole new database per test rather than a schema: CREATE DATABASE plus
    DROP ... WITH (FORCE) measured about 25 ms together on PostgreSQL 15 here (about 0.13 s for
    the fixture with its connections), and a database isolates migrations, extensions and
    search_path completely, which a schema does not.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailpipe.db'}"
        return
    admin_url = request.getfixturevalue("pg_admin_url")
    name = _create(admin_url)
    try:
        yield postgres.database_url(admin_url, name)
    finally:
        postgres.drop_database(name, admin_url)


# -- mail corpus ---------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def corpus_messages() -> list[bytes]:
    """Real-world messages: ../shared/corpus/mail-parser and CPython's test_email data."""
    files = sorted(p for p in (SHARED / "corpus" / "mail-parser").glob("mail_*") if p.is_file())
    assert files, f"the shared corpus is missing at {SHARED / 'corpus'}"
    try:
        import test.test_email

        data = Path(test.test_email.__file__).parent / "data"
        files += sorted(data.glob("msg_*.txt"))
    except ImportError:
        pass
    return [p.read_bytes() for p in files]


from tests.support.cluster import cluster  # noqa: E402,F401  (fixture)
from tests.support.world import world  # noqa: E402,F401  (fixture)
