"""One test per network fault, through a TCP proxy between the workers and a real Dovecot.

Each asserts the error class, the number of attempts, the final job and run status, the account's
health, the notifications, and that every message is stored exactly once.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select

import broker_config
from mailpipe.models import MailAccount, Notification, utcnow
from tests.support.faultproxy import FaultProxy

MAILS = 5
ATTEMPTS = broker_config.SETTINGS.retry.max_retries + 1


@pytest.fixture
def proxy(dovecot):
    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as link:
        yield link


def account_row(world, account_id: int) -> MailAccount:
    with world.sessions() as session:
        return session.get_one(MailAccount, account_id)


def notes(world, user) -> list[Notification]:
    with world.sessions() as session:
        return list(session.scalars(select(Notification).where(Notification.user_id == user.id)))


def stored_once(world, account_id: int, expected: int) -> None:
    uids = [email.uid for email in world.emails(account_id)]
    assert sorted(uids) == sorted(set(uids))
    assert len(uids) == expected


def run_one(world, proxy, *, timeout_seconds: int = 10, mails: int = MAILS):
    alice = world.user("alice")
    account = world.account(alice, mails=mails, port=proxy.port)
    status = world.run(alice, account, timeout_seconds=timeout_seconds)
    [run] = status["accounts"]
    return alice, account, status, run


def test_latency_only_slows_the_fetch(world, proxy):
    proxy.latency(0.05)
    alice, account, status, run = run_one(world, proxy)
    assert (status["status"], run["status"], run["attempt"]) == ("success", "success", 1)
    assert account_row(world, account).health_status == "HEALTHY"
    assert notes(world, alice) == []
    stored_once(world, account, MAILS)


def test_stall_times_out_is_retried_then_fails(world, proxy):
    # Given a server that accepts and greets, then never answers
    proxy.stall()
    # When a job with a 2 s timeout runs
    alice, account, status, run = run_one(world, proxy, timeout_seconds=2)
    # Then every attempt times out, the run fails after all retries, the account is DEGRADED
    assert (run["status"], run["error_class"], run["attempt"]) == ("failed", "timeout", ATTEMPTS)
    assert status["status"] == "failed"
    assert status["retry_count"] == broker_config.SETTINGS.retry.max_retries
    assert proxy.connections == ATTEMPTS
    assert account_row(world, account).health_status == "DEGRADED"
    assert [n.kind for n in notes(world, alice)] == ["job_failed"]
    stored_once(world, account, 0)


def test_reset_mid_fetch_is_retried_and_heals(world, proxy):
    # Given a link that breaks twice in the middle of the FETCH of the bodies
    proxy.reset_after(1500, times=2)
    alice, account, status, run = run_one(world, proxy, mails=20)
    # Then the third attempt succeeds and every message is there once
    assert (status["status"], run["attempt"]) == ("success", 3)
    assert account_row(world, account).health_status == "HEALTHY"
    assert notes(world, alice) == []
    stored_once(world, account, 20)


def test_refused_connection_is_retried(world, proxy):
    proxy.refuse_hard()
    alice = world.user("alice")
    account = world.account(alice, mails=MAILS, port=proxy.port)
    status = world.run(alice, account)
    [run] = status["accounts"]
    assert (run["status"], run["error_class"], run["attempt"]) == (
        "failed",
        "temporarily_unavailable",
        ATTEMPTS,
    )
    assert account_row(world, account).health_status == "DEGRADED"
    # When the server listens again, the next job heals the account
    proxy.restore()
    again = world.run(alice, account)
    assert again["status"] == "success"
    assert account_row(world, account).health_status == "HEALTHY"
    stored_once(world, account, MAILS)


def test_reset_connections_are_retried(world, proxy):
    proxy.refuse(times=1)
    _alice, account, status, run = run_one(world, proxy)
    assert (status["status"], run["attempt"]) == ("success", 2)
    stored_once(world, account, MAILS)


def test_close_after_greeting_is_retried(world, proxy):
    proxy.close_after_greeting(times=2)
    _alice, account, status, run = run_one(world, proxy)
    assert (status["status"], run["attempt"]) == ("success", 3)
    assert proxy.connections == 3
    stored_once(world, account, MAILS)


def test_untrusted_certificate_is_tls_error_never_retried(world, dovecot):
    # Given an account on implicit TLS whose server certificate no trusted CA signed
    alice = world.user("alice")
    account = world.account(alice, mails=MAILS, port=dovecot.tls_port, security="tls")
    status = world.run(alice, account)
    [run] = status["accounts"]
    # Then the run fails at once, the account is BROKEN and its owner is told, once
    assert (run["status"], run["error_class"], run["attempt"]) == ("failed", "tls_error", 1)
    assert account_row(world, account).health_status == "BROKEN"
    kinds = sorted(n.kind for n in notes(world, alice))
    assert kinds == ["account_broken", "job_failed"]
    world.run(alice, account)
    assert sorted(n.kind for n in notes(world, alice)).count("account_broken") == 1


def test_wrong_password_notifies_in_words_a_user_can_act_on(world):
    alice = world.user("alice")
    account = world.account(alice, password="wrong", provider="gmx")
    world.run(alice, account)
    broken = [n for n in notes(world, alice) if n.kind == "account_broken"]
    assert [n.message for n in broken] == ["GMX: login failed, please re-enter the password"]
    assert account_row(world, account).health_status == "BROKEN"


def test_server_restarted_mid_sync(world, dovecot, proxy):
    # Given a slow link and a mailbox of many batches
    proxy.latency(0.02)
    alice = world.user("alice")
    login_account = world.account(alice, mails=60, port=proxy.port)
    # When Dovecot is killed and started again while the first attempt runs
    job_id = world.pipeline.enqueue_fetch_job(alice.id, login_account, key=alice.key)
    deadline = time.monotonic() + 30
    while not world.emails(login_account):  # the first batch is committed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    dovecot.restart(kill=True)
    world.wait()
    status = world.pipeline.get_job_status(job_id, alice.id)
    # Then the job ends well and nothing is lost or doubled
    assert status.status == "success"
    stored_once(world, login_account, 60)


def test_five_failures_open_the_circuit_then_a_probe_closes_it(world, proxy):
    proxy.refuse_hard()
    alice = world.user("alice")
    account = world.account(alice, mails=MAILS, port=proxy.port)
    # Given repeated failures (each attempt counts): the circuit opens after five
    first = world.run(alice, account)
    assert first["accounts"][0]["attempt"] == ATTEMPTS
    world.run(alice, account)
    row = account_row(world, account)
    assert row.circuit_state == "open"
    assert [n.kind for n in notes(world, alice)].count("circuit_open") == 1
    # When another job comes while the circuit is open, the run is skipped, not failed; the job
    # fetched nothing, so it is failed with that reason (not "success")
    skipped = world.run(alice, account)
    assert skipped["accounts"][0]["status"] == "skipped"
    assert skipped["accounts"][0]["error_class"] == "circuit_open"
    assert (skipped["status"], skipped["reason"]) == ("failed", "all_skipped")
    # When the cool-down has passed and the server is back, one probe closes the circuit
    proxy.restore()
    cooldown = timedelta(seconds=broker_config.SETTINGS.circuit.cooldown_seconds)
    with world.sessions.begin() as session:
        session.get_one(MailAccount, account).circuit_opened_at = utcnow() - cooldown
    probe = world.run(alice, account)
    assert probe["status"] == "success"
    row = account_row(world, account)
    assert (row.circuit_state, row.health_status) == ("closed", "HEALTHY")
    stored_once(world, account, MAILS)


def test_a_skipped_account_beside_fetched_ones_makes_the_job_a_partial_failure(world, proxy):
    # Given alice with a healthy account and one whose circuit is open
    alice = world.user("alice")
    healthy = world.account(alice, mails=2)
    paused = world.account(alice, mails=2, port=proxy.port)
    with world.sessions.begin() as session:
        row = session.get_one(MailAccount, paused)
        row.circuit_state, row.circuit_opened_at = "open", utcnow()
    # When a job for all her accounts runs
    status = world.run(alice)
    # Then one account was fetched and one skipped: a partial failure that says why
    runs = {run["account_id"]: run["status"] for run in status["accounts"]}
    assert runs == {healthy: "success", paused: "skipped"}
    assert (status["status"], status["reason"]) == ("partial_failure", "some_skipped")
    assert proxy.connections == 0


def test_retries_running_out_in_a_partly_successful_job_tell_the_owner(world, proxy):
    # Given alice with a healthy account and one behind a link that refuses every connection
    proxy.refuse()
    alice = world.user("alice")
    healthy = world.account(alice, mails=2)
    flaky = world.account(alice, mails=2, port=proxy.port)
    # When a job for all her accounts runs
    status = world.run(alice)
    # Then the job partly failed: the flaky account ran out of retries (transient, so DEGRADED,
    # not BROKEN) and she is told so, once, for that account and job
    runs = {run["account_id"]: run for run in status["accounts"]}
    assert status["status"] == "partial_failure"
    assert status["reason"] is None
    assert runs[healthy]["status"] == "success"
    assert (runs[flaky]["status"], runs[flaky]["attempt"]) == ("failed", ATTEMPTS)
    assert runs[flaky]["error_class"] == "connection_reset"  # accepted, then reset
    assert account_row(world, flaky).health_status == "DEGRADED"
    told = [note for note in notes(world, alice) if note.kind == "retries_exhausted"]
    assert [(note.account_id, note.job_id) for note in told] == [(flaky, status["job_id"])]
    assert "the other accounts were fetched" in told[0].message
    assert told[0].params == {"provider": "E-Mail", "error_class": "connection_reset"}
