"""Accounts cannot point mailpipe at internal addresses: the connect-time address policy.

Every connection made for a stored account (the workers' fetch, the diagnosis the web queues,
anything later) goes through `imap.open_socket`, which resolves the host, checks every address
and connects to exactly those. These tests listen on loopback themselves and count what
reaches them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from mailpipe import diagnostics, imap
from mailpipe.addresses import AddressPolicy, AddressRefused, public
from mailpipe.diagnostics.requests import diagnosis_result
from mailpipe.failures import classify
from mailpipe.health import BROKEN_MESSAGES
from mailpipe.imap import ImapSettings
from mailpipe.retry import BREAKING, RetryPolicy
from mailpipe.settings import Settings, SettingsError
from mailpipe.vocabulary import ErrorClass, Health
from tests.support.cluster import running_cluster
from tests.support.policy import LOOPBACK
from tests.support.workers import ROOT

STRICT = AddressPolicy()  # what an operator gets without MAILPIPE_ALLOW_PRIVATE_HOSTS
WAIT_SECONDS = 60


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """A TCP port on 127.0.0.1 that records every connection made to it (and closes it)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            accepted.append(peer)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        server.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # handshakes the loop did not take yet
            while True:
                accepted.append(server.accept()[1])
        server.close()


def settings_for(port: int, *, policy: AddressPolicy | None, host: str = "127.0.0.1"):
    return ImapSettings(
        host=host, port=port, username="u", password="p", security="none", policy=policy
    )


# -- which addresses are public --------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "10.1.2.3",  # private
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # link-local, the cloud metadata service
        "100.64.0.1",  # shared address space (CGNAT)
        "100.100.100.200",  # a cloud's metadata service inside CGNAT
        "0.0.0.0",  # unspecified
        "224.0.0.1",  # multicast
        "255.255.255.255",
        "192.0.2.1",  # documentation, reserved
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",  # the IPv6 metadata service, unique local
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
    ],
)
def test_internal_addresses_in_every_form_are_not_public(address):
    assert not public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "212.227.17.190", "2a00:1450:4001::6d"])
def test_addresses_on_the_internet_are_public(address):
    assert public(ipaddress.ip_address(address))


# -- the policy ------------------------------------------------------------------------------


def test_a_name_is_judged_by_what_it_resolves_to():
    # Given a host name (not an address) that resolves to loopback
    # When the strict policy is asked for its addresses, Then it refuses in a plain message
    with pytest.raises(AddressRefused) as refused:
        STRICT.addresses("localhost", 993)
    message = str(refused.value)
    assert "localhost" in message and "not on the public internet" in message
    assert "127.0.0.1" not in message  # the user learns nothing of the resolved address


def test_public_servers_only_on_imap_ports():
    # Given a public address, When asked for Redis's port, Then refused (no DNS, no connection)
    with pytest.raises(
        AddressRefused, match=r"port 6379 is not an IMAP port \(allowed: 143, 993\)"
    ):
        STRICT.addresses("8.8.8.8", 6379)
    # And the IMAP ports and configured extra ports pass
    assert STRICT.addresses("8.8.8.8", 993)
    assert AddressPolicy(extra_ports=(1993,)).addresses("8.8.8.8", 1993)


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", "LocalHost."])
def test_an_allowed_host_or_network_may_use_any_port(allow):
    policy = AddressPolicy(allow=(allow,))
    host = "localhost" if "ocal" in allow else "127.0.0.1"
    assert policy.addresses(host, 6379)
    # And another private address stays refused
    with pytest.raises(AddressRefused):
        policy.addresses("10.0.0.1", 993)


def test_the_setting_is_read_and_checked_once():
    # Given the variables set
    found = Settings.from_env(
        {"MAILPIPE_ALLOW_PRIVATE_HOSTS": "dovecot, 10.0.0.0/8", "MAILPIPE_EXTRA_IMAP_PORTS": "1993"}
    )
    # Then the policy holds them; and a wrong value is one line naming the variable
    assert found.address_policy == AddressPolicy(
        allow=("dovecot", "10.0.0.0/8"), extra_ports=(1993,)
    )
    assert Settings.from_env({}).address_policy == STRICT
    for variable, value in (
        ("MAILPIPE_ALLOW_PRIVATE_HOSTS", "a b"),
        ("MAILPIPE_EXTRA_IMAP_PORTS", "70000"),
        ("MAILPIPE_EXTRA_IMAP_PORTS", "imaps"),
    ):
        with pytest.raises(SettingsError, match=variable):
            Settings.from_env({variable: value})


