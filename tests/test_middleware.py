"""Mailpipe's middleware: actors opt in through actor options, and one retry policy rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from mailpipe import db
from mailpipe.accounts import add_account, create_user
from mailpipe.health import CircuitPolicy
from mailpipe.imap import ImapSettings
from mailpipe.models import MailAccount
from mailpipe.retry import RetryPolicy
from mailpipe.settings import Settings
from mailpipe.vocabulary import ErrorClass, Health
from middleware import AccountHealth, DurableRetries
from worker.broker import build_broker

ROOT = Path(__file__).resolve().parents[1]


class Failed(Exception):
    error_class = ErrorClass.INVALID_CREDENTIALS


@pytest.fixture
def account(tmp_path):
    """A database with one account, and the number of times the middleware opened it."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        user, key = create_user(session, "alice", "pw", iterations=1_000)
        settings = ImapSettings(host="imap.example.org", username="a", password="p")
        account_id = add_account(session, user, key, settings).id
    opened = []
    yield sessions, account_id, opened
    engine.dispose()


def health_of(sessions, account_id: int) -> str:
    with sessions() as session:
        return session.get_one(MailAccount, account_id).health_status


def test_account_health_acts_on_the_actors_that_opt_in_whatever_their_name(account):
    # Given the health middleware on a broker, and two actors taking (job_id, account_id)
    sessions, account_id, opened = account
    middleware = AccountHealth(
        sessions=lambda: opened.append(1) or sessions,
        retry_policy=RetryPolicy(),
        circuit=CircuitPolicy(),
    )
    broker = StubBroker(middleware=[middleware])
    plain = dramatiq.actor(
        lambda job_id, account_id: None, actor_name="fetch_account", broker=broker
    )
    opted = dramatiq.actor(
        lambda job_id, account_id: None, actor_name="synced", broker=broker, account_health=True
    )
    # When an attempt of the one that did not opt in fails (though named like the fetch actor)
    middleware.after_process_message(broker, plain.message("job", account_id), exception=Failed())
    # Then the middleware leaves the account alone
    assert (opened, health_of(sessions, account_id)) == ([], Health.HEALTHY)
    # When an attempt of the one that opted in fails with a breaking error
    middleware.after_process_message(broker, opted.message("job", account_id), exception=Failed())
    # Then the account is BROKEN
    assert health_of(sessions, account_id) == Health.BROKEN


def test_the_broker_reads_one_retry_policy_from_the_settings():
    # Given settings with their own retry policy
    settings = Settings(retry=RetryPolicy(max_retries=5, min_backoff_ms=7, max_backoff_ms=70))
    # When the broker is built from them
    broker = build_broker(settings)
    [retries] = [m for m in broker.middleware if isinstance(m, DurableRetries)]
    [health] = [m for m in broker.middleware if isinstance(m, AccountHealth)]
    # Then the Retries middleware and the health middleware read that very policy
    assert (retries.max_retries, retries.min_backoff, retries.max_backoff) == (5, 7, 70)
    assert retries.policy is health.retry_policy is settings.retry
    assert health.circuit is settings.circuit


WORKER_PROCESS = """
import json
import broker_config
from actors.fetch import fetch_account
from middleware import DurableRetries
from worker import runtime
[retries] = [m for m in broker_config.broker.middleware if isinstance(m, DurableRetries)]
print(json.dumps({
    "one_policy": runtime.settings().retry is retries.policy is broker_config.SETTINGS.retry,
    "max_retries": retries.max_retries,
    "options": sorted(fetch_account.options),
}))
"""


def test_in_a_worker_process_the_actor_and_the_middleware_read_the_same_policy():
    # Given a worker process's environment with a retry count of its own
    env = {**os.environ, "MAILPIPE_MAX_RETRIES": "2"}
    # When it loads broker_config and the actors, as `dramatiq broker_config actors` does
    done = subprocess.run(
        [sys.executable, "-c", WORKER_PROCESS], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # Then the runtime the actor reads and the Retries middleware hold one policy, from there
    assert found["one_policy"] is True and found["max_retries"] == 2
    # And the fetch actor states no retry number of its own, and opts into account health
    assert "max_retries" not in found["options"] and "account_health" in found["options"]
