"""Key grants: the data key sealed to the workers' key, bound to its grant, gone when done."""

from __future__ import annotations

import base64
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from mailpipe import db, grants
from mailpipe.crypto import DataKey
from mailpipe.errors import DecryptionFailed, NotFound
from mailpipe.grants import (
    KeyGrant,
    WorkerKeyError,
    drop_job_grant,
    generate_worker_key,
    grant_background,
    grant_for_job,
    live_grant,
    load_private_key,
    public_key_bytes,
    purge_expired,
    revoke_background,
    seal_key,
    unlock_grant,
    unseal_key,
    users_with_background_grant,
)
from mailpipe.models import User
from mailpipe.settings import Settings, SettingsError

TTL = 600
EXPIRY = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
GRANT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
CONTEXT = {"grant_id": GRANT_ID, "user_id": 7, "purpose": "job", "expires_at": EXPIRY}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def worker() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with db.session_factory(engine)() as session:
        yield session


def make_user(session: Session, name: str) -> int:
    user = User(name=name, kdf={}, wrapped_dek=b"not a real wrapped key")
    session.add(user)
    session.flush()
    return user.id


def job_grant(
    session: Session,
    worker: X25519PrivateKey,
    user_id: int,
    job_id: str,
    *,
    key: DataKey | None = None,
    ttl_seconds: float = TTL,
) -> KeyGrant:
    """A job grant sealed to `worker` (for a fresh key unless one is given)."""
    return grant_for_job(
        session,
        user_id=user_id,
        job_id=job_id,
        key=key or DataKey.generate(),
        public_key=public_key_bytes(worker),
        ttl_seconds=ttl_seconds,
    )


def fresh(engine: Engine) -> Session:
    """A new session, so rows come back from the database as a worker reads them."""
    return db.session_factory(engine)()


# -- sealing -------------------------------------------------------------------------------


def test_seal_and_unseal_round_trip(worker):
    # Given a user's data key and the workers' public key
    key = DataKey.generate()
    # When it is sealed for a grant and unsealed with the workers' private key
    sealed = seal_key(key, public_key_bytes(worker), **CONTEXT)
    opened = unseal_key(sealed, worker, **CONTEXT)
    # Then the same key comes back, and the sealed form does not contain it
    assert opened.export() == key.export()
    assert key.export() not in sealed


def test_sealing_twice_gives_different_blobs(worker):
    key = DataKey.generate()
    first = seal_key(key, public_key_bytes(worker), **CONTEXT)
    second = seal_key(key, public_key_bytes(worker), **CONTEXT)
    assert first != second  # a fresh ephemeral key each time


def test_another_worker_key_cannot_unseal(worker):
    # Given a key sealed to one worker key pair
    sealed = seal_key(DataKey.generate(), public_key_bytes(worker), **CONTEXT)
    # When another private key tries to open it, Then it is refused with a one-line message
    with pytest.raises(DecryptionFailed, match="another worker key") as caught:
        unseal_key(sealed, X25519PrivateKey.generate(), **CONTEXT)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "position", [0, 1, 20, 33, 50, -1], ids=["version", "enc", "enc-end", "key", "mid", "tag"]
)
def test_tampered_sealed_key_is_rejected(worker, position):
    # Given a sealed key with one bit flipped
    sealed = bytearray(seal_key(DataKey.generate(), public_key_bytes(worker), **CONTEXT))
    sealed[position] ^= 0x01
    # When it is unsealed, Then it fails
    with pytest.raises(DecryptionFailed):
        unseal_key(bytes(sealed), worker, **CONTEXT)


@pytest.mark.parametrize("length", [0, 1, 33, 80], ids=["empty", "version", "no-body", "short"])
def test_truncated_sealed_key_is_rejected(worker, length):
    sealed = seal_key(DataKey.generate(), public_key_bytes(worker), **CONTEXT)
    with pytest.raises(DecryptionFailed, match="format"):
        unseal_key(sealed[:length], worker, **CONTEXT)


