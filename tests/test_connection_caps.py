"""Connection caps per IMAP host, with a cap of its own for a named provider's hosts."""

from __future__ import annotations

import contextlib

import pytest

import broker_config
from mailpipe.settings import Settings
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
