"""Connection caps per IMAP host, with a cap of its own for a named provider's hosts."""

from __future__ import annotations

import contextlib

import dramatiq
import pytest

import broker_config
from actors import runtime


@pytest.fixture
def caps(monkeypatch):
    assert isinstance(broker_config.broker, dramatiq.brokers.stub.StubBroker)
    monkeypatch.setattr(runtime, "MAX_CONNECTIONS_PER_HOST", 1)
    monkeypatch.setattr(runtime, "MAX_CONNECTIONS_BY_PROVIDER", runtime.provider_caps("gmail=2"))


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


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", {}), ("gmail=40, Outlook=20", {"gmail": 40, "outlook": 20})],
)
def test_provider_caps_are_read_from_a_short_list(value, expected):
    assert runtime.provider_caps(value) == expected


@pytest.mark.parametrize(
    ("value", "named"), [("gmial=3", "unknown provider 'gmial'"), ("gmail=many", "needs a number")]
)
def test_a_mistyped_cap_is_named_in_one_line(value, named):
    with pytest.raises(ValueError, match=named) as refused:
        runtime.provider_caps(value)
    assert "MAILPIPE_MAX_CONNECTIONS_BY_PROVIDER" in str(refused.value)