@pytest.mark.parametrize(
    "change",
    [
        {"grant_id": uuid.UUID("00000000-0000-4000-8000-000000000002")},
        {"user_id": 8},
        {"purpose": "background"},
        {"expires_at": EXPIRY + timedelta(days=30)},
        {"expires_at": EXPIRY + timedelta(microseconds=1)},
    ],
    ids=["other-grant", "other-user", "other-purpose", "longer-expiry", "one-microsecond-later"],
)
def test_sealed_key_bound_to_its_grant(worker, change):
    # Given a key sealed for one grant
    sealed = seal_key(DataKey.generate(), public_key_bytes(worker), **CONTEXT)
    # When it is opened under another grant id, user, purpose or expiry, Then it is refused
    with pytest.raises(DecryptionFailed, match="moved to another grant"):
        unseal_key(sealed, worker, **{**CONTEXT, **change})


@pytest.mark.parametrize(
    ("grant_id", "expires_at"),
    [
        (str(GRANT_ID), EXPIRY),
        (GRANT_ID, EXPIRY.astimezone(timezone(timedelta(hours=-5)))),
    ],
    ids=["id-as-text", "same-instant-in-another-zone"],
)
def test_same_grant_in_another_form_still_opens(worker, grant_id, expires_at):
    # Given a key sealed with a UUID id and an aware UTC expiry
    key = DataKey.generate()
    sealed = seal_key(key, public_key_bytes(worker), **CONTEXT)
    # When the same id and instant come back in another form, Then it still opens
    context = {**CONTEXT, "grant_id": grant_id, "expires_at": expires_at}
    assert unseal_key(sealed, worker, **context).export() == key.export()


def test_an_expiry_without_an_offset_is_refused_rather_than_guessed(worker):
    # Given a key sealed with an aware UTC expiry
    sealed = seal_key(DataKey.generate(), public_key_bytes(worker), **CONTEXT)
    # When it is opened with the same wall time but no offset, Then that is refused outright
    with pytest.raises(ValueError, match="no offset"):
        unseal_key(sealed, worker, **{**CONTEXT, "expires_at": EXPIRY.replace(tzinfo=None)})


def test_unknown_purpose_is_refused(worker):
    with pytest.raises(ValueError, match="purpose"):
        seal_key(DataKey.generate(), public_key_bytes(worker), **{**CONTEXT, "purpose": "admin"})


# -- grants in the database ----------------------------------------------------------------


def test_job_grant_unlocks_for_the_worker(engine, session, worker):
    # Given a job grant stored by the web side with only the public key
    user_id = make_user(session, "anna")
    key = DataKey.generate()
    grant = job_grant(session, worker, user_id, "job-1", key=key)
    session.commit()
    # When a worker, in another session, unlocks it by id (as text, as a message carries it)
    with fresh(engine) as other:
        opened = unlock_grant(other, str(grant.id), worker)
    # Then it gets the user's data key
    assert opened.export() == key.export()
    assert grant.purpose == "job"
    assert grant.job_id == "job-1"


def test_sealed_key_copied_into_another_row_is_rejected(engine, session, worker):
    # Given two users with a job grant each
    anna, bert = make_user(session, "anna"), make_user(session, "bert")
    annas = job_grant(session, worker, anna, "a")
    berts = job_grant(session, worker, bert, "b")
    session.commit()
    # When someone with database access copies Anna's sealed key into Bert's row
    berts.sealed = annas.sealed
    session.commit()
    # Then the worker refuses it rather than handing Anna's key to Bert's job
    with fresh(engine) as other, pytest.raises(DecryptionFailed, match="moved"):
        unlock_grant(other, berts.id, worker)


def test_grant_with_extended_expiry_is_rejected(engine, session, worker):
    # Given a job grant
    user_id = make_user(session, "anna")
    grant = job_grant(session, worker, user_id, "j")
    session.commit()
    # When its expiry is pushed out in the database
    grant.expires_at = grant.expires_at + timedelta(days=365)
    session.commit()
    # Then it no longer opens
    with fresh(engine) as other, pytest.raises(DecryptionFailed):
        unlock_grant(other, grant.id, worker)


def test_job_grant_turned_into_background_grant_is_rejected(engine, session, worker):
    user_id = make_user(session, "anna")
    grant = job_grant(session, worker, user_id, "j")
    grant.purpose = "background"
    session.commit()
    # The scheduler now sees a background grant, but the worker cannot open it
    assert users_with_background_grant(session) == {user_id}
    with fresh(engine) as other, pytest.raises(DecryptionFailed):
        unlock_grant(other, grant.id, worker)


