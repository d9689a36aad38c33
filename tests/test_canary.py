"""Canaries: a known IMAP password, user password, data key and mail text must never show in plain
text anywhere the pipeline writes: Redis, the database, the worker log, the job records, the
notifications, /metrics.

One cluster (real Redis, `dramatiq` worker processes, PostgreSQL, Dovecot) runs jobs that succeed
and jobs that fail (wrong password, refused connection, untrusted TLS certificate); every place is
then searched for each canary raw, in hex, in base64 at every alignment, and mail text also in the
quoted-printable and JSON forms it takes. The last tests prove the search finds what it looks for:
in the raw mailbox files on the IMAP server, and in values planted in each place on purpose.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url

from mailpipe.accounts import add_account
from mailpipe.crypto import DataKey, KdfParams, wrap_key
from mailpipe.imap import ImapSettings
from mailpipe.models import AccountRun, Notification, PipelineJob, User
from tests.support import postgres
from tests.support.cluster import Cluster, running_cluster
from tests.support.dovecot import free_ports
from tests.support.faultproxy import FaultProxy
from tests.support.workers import ROOT

FAST_KDF = 1_000
TOKEN = secrets.token_hex(6)  # in every canary, and nowhere else (names use another token)
NAMES = secrets.token_hex(4)
IMAP_PASSWORD = f"CanaryImapPw{TOKEN}"
WRONG_PASSWORD = f"CanaryWrongPw{TOKEN}"
USER_PASSWORD = f"CanaryUserPw{TOKEN}"
DATA_KEY = hashlib.sha256(b"mailpipe canary data key").digest()  # fixed 32 bytes
SUBJECT = f"CanarySubject{TOKEN}"
BODY = f"Grüße vom Kanarienvogel CanaryBody{TOKEN}, bitte nicht weitersagen"
MESSAGE_ID_DOMAIN = f"canary-msgid-{TOKEN}.example".lower()  # stored only as a keyed hash
EXPORTER_START_SECONDS = 20.0
SAMPLE_SECONDS = 0.05
METRICS_MODULE = "metrics.exporter"


# -- what to look for ----------------------------------------------------------------------


def unfold(data: bytes) -> bytes:
    """Undo line folding: quoted-printable soft breaks, then every line end (base64 wraps)."""
    for fold in (b"=\r\n", b"=\n", b"\r\n", b"\n"):
        data = data.replace(fold, b"")
    return data


def base64_forms(data: bytes) -> dict[str, bytes]:
    """The base64 characters that depend on `data` alone, at each of the three alignments.

    Inside a longer base64 text the canary starts at any byte offset; the characters wholly
    made of its own bits are the same whatever surrounds it, so these are what to look for.
    """
    forms = {}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data)
        first = -(-8 * offset // 6)  # the first character made of data bits only
        last = (8 * (offset + len(data)) - 6) // 6
        core = encoded[first : last + 1]
        forms[f"base64+{offset}"] = core
        forms[f"base64url+{offset}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    return forms


def encodings(secret: bytes) -> dict[str, bytes]:
    """A secret as it may be written: raw, hex either case, base64 at every alignment."""
    return {
        "raw": secret,
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
        **base64_forms(secret),
    }


def text_encodings(text: str) -> dict[str, bytes]:
    """Mail text as well in the forms a raw message or a JSON document carries it."""
    raw = text.encode()
    return {
        **encodings(raw),
        "quoted-printable": unfold(binascii.b2a_qp(raw)),
        "q-encoded header": unfold(binascii.b2a_qp(raw, header=True)),
        "json": json.dumps(text)[1:-1].encode(),
        "token": TOKEN.encode() if TOKEN in text else raw,
    }


CANARIES: dict[str, dict[str, bytes]] = {
    "imap password": encodings(IMAP_PASSWORD.encode()),
    "wrong imap password": encodings(WRONG_PASSWORD.encode()),
    "user password": encodings(USER_PASSWORD.encode()),
    "data key": encodings(DATA_KEY),
    "subject": text_encodings(SUBJECT),
    "body": text_encodings(BODY),
    "message id": text_encodings(MESSAGE_ID_DOMAIN),
}


def found(haystack: bytes) -> list[str]:
    """Every canary (and the form it took) present in haystack, as it is or unfolded."""
    flat = unfold(haystack)
    return [
        f"{name} ({form})"
        for name, forms in CANARIES.items()
        for form, needle in forms.items()
        if needle in haystack or needle in flat
    ]


# -- the planted mail ----------------------------------------------------------------------


def canary_mail(number: int, transfer_encoding: str) -> bytes:
    """A message with the canary subject and body, its body quoted-printable or base64."""
    body = BODY.encode()
    if transfer_encoding == "base64":
        encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    else:
        encoded = binascii.b2a_qp(body).replace(b"\n", b"\r\n") + b"\r\n"
    return (
        b"From: Absender <absender@example.org>\r\n"
        b"To: empfaenger@example.org\r\n"
        b"Subject: %s\r\n"
        b"Message-ID: <canary-%d@%s>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: %s\r\n"
        b"\r\n" % (SUBJECT.encode(), number, MESSAGE_ID_DOMAIN.encode(), transfer_encoding.encode())
    ) + encoded


# -- where to look -------------------------------------------------------------------------


def redis_contents(url: str, namespace: str) -> bytes:
    """Every key of the namespace and every value in it, whatever the type."""
    client = redis.Redis.from_url(url)
    chunks: list[bytes] = []
    try:
        for key in client.scan_iter(match=f"{namespace}*", count=1000):
            chunks.append(key)
            kind = client.type(key)
            if kind == b"string":
                chunks.append(client.get(key) or b"")
            elif kind == b"list":
                chunks.extend(client.lrange(key, 0, -1))
            elif kind == b"hash":
                for name, value in client.hgetall(key).items():
                    chunks += [name, value]
            elif kind == b"set":
                chunks.extend(client.smembers(key))
            elif kind == b"zset":
                chunks.extend(
                    member for member, _score in client.zrange(key, 0, -1, withscores=True)
                )
            elif kind == b"stream":
                for _id, entry in client.xrange(key):
                    for name, value in entry.items():
                        chunks += [name, value]
    finally:
        client.close()
    return b"\n".join(chunks)


class RedisSampler:
    """Reads the namespace over and over while jobs run: messages live there only in flight."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.seen: set[bytes] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-sampler", daemon=True)

    def __enter__(self) -> RedisSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seen.add(redis_contents(self.url, self.namespace))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.add(redis_contents(self.url, self.namespace))
            self.samples += 1
            self._stop.wait(SAMPLE_SECONDS)

    def contents(self) -> bytes:
        return b"\n".join(sorted(self.seen))


