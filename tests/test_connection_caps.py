"""Connection caps per IMAP host, with a cap of its own for a named provider's hosts."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import broker_config
from mailpipe.digests import keyed_digest
from mailpipe.settings import Settings
from tests.support.workers import REDIS_URL, ROOT, delete_namespace, new_namespace
from worker import runtime


@pytest.fixture
def caps():
    # In-process counters (the stub broker's), a default cap of 1 and a cap of 2 for Gmail
    runtime.configure(
        Settings(max_connections_per_host=1, max_connections_by_provider={"gmail": 2})
    )
    yield
    runtime.configure(broker_config.SETTINGS)


def slots(host: str, count: int) -> list[bool]:
    """Ask for `count` slots of a host at once, as that many workers would."""
    with contextlib.ExitStack() as held:
        return [held.enter_context(runtime.host_slot(host)) for _ in range(count)]


def test_a_providers_hosts_get_its_own_cap_and_other_hosts_the_default(caps):
    # Given a default cap of 1 and a cap of 2 for Gmail
    # When three syncs ask for Gmail's host and two for another host at the same time
    gmail = slots("imap.gmail.com", 3)
    other = slots("mail.example.org", 2)
    # Then two get into Gmail and one into the other host
    assert gmail == [True, True, False]
    assert other == [True, False]
    # And slots given back are free again
    assert slots("imap.gmail.com", 2) == [True, True]


HOLD_A_SLOT = """
import sys
from pathlib import Path
from mailpipe.settings import Settings
from worker import runtime
url, namespace, data_dir = sys.argv[1:]
runtime.configure(
    Settings(broker_url=url, redis_namespace=namespace, data_dir=Path(data_dir),
             max_connections_per_host=1)
)
with runtime.host_slot("imap.example.org") as acquired:
    print(acquired)
"""


def test_slot_names_on_redis_are_keyed_and_one_host_is_one_slot_in_every_process(tmp_path):
    # Given workers on Redis sharing one data directory (so one server secret), a cap of 1
    namespace = new_namespace()
    settings = Settings(
        broker_url=REDIS_URL,
        redis_namespace=namespace,
        data_dir=tmp_path,
        max_connections_per_host=1,
    )
    runtime.configure(settings)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with runtime.host_slot("IMAP.example.org") as held:
            # When this process holds the host's one slot
            assert held
            # Then Redis names it by neither the host nor its unkeyed SHA-256 (which anyone
            # could compute for a guessed host), but by a digest under the server secret
            [key] = [key.decode() for key in client.scan_iter(match=f"{namespace}:host-slots:*")]
            digest = key.rsplit(":", 1)[1]
            assert "example" not in key
            assert digest not in hashlib.sha256(b"imap.example.org").hexdigest()
            assert digest != keyed_digest(bytes(32), "host-slots", "imap.example.org", length=16)

            # And another worker process with the same secret finds that slot taken (the same
            # name), while one with another secret would not: its name differs
            def other_process(data_dir: Path) -> str:
                return subprocess.run(
                    [sys.executable, "-c", HOLD_A_SLOT, REDIS_URL, namespace, str(data_dir)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout.strip()

            assert other_process(tmp_path) == "False"
            assert other_process(tmp_path / "elsewhere") == "True"
    finally:
        runtime.configure(broker_config.SETTINGS)
        delete_namespace(namespace, REDIS_URL)
        client.close()