def test_expired_grant_is_unusable_and_purged(engine, session, worker):
    # Given a short and a long grant
    user_id = make_user(session, "anna")
    public = public_key_bytes(worker)
    short = grant_background(
        session, user_id=user_id, key=DataKey.generate(), public_key=public, ttl_seconds=60
    )
    long = job_grant(session, worker, user_id, "j", ttl_seconds=3600)
    session.commit()
    later = datetime.now(UTC) + timedelta(seconds=120)
    # When the short one's time has passed
    with fresh(engine) as other:
        # Then it is missing to the worker, with a message telling what to do
        assert live_grant(other, short.id, now=later) is None
        with pytest.raises(NotFound, match="must log in again"):
            unlock_grant(other, short.id, worker, now=later)
        # And the scheduler no longer sees the user
        assert users_with_background_grant(other, now=later) == set()
        assert users_with_background_grant(other) == {user_id}
        # And purging deletes it but keeps the live one
        assert purge_expired(other, now=later) == 1
        other.commit()
    with fresh(engine) as other:
        assert [g.id for g in other.scalars(select(KeyGrant))] == [long.id]
        assert live_grant(other, long.id, now=later) is not None


def test_unknown_or_malformed_grant_id_is_missing(session, worker):
    assert live_grant(session, uuid.uuid4()) is None
    assert live_grant(session, "not-a-uuid") is None
    with pytest.raises(NotFound, match="key grant missing or expired"):
        unlock_grant(session, uuid.uuid4(), worker)


def test_background_grant_replaced_on_login_and_revoked_on_logout(engine, session, worker):
    # Given a user who logged in with background sync enabled, and another user
    public = public_key_bytes(worker)
    anna, bert = make_user(session, "anna"), make_user(session, "bert")
    first = grant_background(
        session, user_id=anna, key=DataKey.generate(), public_key=public, ttl_seconds=TTL
    )
    grant_background(
        session, user_id=bert, key=DataKey.generate(), public_key=public, ttl_seconds=TTL
    )
    job = job_grant(session, worker, anna, "j")
    session.commit()
    # When she logs in again
    key = DataKey.generate()
    second = grant_background(session, user_id=anna, key=key, public_key=public, ttl_seconds=TTL)
    session.commit()
    # Then her old background grant is gone and the new one opens
    with fresh(engine) as other:
        mine = other.scalars(
            select(KeyGrant.id).where(KeyGrant.user_id == anna, KeyGrant.purpose == "background")
        ).all()
        assert mine == [second.id]
        assert live_grant(other, first.id) is None
        assert unlock_grant(other, second.id, worker).export() == key.export()
        assert users_with_background_grant(other) == {anna, bert}
    # When she logs out
    assert revoke_background(session, anna) == 1
    session.commit()
    # Then the scheduler no longer syncs her, Bert is untouched, and her running job keeps its grant
    with fresh(engine) as other:
        assert users_with_background_grant(other) == {bert}
        assert live_grant(other, second.id) is None
        assert live_grant(other, job.id) is not None
    assert revoke_background(session, anna) == 0


def test_job_grant_dropped_when_job_ends(engine, session, worker):
    # Given grants for two jobs and a background grant
    public = public_key_bytes(worker)
    user_id = make_user(session, "anna")
    ended = job_grant(session, worker, user_id, "job-ended")
    running = job_grant(session, worker, user_id, "job-running")
    grant_background(
        session, user_id=user_id, key=DataKey.generate(), public_key=public, ttl_seconds=TTL
    )
    session.commit()
    # When the first job ends
    assert drop_job_grant(session, "job-ended") == 1
    session.commit()
    # Then only its grant is gone
    with fresh(engine) as other:
        with pytest.raises(NotFound):
            unlock_grant(other, ended.id, worker)
        assert live_grant(other, running.id) is not None
        assert users_with_background_grant(other) == {user_id}
    assert drop_job_grant(session, "job-ended") == 0