def database_dump(database: str) -> bytes:
    """`pg_dump --data-only` of the test database (bytea comes out in hex)."""
    url = make_url(postgres.ADMIN_URL)
    done = subprocess.run(
        [
            "pg_dump",
            "--data-only",
            "--host",
            url.host or "127.0.0.1",
            "--port",
            str(url.port or 5432),
            "--username",
            url.username or "postgres",
            database,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def rows_as_json(sessions, model) -> bytes:
    """Every row of a table, every column, as JSON (what an API or an export would show)."""
    with sessions() as session:
        rows = session.scalars(select(model)).all()
        data = [{c.key: getattr(row, c.key) for c in model.__mapper__.column_attrs} for row in rows]
    return json.dumps(data, default=str).encode()


# -- the run -------------------------------------------------------------------------------


@dataclass
class CanaryRun:
    """The cluster after the jobs, and what each place held."""

    cluster: Cluster
    user_id: int
    login: str
    mailbox_files: bytes
    redis: bytes
    redis_samples: int
    statuses: list[dict]
    exporter_url: str | None = None
    exporter_problem: str | None = None

    def job_records(self) -> bytes:
        """Job and run rows, and the job status, history and health web code reads."""
        sessions = self.cluster.sessions
        pipeline = self.cluster.pipeline
        shown = [
            *self.statuses,
            [job.to_json() for job in pipeline.list_jobs(self.user_id)],
            [account.to_json() for account in pipeline.get_account_health(self.user_id)],
        ]
        return b"\n".join(
            [
                rows_as_json(sessions, PipelineJob),
                rows_as_json(sessions, AccountRun),
                json.dumps(shown, default=str).encode(),
            ]
        )

    def notifications(self) -> bytes:
        return rows_as_json(self.cluster.sessions, Notification)

    def worker_log(self) -> bytes:
        return self.cluster.workers.log_path.read_bytes()

    def metrics(self) -> bytes:
        with urllib.request.urlopen(self.exporter_url, timeout=10) as response:
            return response.read()


def create_canary_user(cluster: Cluster) -> tuple[int, DataKey]:
    """A user whose data key is the fixed canary key, wrapped under the canary user password."""
    key = DataKey(DATA_KEY)
    params = KdfParams(salt=os.urandom(16), iterations=FAST_KDF)
    with cluster.sessions.begin() as session:
        user = User(name=f"canary-{NAMES}", kdf={}, wrapped_dek=b"")
        session.add(user)
        session.flush()
        wrapped = wrap_key(key, USER_PASSWORD, params, user_id=user.id)
        user.kdf = wrapped.params.to_json()
        user.wrapped_dek = wrapped.wrapped
        user.key_wrap = wrapped.version
        return user.id, key


def add(cluster: Cluster, user_id: int, key: DataKey, **settings) -> int:
    with cluster.sessions.begin() as session:
        owner = session.get_one(User, user_id)
        return add_account(
            session, owner, key, ImapSettings(host="127.0.0.1", **settings), provider="gmx"
        ).id


def start_exporter(env: dict[str, str], workdir: Path):
    """`python -m metrics.exporter` over the workers' metrics directory; (process, url)."""
    port = free_ports(1)[0]
    log = open(workdir / "exporter.log", "wb")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [sys.executable, "-m", METRICS_MODULE, "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + EXPORTER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    return None, (workdir / "exporter.log").read_text(errors="replace")[-1000:]


@pytest.fixture(scope="module")
def canary(dovecot, tmp_path_factory) -> Iterator[CanaryRun]:
    workdir = tmp_path_factory.mktemp("canary")
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    metrics_env = {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "dramatiq_prom_db": str(metrics_dir),
    }
    with (
        running_cluster(dovecot, workdir, extra_env=metrics_env) as cluster,
        FaultProxy(upstream=(dovecot.host, dovecot.port)) as refusing,
    ):
        # Given a user with the canary key and password, and an IMAP mailbox with the canary
        # password holding canary mail
        user_id, key = create_canary_user(cluster)
        login = f"canary{NAMES}"
        dovecot.add_user(login, IMAP_PASSWORD)
        dovecot.append(login, IMAP_PASSWORD, [canary_mail(1, "quoted-printable")])
        dovecot.append(login, IMAP_PASSWORD, [canary_mail(2, "base64")])
        refusing.refuse_hard()
        plain = {"username": login, "password": IMAP_PASSWORD, "security": "none"}
        add(cluster, user_id, key, port=dovecot.port, **plain)
        wrong = add(
            cluster, user_id, key, port=dovecot.port, **{**plain, "password": WRONG_PASSWORD}
        )
        add(cluster, user_id, key, port=refusing.port, **plain)
        add(cluster, user_id, key, port=dovecot.tls_port, **{**plain, "security": "tls"})
        # When a job fetches every account (two fail at once, one after its retries), then
        # a job of the wrong-password account alone fails and notifies
        with RedisSampler(cluster.redis_url, cluster.namespace) as sampler:
            first = cluster.pipeline.enqueue_fetch_job(user_id, key=key)
            statuses = [cluster.wait(first, user_id)]
            second = cluster.pipeline.enqueue_fetch_job(user_id, wrong, key=key)
            statuses.append(cluster.wait(second, user_id))
        mailbox = b"\n".join(
            p.read_bytes() for p in sorted(dovecot.home(login).rglob("*")) if p.is_file()
        )
        run = CanaryRun(
            cluster=cluster,
            user_id=user_id,
            login=login,
            mailbox_files=mailbox,
            redis=sampler.contents(),
            redis_samples=sampler.samples,
            statuses=statuses,
        )
        exporter = None
        if importlib.util.find_spec(METRICS_MODULE) is None:
            run.exporter_problem = f"{METRICS_MODULE} is not importable"
        else:
            exporter, answer = start_exporter(cluster.env, workdir)
            if exporter is None:
                run.exporter_problem = f"{METRICS_MODULE} did not serve /metrics: {answer}"
            else:
                run.exporter_url = answer
        try:
            yield run
        finally:
            if exporter is not None:
                exporter.terminate()
                exporter.wait(10)


# -- the jobs ran as intended --------------------------------------------------------------


def test_the_jobs_succeeded_and_failed_as_planned(canary):
    first, second = canary.statuses
    outcomes = sorted((run["status"], run["error_class"]) for run in first["accounts"])
    assert outcomes == [
        ("failed", "invalid_credentials"),
        ("failed", "temporarily_unavailable"),
        ("failed", "tls_error"),
        ("success", None),
    ]
    assert first["status"] == "partial_failure"
    assert first["emails_fetched"] == 2
    assert second["status"] == "failed"
    assert canary.redis_samples > 0
    kinds = {json_row["kind"] for json_row in json.loads(canary.notifications())}
    assert {"account_broken", "job_failed"} <= kinds


# -- nothing is found anywhere -------------------------------------------------------------


def test_no_canary_in_redis(canary):
    assert b"fetch_account" in canary.redis  # the sampler saw messages in flight
    assert found(canary.redis) == []


def test_no_canary_in_the_database_dump(canary):
    dump = database_dump(canary.cluster.database)
    assert b"COPY public.emails" in dump
    assert found(dump) == []


def test_no_canary_in_the_worker_log(canary):
    log = canary.worker_log()
    assert b"Worker process is ready" in log
    assert found(log) == []


def test_no_canary_in_the_job_records(canary):
    assert found(canary.job_records()) == []


def test_no_canary_in_the_notifications(canary):
    notes = canary.notifications()
    assert b"login failed" in notes
    assert found(notes) == []


def test_no_canary_in_metrics(canary):
    if canary.exporter_url is None:
        pytest.skip(f"/metrics not searched: {canary.exporter_problem}")
    text = canary.metrics()
    assert b"mailpipe_" in text
    assert found(text) == []


# -- the search would have found them ------------------------------------------------------


def test_the_search_finds_the_mail_text_in_the_raw_mailbox_files(canary):
    hits = set(found(canary.mailbox_files))
    assert {"subject (raw)", "body (quoted-printable)", "body (token)", "message id (raw)"} <= hits
    assert any(hit.startswith("body (base64+") for hit in hits)


def test_the_search_finds_values_planted_in_every_place(canary):
    cluster = canary.cluster
    client = redis.Redis.from_url(cluster.redis_url)
    planted_key = f"{cluster.namespace}:planted"
    log_size = cluster.workers.log_path.stat().st_size
    with cluster.sessions() as session:
        messages = dict(session.execute(select(AccountRun.id, AccountRun.error_message)).all())
    try:
        # Given each canary planted once, in one of its forms, in one place each
        client.hset(planted_key, "grant", DATA_KEY.hex())
        with cluster.sessions.begin() as session:
            session.add(
                Notification(
                    user_id=canary.user_id,
                    kind="planted",
                    message=f"your password is {USER_PASSWORD}",
                )
            )
            session.execute(
                update(AccountRun)
                .where(AccountRun.error_class == "invalid_credentials")
                .values(error_message=f"login with {WRONG_PASSWORD} failed")
            )
        with cluster.workers.log_path.open("ab") as log:
            log.write(base64.b64encode(b"subject: " + SUBJECT.encode()) + b"\n")
        # Then the search finds each where it was put
        assert "data key (hex)" in found(redis_contents(cluster.redis_url, cluster.namespace))
        assert "user password (raw)" in found(database_dump(cluster.database))
        assert "user password (raw)" in found(canary.notifications())
        assert "wrong imap password (raw)" in found(canary.job_records())
        assert any(hit.startswith("subject (base64+") for hit in found(canary.worker_log()))
    finally:
        client.delete(planted_key)
        client.close()
        with cluster.sessions.begin() as session:
            session.execute(delete(Notification).where(Notification.kind == "planted"))
            for run_id, message in messages.items():
                session.execute(
                    update(AccountRun).where(AccountRun.id == run_id).values(error_message=message)
                )
        with cluster.workers.log_path.open("r+b") as log:
            log.truncate(log_size)