def test_a_refusal_is_permanent_and_breaks_the_account():
    failure = classify(AddressRefused("host x is not on the public internet"))
    assert failure.error_class == ErrorClass.ADDRESS_NOT_ALLOWED
    assert ErrorClass.ADDRESS_NOT_ALLOWED in BREAKING
    assert RetryPolicy().retries(ErrorClass.ADDRESS_NOT_ALLOWED) == 0
    assert RetryPolicy().health_after(ErrorClass.ADDRESS_NOT_ALLOWED) == Health.BROKEN
    # and every class that breaks an account has the words that tell its owner
    assert set(BREAKING) <= set(BROKEN_MESSAGES)


# -- nothing connects ------------------------------------------------------------------------


def test_a_refused_server_is_never_connected_to_and_an_allowed_one_is():
    with listener() as (port, accepted):
        # Given settings of a stored account on loopback, under the strict policy
        # When a connection is opened (the IMAP client's and the certificate reader's way)
        with pytest.raises(AddressRefused):
            imap.open_socket(settings_for(port, policy=STRICT))
        with pytest.raises(AddressRefused):
            imap.open_connection(settings_for(port, policy=STRICT))
        # Then nothing reached the port
        assert accepted == []
        # And with the operator's allowance the very same connection is made
        imap.open_socket(settings_for(port, policy=LOOPBACK)).close()
        # and an operator's explicit --host (no policy) connects too
        imap.open_socket(settings_for(port, policy=None)).close()
        deadline = time.monotonic() + 5
        while len(accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(accepted) == 2


def test_a_diagnosis_of_a_refused_server_shows_no_certificate_and_connects_nowhere():
    with listener() as (port, accepted):
        # Given an account on implicit TLS at a loopback port, under the strict policy
        settings = replace(settings_for(port, policy=STRICT), security="tls")
        # When it is diagnosed
        diagnosis = diagnostics.diagnose(settings, timeout=2)
    # Then the connection check failed with the policy's class, no certificate is shown, and
    # nothing connected
    connection = diagnosis.checks[0]
    assert (connection.name, connection.status) == ("connection", "failed")
    assert connection.error_class == ErrorClass.ADDRESS_NOT_ALLOWED
    assert "certificate" not in str(diagnosis.to_json())
    assert accepted == []


@pytest.mark.postgres
def test_workers_refuse_fetch_and_diagnosis_of_an_internal_address(dovecot, tmp_path):
    # Given real worker processes without MAILPIPE_ALLOW_PRIVATE_HOSTS, and an account whose
    # server is a loopback port (Redis, PostgreSQL or any other service an attacker might probe)
    strict = {"MAILPIPE_ALLOW_PRIVATE_HOSTS": ""}
    with listener() as (port, accepted), running_cluster(dovecot, tmp_path, extra_env=strict) as c:
        user_id, key = c.user("mallory")
        account_id = c.account(user_id, key, port=port)
        # When a fetch runs, and a connection check is asked for as the web app asks
        status = c.wait(c.pipeline.enqueue_fetch_job(user_id, key=key), user_id)
        request_id = c.pipeline.request_diagnosis(user_id, account_id, key=key)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # the health middleware records the attempt after the run has ended
            with c.sessions() as session:
                check = diagnosis_result(session, request_id, user_id=user_id, key=key)
            [health] = c.pipeline.get_account_health(user_id)
            done = check.status != "pending" and health.health == Health.BROKEN
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    # Then the fetch failed at once with the policy's class (never retried), the account is
    # BROKEN, the check failed the same way, and nothing ever connected to the port
    [run] = status["accounts"]
    assert (status["status"], run["error_class"], run["attempt"]) == (
        "failed",
        "address_not_allowed",
        1,
    )
    assert "not on the public internet" in run["error"]
    assert health.health == Health.BROKEN
    assert check.status == "done" and check.error_class == "address_not_allowed"
    assert "certificate" not in str(check.report)
    assert accepted == []


def test_adding_an_account_on_an_internal_address_is_refused(tmp_path):
    # Given a user, and no allowance in the environment
    env = {
        "PATH": "/usr/bin:/bin",
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "OWNER_PW": "owner-pw",
        "IMAP_PW": "imap-pw",
    }

    def mailpipe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert mailpipe("user", "add", "alice", "--password-env", "OWNER_PW").returncode == 0
    add = ("account", "add", "--user", "alice", "--password-env", "OWNER_PW", "--login", "a")
    # When an account on loopback's Redis port is added
    refused = mailpipe(*add, "--host", "127.0.0.1", "--port", "6379", "--secret-env", "IMAP_PW")
    # Then one line says why, the exit is non-zero, and no account was stored
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "not on the public internet" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert mailpipe("account", "list", "--user", "alice").stdout.strip() == ""
    # And with the operator's explicit allowance it is added (without the login check: Redis
    # speaks no IMAP)
    env["MAILPIPE_ALLOW_PRIVATE_HOSTS"] = "127.0.0.1"
    allowed = mailpipe(
        *add, "--host", "127.0.0.1", "--port", "6379", "--secret-env", "IMAP_PW", "--no-check"
    )
    assert allowed.returncode == 0, allowed.stderr