def test_grants_go_with_their_user(engine, session, worker):
    user_id = make_user(session, "anna")
    grant = grant_background(
        session,
        user_id=user_id,
        key=DataKey.generate(),
        public_key=public_key_bytes(worker),
        ttl_seconds=TTL,
    )
    session.commit()
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
    with fresh(engine) as other:
        assert other.get(KeyGrant, grant.id) is None


def test_non_positive_ttl_is_refused(session, worker):
    user_id = make_user(session, "anna")
    with pytest.raises(ValueError, match="time to live"):
        job_grant(session, worker, user_id, "j", ttl_seconds=0)


def test_database_never_holds_the_raw_key(tmp_path, worker):
    # Given a SQLite database with a job grant and a background grant
    path = tmp_path / "canary.db"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    key = DataKey.generate()
    raw = key.export()
    with db.session_factory(engine)() as session:
        user_id = make_user(session, "anna")
        job = job_grant(session, worker, user_id, "j", key=key)
        background = grant_background(
            session, user_id=user_id, key=key, public_key=public_key_bytes(worker), ttl_seconds=TTL
        )
        session.commit()
    # When every stored column is read back, and the repr of the rows is taken
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM key_grants")).all()
    engine.dispose()
    # Then neither the key bytes nor their hex or base64 appear anywhere
    assert len(rows) == 2
    forms = [raw, raw.hex().encode(), base64.b64encode(raw)]
    for row in rows:
        for value in row:
            stored = value if isinstance(value, bytes) else str(value).encode()
            assert not any(form in stored for form in forms)
    for grant in (job, background):
        shown = repr(grant)
        assert "sealed=<81 bytes>" in shown
        assert raw.hex() not in shown and repr(raw) not in shown
    # And not in the database files themselves
    for file in tmp_path.glob("canary.db*"):
        contents = file.read_bytes()
        assert not any(form in contents for form in forms), file.name


# -- the workers' key pair -----------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "worker.key"


def test_key_file_is_private_and_never_overwritten(tmp_path):
    # Given a new worker key file
    path = tmp_path / "worker.key"
    public = generate_worker_key(path)
    # Then only its owner may read it, and it loads back to the same key pair
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(path)) == public
    assert len(public) == 32
    before = path.read_bytes()
    # When a second key is generated at the same place, Then it is refused and the file kept
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_worker_key(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["worker.key"]  # no temporary file left


def test_raw_key_file_is_accepted(tmp_path, worker):
    path = tmp_path / "raw.key"
    path.write_bytes(worker.private_bytes_raw())
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(worker)


def test_garbage_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"not a key at all")
    with pytest.raises(WorkerKeyError, match="not an X25519 private key"):
        load_private_key(path)


def test_public_key_is_not_created_implicitly(key_file):
    # Given no key file and no configured public key
    # When a web host asks for the public key, Then it is told, and no key pair appears
    with pytest.raises(WorkerKeyError, match="missing"):
        grants.worker_public_key(key_file)
    assert not key_file.exists()


def test_ensure_worker_key_creates_once(key_file):
    # Given the embedded demo, When it ensures the key twice
    first = grants.ensure_worker_key(key_file)
    second = grants.ensure_worker_key(key_file)
    # Then one private file exists and both calls agree with what web hosts would seal to
    assert first == second == grants.worker_public_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(key_file)) == first


def test_configured_public_key_wins_on_web_hosts(key_file, worker):
    # Given a web host configured with the workers' public key only
    public = public_key_bytes(worker)
    # Then that is what grants are sealed to, without any key file
    assert grants.worker_public_key(key_file, configured=public) == public
    assert not key_file.exists()
    # And a key file that does not match it is reported instead of used
    with pytest.raises(WorkerKeyError, match="does not match"):
        grants.ensure_worker_key(key_file, configured=public)


@pytest.mark.parametrize("value", ["***", "AAAA"], ids=["not-base64", "wrong-length"])
def test_bad_configured_public_key_is_a_clear_error(value):
    with pytest.raises(SettingsError, match=grants.WORKER_PUBLIC_KEY_ENV):
        Settings.from_env({grants.WORKER_PUBLIC_KEY_ENV: value})


def test_core_module_stays_free_of_job_and_metrics_libraries():
    source = Path(grants.__file__).read_text()
    assert "dramatiq" not in source
    assert "prometheus" not in source
