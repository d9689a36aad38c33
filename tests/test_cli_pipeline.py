"""Operator commands over the pipeline: users, accounts, fetch --wait, jobs, health, worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import postgres
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK_HOSTS
from tests.support.workers import REDIS_URL, delete_namespace, new_namespace

JOB_INSTANTS = ("created_at", "started_at", "finished_at")


def run(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def env(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_")}
    return {
        **clean,
        "MAILPIPE_DATA_DIR": str(tmp_path),
        "MAILPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "MAILPIPE_ALLOW_PRIVATE_HOSTS": LOOPBACK_HOSTS,  # the test's Dovecot is on loopback
        "USER_PW": "geheim-1",
    }


def add_account(
    env, dovecot, *, mails: int, password: str | None = None, check: bool = True
) -> int:
    login, real = dovecot.new_user()
    dovecot.append(login, real, [message(i) for i in range(mails)])
    env = {**env, "IMAP_PW": password or real}
    out = run(
        "account", "add", "--user", "alice", "--password-env", "USER_PW",
        "--host", dovecot.host, "--port", str(dovecot.port), "--login", login,
        "--secret-env", "IMAP_PW", "--security", "none", *([] if check else ["--no-check"]),
        env=env,
    ).stdout  # fmt: skip
    return int(out.split()[1])


def test_user_accounts_fetch_and_reports(env, dovecot):
    # Given a user with a good and a broken account
    run("user", "add", "alice", "--password-env", "USER_PW", env=env)
    good = add_account(env, dovecot, mails=3)
    bad = add_account(env, dovecot, mails=1, password="wrong", check=False)
    # When a fetch of all accounts runs to its end
    fetched = run(
        "fetch", "--user", "alice", "--password-env", "USER_PW", "--wait", "--json",
        env=env, check=False,
    )  # fmt: skip
    # Then it reports a partial failure per account and exits non-zero
    assert fetched.returncode == 1
    status = json.loads(fetched.stdout)
    assert status["status"] == "partial_failure"
    outcome = {run["account_id"]: run for run in status["accounts"]}
    assert outcome[good]["saved"] == 3
    assert outcome[bad]["error_class"] == "invalid_credentials"
    # And the job list, the job and the health view agree
    jobs = json.loads(run("jobs", "--user", "alice", "--json", env=env).stdout)
    assert [job["job_id"] for job in jobs] == [status["job_id"]]
    assert "partial_failure" in run("job", status["job_id"], env=env).stdout
    health = {
        a["account_id"]: a
        for a in json.loads(run("health", "--user", "alice", "--json", env=env).stdout)
    }
    assert health[bad]["last_error_class"] == "invalid_credentials"
    assert health[good]["last_success_at"] is not None
    # And every instant the JSON views print is ISO 8601 with its offset, +00:00
    job = json.loads(run("job", status["job_id"], "--json", env=env).stdout)
    instants = [
        *(view[name] for view in (status, job, *jobs) for name in JOB_INSTANTS),
        *(account[name] for account in job["accounts"] for name in JOB_INSTANTS[1:]),
        *(account["last_fetch_at"] for account in health.values()),
        health[good]["last_success_at"],
    ]
    assert all(instant.endswith("+00:00") for instant in instants), instants
    listed = run("account", "list", "--user", "alice", env=env).stdout
    assert str(good) in listed and str(bad) in listed


def test_account_add_checks_the_login_unless_told_not_to(env, dovecot):
    # Given a user and a mailbox whose password the operator mistypes
    run("user", "add", "alice", "--password-env", "USER_PW", env=env)
    login, _real = dovecot.new_user()
    adding = [
        "account", "add", "--user", "alice", "--password-env", "USER_PW",
        "--host", dovecot.host, "--port", str(dovecot.port), "--login", login,
        "--secret-env", "IMAP_PW", "--security", "none",
    ]  # fmt: skip
    wrong = {**env, "IMAP_PW": "wrong"}
    # When the account is added
    refused = run(*adding, env=wrong, check=False)
    # Then it is refused in one line naming the cause, and nothing is stored
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "not added" in line and "invalid_credentials" in line and "--no-check" in line
    assert run("account", "list", "--user", "alice", env=env).stdout.strip() == ""
    # When it is added with --no-check (its server may not be reachable yet)
    added = run(*adding, "--no-check", env=wrong)
    # Then it is stored without a login
    assert added.stdout.startswith("account ")


def test_wrong_user_password_is_one_line(env, dovecot):
    run("user", "add", "alice", "--password-env", "USER_PW", env=env)
    result = run(
        "fetch", "--user", "alice", "--password-env", "BAD_PW", "--wait",
        env={**env, "BAD_PW": "nope"}, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mailpipe: wrong password: it does not unlock this user's data key "
        "(or the key stored for this user was wrapped for another user)"
    ]


def test_passwords_are_never_taken_from_the_command_line(env):
    # There is no option that takes a password itself: only the name of a variable
    result = run("user", "add", "alice", "--password", "x", env=env, check=False)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_mailpipe_worker_runs_jobs_from_redis(env, dovecot, tmp_path):
    # Given a Redis namespace, a PostgreSQL database and the worker key of this "cluster"
    namespace = new_namespace()
    database = postgres.create_database()
    cluster = {
        **env,
        "MAILPIPE_BROKER_URL": REDIS_URL,
        "MAILPIPE_REDIS_NAMESPACE": namespace,
        "MAILPIPE_DATABASE_URL": postgres.database_url(postgres.ADMIN_URL, database),
    }
    worker = None
    try:
        public = run("worker-key", "--generate", env=cluster).stdout.strip()
        run("user", "add", "alice", "--password-env", "USER_PW", env=cluster)
        add_account(cluster, dovecot, mails=2)
        # When `mailpipe worker` runs and a job is enqueued and waited for
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--processes", "1", "--threads", "2"],
            env=cluster,
            start_new_session=True,
        )
        result = run(
            "fetch", "--user", "alice", "--password-env", "USER_PW", "--wait", "--json",
            env={**cluster, "MAILPIPE_WORKER_PUBLIC_KEY": public},
        )  # fmt: skip
        # Then the worker process did the job
        assert json.loads(result.stdout)["emails_fetched"] == 2
    finally:
        if worker is not None:
            os.killpg(worker.pid, 15)
            worker.wait(30)
        delete_namespace(namespace)
        postgres.drop_database(database)
