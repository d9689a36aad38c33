"""`mailpipe watcher` on real Redis, real worker processes, PostgreSQL and the real Dovecot."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from imapclient import IMAPClient
from sqlalchemy import func, select

from mailpipe import grants
from mailpipe.accounts import account_settings, set_credentials
from mailpipe.models import AccountRun, Email, MailAccount, PipelineJob
from mailpipe.vocabulary import RUN_OPEN, JobType
from tests.support.cluster import Cluster
from tests.support.faultproxy import FaultProxy
from tests.support.messages import plain_message as message
from tests.support.policy import LOOPBACK

HANG_GUARD = 90.0  # only so a broken build fails instead of hanging; no timing is asserted
LEASE_SECONDS = "2"


def wait_until(condition: Callable[[], object], what: str, seconds: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def watcher(cluster: Cluster, tmp_path, name: str, **env: str) -> Iterator[subprocess.Popen]:
    """A `mailpipe watcher` process with short leases; stopped (or reaped) at the end."""
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "watcher", "--metrics-port", "0"],
        env={**cluster.env, "MAILPIPE_WATCH_LEASE_SECONDS": LEASE_SECONDS, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def pushed_account(
    cluster: Cluster, *, name: str, mails: int = 0, port: int | None = None
) -> tuple[int, int, str, str]:
    """A user with a background grant and one account synced once; (user, account, login,
    password)."""
    user_id, key = cluster.user(name)
    return pushed_account_of(cluster, user_id, key, mails=mails, port=port)


def pushed_account_of(
    cluster: Cluster, user_id: int, key, *, mails: int = 0, port: int | None = None
) -> tuple[int, int, str, str]:
    """`pushed_account` for a user made already (whose key the caller keeps)."""
    login, password = cluster.dovecot.new_user()
    if mails:
        cluster.dovecot.append(login, password, [message(i) for i in range(mails)])
    account_id = add(cluster, user_id, key, login, password, port=port)
    with cluster.sessions.begin() as session:
        grants.grant_background(
            session,
            user_id=user_id,
            key=key,
            public_key=cluster.pipeline.public_key,
            ttl_seconds=3600,
        )
    cluster.wait(cluster.pipeline.enqueue_fetch_job(user_id, key=key), user_id)
    return user_id, account_id, login, password


def add(cluster: Cluster, user_id: int, key, login: str, password: str, *, port=None) -> int:
    from mailpipe.accounts import add_account
    from mailpipe.imap import ImapSettings
    from mailpipe.models import User

    settings = ImapSettings(
        host=cluster.dovecot.host,
        port=port or cluster.dovecot.port,
        username=login,
        password=password,
        security="none",
    )
    with cluster.sessions.begin() as session:
        return add_account(session, session.get_one(User, user_id), key, settings).id


def sessions_of(cluster: Cluster, login: str) -> int:
    """IMAP connections Dovecot holds for a login now (`doveadm who`)."""
    out = cluster.dovecot.doveadm("who", "-1", login)
    return sum(1 for line in out.splitlines()[1:] if line.split() and line.split()[0] == login)


def owner_of(cluster: Cluster, account_id: int) -> str | None:
    with cluster.sessions() as session:
        return session.scalar(select(MailAccount.watch_owner).where(MailAccount.id == account_id))


def push_jobs(cluster: Cluster, user_id: int) -> list[PipelineJob]:
    with cluster.sessions() as session:
        return list(
            session.scalars(
                select(PipelineJob).where(
                    PipelineJob.user_id == user_id, PipelineJob.type == JobType.PUSH
                )
            )
        )


def stored(cluster: Cluster, account_id: int) -> int:
    with cluster.sessions() as session:
        return session.scalar(select(func.count()).where(Email.account_id == account_id)) or 0


def open_runs(cluster: Cluster, account_id: int) -> int:
    with cluster.sessions() as session:
        return (
            session.scalar(
                select(func.count()).where(
                    AccountRun.account_id == account_id, AccountRun.status.in_(RUN_OPEN)
                )
            )
            or 0
        )


def watched(cluster: Cluster, account_id: int, login: str) -> bool:
    """Held by a watcher, which is connected (no fetch run is open to add a connection)."""
    return (
        owner_of(cluster, account_id) is not None
        and open_runs(cluster, account_id) == 0
        and sessions_of(cluster, login) == 1
    )


def test_new_mail_triggers_exactly_one_run_and_is_stored(cluster, tmp_path):
    # Given an account synced once (one message), and a watcher holding it
    user_id, account_id, login, password = pushed_account(cluster, name="push-one", mails=1)
    with watcher(cluster, tmp_path, "w1"):
        wait_until(lambda: watched(cluster, account_id, login), "the watcher connects")
        # Then connecting alone started no run: nothing had changed since the last sync
        assert push_jobs(cluster, user_id) == []
        # When a message arrives
        cluster.dovecot.append(login, password, [message(7)])
        # Then one push run stores it
        wait_until(lambda: stored(cluster, account_id) == 2, "the new message is stored")
        wait_until(lambda: open_runs(cluster, account_id) == 0, "the run ends")
        jobs = push_jobs(cluster, user_id)
        assert len(jobs) == 1 and jobs[0].status == "success"
        assert cluster.runs(jobs[0].id)[0].saved == 1
        assert "noticed_at" in jobs[0].options  # push latency is measured from there
        # And no other run follows it
        time.sleep(2)  # a few flush rounds of the watcher
        assert len(push_jobs(cluster, user_id)) == 1


def test_a_burst_of_50_messages_gives_one_or_two_runs(cluster, tmp_path):
    # Given a watched account
    user_id, account_id, login, password = pushed_account(cluster, name="push-burst")
    with watcher(cluster, tmp_path, "w1"):
        wait_until(lambda: watched(cluster, account_id, login), "the watcher connects")
        # When 50 messages arrive one APPEND after another
        client = IMAPClient(cluster.dovecot.host, port=cluster.dovecot.port, ssl=False)
        client.login(login, password)
        for number in range(50):
            client.append("INBOX", message(100 + number))
        client.logout()
        # Then all are stored, by one or two runs, not 50
        wait_until(lambda: stored(cluster, account_id) == 50, "all 50 are stored")
        wait_until(lambda: open_runs(cluster, account_id) == 0, "the runs end")
        time.sleep(2)  # a few flush rounds of the watcher
        assert 1 <= len(push_jobs(cluster, user_id)) <= 2


def test_a_killed_watchers_accounts_are_taken_over_and_never_watched_twice(cluster, tmp_path):
    # Given two watched accounts, held by a first watcher
    accounts = [pushed_account(cluster, name=f"push-take-{n}") for n in range(2)]
    with watcher(cluster, tmp_path, "w1") as first:
        for _user, account_id, login, _password in accounts:
            wait_until(lambda a=account_id, n=login: watched(cluster, a, n), "w1 watches")
        held_by_first = {owner_of(cluster, a) for _u, a, _l, _p in accounts}
        assert len(held_by_first) == 1
        # And a second watcher that has renewed its leases a few times meanwhile
        with watcher(cluster, tmp_path, "w2"):
            time.sleep(3 * float(LEASE_SECONDS))
            # Then no account is watched twice: still one owner and one connection each
            for _user, account_id, login, _password in accounts:
                assert {owner_of(cluster, account_id)} == held_by_first
                assert sessions_of(cluster, login) == 1
            # When the first watcher is killed
            first.send_signal(signal.SIGKILL)
            first.wait()
            # Then the second takes its accounts over once the leases lapse, one connection each
            for _user, account_id, login, _password in accounts:
                wait_until(
                    lambda a=account_id: owner_of(cluster, a) not in (None, *held_by_first),
                    "the second watcher takes over",
                )
                wait_until(lambda a=account_id, n=login: watched(cluster, a, n), "w2 watches")
            # And new mail is still pushed
            user_id, account_id, login, password = accounts[0]
            cluster.dovecot.append(login, password, [message(1)])
            wait_until(lambda: stored(cluster, account_id) == 1, "the message is stored")
            assert len(push_jobs(cluster, user_id)) >= 1


def test_an_ended_grant_stops_the_watching(cluster, tmp_path):
    # Given a watched account
    user_id, account_id, login, _password = pushed_account(cluster, name="push-logout")
    with watcher(cluster, tmp_path, "w1"):
        wait_until(lambda: watched(cluster, account_id, login), "the watcher connects")
        # When its owner logs out (the background grant is revoked)
        with cluster.sessions.begin() as session:
            grants.revoke_background(session, user_id)
        # Then the watcher closes the connection and gives the account up
        wait_until(lambda: sessions_of(cluster, login) == 0, "the connection closes")
        wait_until(lambda: owner_of(cluster, account_id) is None, "the lease is given back")


def test_push_off_is_not_watched_and_sigterm_gives_leases_back(cluster, tmp_path):
    # Given two accounts, one of them with push turned off
    _user, pushed, login, _password = pushed_account(cluster, name="push-on")
    _user2, polled, polled_login, _password2 = pushed_account(cluster, name="push-off")
    with cluster.sessions.begin() as session:
        session.get_one(MailAccount, polled).push_enabled = False
    with watcher(cluster, tmp_path, "w1") as process:
        wait_until(lambda: watched(cluster, pushed, login), "the watcher connects")
        # Then the account with push off is neither held nor connected
        assert owner_of(cluster, polled) is None
        assert sessions_of(cluster, polled_login) == 0
        # When the watcher is stopped with SIGTERM
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_GUARD) == 0
    # Then it gave its lease back at once, so another watcher need not wait for it to lapse
    assert owner_of(cluster, pushed) is None


def test_idle_connections_count_against_the_host_cap(cluster, tmp_path):
    # Given three pushed accounts on one host, and a watcher whose cap for it is two connections
    accounts = [pushed_account(cluster, name=f"push-cap-{n}") for n in range(3)]

    def connected() -> int:
        return sum(sessions_of(cluster, login) for _user, _account, login, _password in accounts)

    with watcher(cluster, tmp_path, "w1", MAILPIPE_MAX_CONNECTIONS_PER_HOST="2"):
        # Then it holds all three leases but opens only two IDLE connections
        wait_until(lambda: connected() == 2, "two connections")
        time.sleep(3 * float(LEASE_SECONDS))  # several renewals and slot retries later
        assert connected() == 2
        assert all(owner_of(cluster, account) for _u, account, _l, _p in accounts)


def test_a_cut_connection_comes_back_and_still_pushes(cluster, tmp_path):
    # Given a watched account whose server is reached through the fault proxy
    with FaultProxy(upstream=(cluster.dovecot.host, cluster.dovecot.port)) as proxy:
        user_id, account_id, login, password = pushed_account(
            cluster, name="push-cut", port=proxy.port
        )
        with watcher(cluster, tmp_path, "w1"):
            wait_until(lambda: watched(cluster, account_id, login), "the watcher connects")
            before = proxy.connections
            # When the proxy resets the IDLE connection
            proxy.cut()
            # Then the watcher connects again
            wait_until(lambda: proxy.connections > before, "a new connection")
            wait_until(lambda: watched(cluster, account_id, login), "the watcher is back")
            # And new mail is still pushed and stored
            cluster.dovecot.append(login, password, [message(1)])
            wait_until(lambda: stored(cluster, account_id) == 1, "the message is stored")
            assert len(push_jobs(cluster, user_id)) >= 1


def test_a_refused_login_is_tried_again_later_with_the_password_its_owner_set(cluster, tmp_path):
    # Given a watched account reached through the fault proxy, and a watcher that tries a
    # refused account again after 2 s
    with FaultProxy(upstream=(cluster.dovecot.host, cluster.dovecot.port)) as proxy:
        user_id, key = cluster.user("push-new-password")
        _user, account_id, login, _old = pushed_account_of(cluster, user_id, key, port=proxy.port)
        with watcher(cluster, tmp_path, "w1", MAILPIPE_WATCH_RETRY_SECONDS="2"):
            wait_until(lambda: watched(cluster, account_id, login), "the watcher connects")
            # When the password changes at the provider and the IDLE connection drops
            new_password = "neu-" + login
            cluster.dovecot.add_user(login, new_password)
            time.sleep(1.1)  # Dovecot re-reads a passwd-file at most once a second
            refused_from = proxy.connections
            proxy.cut()
            # Then the watcher's next login is refused, and it does not hammer the server
            wait_until(lambda: proxy.connections > refused_from, "a login is tried")
            time.sleep(1.0)
            assert proxy.connections - refused_from == 1
            assert sessions_of(cluster, login) == 0
            # When the owner stores the new password (as the web app does)
            set_password(cluster, key, account_id, new_password)
            # Then the watcher tries again with it, and new mail is pushed and stored
            wait_until(lambda: watched(cluster, account_id, login), "the watcher is back")
            cluster.dovecot.append(login, new_password, [message(1)])
            wait_until(lambda: stored(cluster, account_id) == 1, "the message is stored")


def set_password(cluster: Cluster, key, account_id: int, password: str) -> None:
    """Store an account's new password under its owner's key, as the web app does."""
    with cluster.sessions.begin() as session:
        account = session.get_one(MailAccount, account_id)
        settings = account_settings(account, key, policy=LOOPBACK)
        set_credentials(account, key, replace(settings, password=password))


def test_an_account_whose_sealed_settings_do_not_open_is_given_back_and_the_rest_watched(
    cluster, tmp_path
):
    # Given two pushed accounts of one user, one with a folder list sealed for the other's row
    # (copied there: it does not open)
    user_id, key = cluster.user("push-unreadable")
    _user, readable, login, _password = pushed_account_of(cluster, user_id, key)
    _user, unreadable, _login, _password = pushed_account_of(cluster, user_id, key)
    with cluster.sessions.begin() as session:
        copied = session.get_one(MailAccount, readable).folders_enc
        session.get_one(MailAccount, unreadable).folders_enc = copied
    with watcher(cluster, tmp_path, "w1"):
        # Then the watcher watches the readable account and gives the other one back
        wait_until(lambda: watched(cluster, readable, login), "the watcher connects")
        wait_until(lambda: owner_of(cluster, unreadable) is None, "the lease is given back")
