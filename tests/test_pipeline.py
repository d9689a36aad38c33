"""Orchestration on the in-process stub broker: jobs fan out per account and end exactly once."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from mailpipe import grants, health, jobs, leases, schedule
from mailpipe.accounts import account_folders
from mailpipe.errors import NotFound
from mailpipe.grants import KeyGrant
from mailpipe.health import CircuitPolicy
from mailpipe.models import AccountRun, Email, MailAccount, PipelineJob, utcnow
from mailpipe.observer import Observer
from mailpipe.processors import Mail
from mailpipe.retry import RetryPolicy
from mailpipe.runner import Next, run_account
from mailpipe.vocabulary import Gate, Health
from tests.support.policy import LOOPBACK
from tests.support.world import User, World

CIRCUIT = CircuitPolicy()


def test_job_for_all_accounts_fans_out_and_succeeds(world):
    # Given a user with two accounts holding 3 and 2 messages
    alice = world.user("alice")
    first = world.account(alice, mails=3)
    second = world.account(alice, mails=2)
    # When a fetch of all accounts is enqueued and the worker runs it
    status = world.run(alice)
    # Then the job succeeded with one outcome per account
    assert status["status"] == "success"
    assert status["type"] == "all"
    assert {run["account_id"]: run["saved"] for run in status["accounts"]} == {first: 3, second: 2}
    assert status["emails_fetched"] == 5
    assert all(run["attempt"] == 1 for run in status["accounts"])
    assert {"connect", "fetch", "save"} <= set(status["accounts"][0]["phases"])
    assert len(world.emails(first)) == 3


def test_one_failing_account_gives_partial_failure_in_user_words(world):
    alice = world.user("alice")
    good = world.account(alice, mails=2)
    bad = world.account(alice, password="wrong", mails=1)
    status = world.run(alice)
    assert status["status"] == "partial_failure"
    runs = {run["account_id"]: run for run in status["accounts"]}
    assert runs[good]["status"] == "success"
    assert runs[bad]["status"] == "failed"
    assert runs[bad]["error_class"] == "invalid_credentials"
    assert runs[bad]["attempt"] == 1  # permanent: never retried
    assert status["errors"] == [
        {
            "account_id": bad,
            "error_class": "invalid_credentials",
            "message": runs[bad]["error"],
        }
    ]
    assert "password" in runs[bad]["error"]


def test_all_accounts_failing_fails_the_job(world):
    alice = world.user("alice")
    world.account(alice, password="wrong")
    assert world.run(alice)["status"] == "failed"


def test_job_key_grant_is_dropped_when_the_job_ends(world):
    alice = world.user("alice")
    world.account(alice, mails=1)
    status = world.run(alice)
    with world.sessions() as session:
        left = session.scalar(
            select(func.count())
            .select_from(grants.KeyGrant)
            .where(grants.KeyGrant.job_id == status["job_id"])
        )
    assert left == 0


def test_messages_carry_no_key(world, monkeypatch):
    alice = world.user("alice")
    world.account(alice)
    sent = []
    monkeypatch.setattr(
        world.pipeline.broker, "enqueue", lambda message, **kw: sent.append(message)
    )
    world.pipeline.enqueue_fetch_job(alice.id, key=alice.key)
    assert len(sent) == 1
    encoded = sent[0].encode()
    assert alice.key.export() not in encoded
    assert alice.key.export().hex().encode() not in encoded
    assert set(json.loads(encoded)["args"][1:]) == {alice.accounts[0]}


def test_another_users_jobs_and_accounts_are_not_found(world):
    alice, mallory = world.user("alice"), world.user("mallory")
    account = world.account(alice, mails=1)
    status = world.run(alice)
    with pytest.raises(NotFound):
        world.pipeline.get_job_status(status["job_id"], mallory.id)
    with pytest.raises(NotFound):
        world.pipeline.enqueue_fetch_job(mallory.id, account, key=mallory.key)
    assert world.pipeline.list_jobs(mallory.id) == []
    assert world.pipeline.get_account_health(mallory.id) == []
    assert [job.job_id for job in world.pipeline.list_jobs(alice.id)] == [status["job_id"]]


def test_redelivered_message_does_not_sync_again(world):
    alice = world.user("alice")
    account = world.account(alice, mails=2)
    status = world.run(alice)
    # When the same message is delivered once more (a worker died after finishing it)
    from actors.fetch import fetch_account

    fetch_account.send(status["job_id"], account)
    world.wait()
    # Then the run keeps its single attempt and nothing is stored twice
    again = world.pipeline.get_job_status(status["job_id"], alice.id)
    assert again.accounts[0].attempt == 1
    assert again.status == "success"
    assert len(world.emails(account)) == 2


def job_with_grant(world: World, user: User, account: int) -> str:
    """A job for one account whose key grant the world's workers can open."""
    with world.sessions.begin() as session:
        job = jobs.create_job(
            session, user_id=user.id, account_ids=[account], type="account", options={}
        )
        job.grant_id = grants.grant_for_job(
            session,
            user_id=user.id,
            job_id=job.id,
            key=user.key,
            public_key=grants.public_key_bytes(world.private_key),
            ttl_seconds=60,
        ).id
        return job.id


def run_job(world: World, job_id: str, account: int, **options):
    """The core's run of one account for one job, as a worker's first attempt makes it."""
    return run_account(
        world.sessions,
        job_id=job_id,
        account_id=account,
        attempt=1,
        retry_policy=RetryPolicy(),
        address_policy=LOOPBACK,
        private_key=world.private_key,
        **options,
    )


def run_with(world: World, user: User, account: int, processors: dict, observer=None):
    return run_job(
        world,
        job_with_grant(world, user, account),
        account,
        processors=processors,
        observer=observer,
    )


def test_a_successful_run_records_the_recovery_before_its_job_is_seen_final(world):
    # Given an account that a failed attempt left DEGRADED with one failure counted
    alice = world.user("alice")
    account = world.account(alice, mails=1)
    with world.sessions.begin() as session:
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == account)
            .values(health_status=Health.DEGRADED, failure_count=1, failure_window_start=utcnow())
        )
    # When the core runs it with the circuit (as the worker does), no middleware after it
    outcome = run_job(
        world, job_with_grant(world, alice, account), account, circuit=CircuitPolicy()
    )
    # Then the job is final and, in the same transaction, the account is HEALTHY again
    assert outcome.finished is not None and outcome.finished.status == "success"
    assert outcome.health_recorded
    with world.sessions() as session:
        row = session.get_one(MailAccount, account)
        assert (row.health_status, row.failure_count) == (Health.HEALTHY, 0)


def test_a_held_account_lease_makes_the_run_wait(world):
    alice = world.user("alice")
    account = world.account(alice, mails=1)
    job_id = job_with_grant(world, alice, account)
    with world.sessions.begin() as session:
        assert leases.acquire(session, account, owner="someone-else", seconds=60)
    outcome = run_job(world, job_id, account)
    assert outcome.action == Next.BUSY
    with world.sessions.begin() as session:
        leases.release(session, account, owner="someone-else")
    assert run_job(world, job_id, account).finished.status == "success"


def test_a_run_ends_without_taking_back_a_lease_that_passed_to_another_holder(world):
    # Given a healthy account whose lease another holder takes over while the run syncs (as
    # when a run outlives its lease)
    alice = world.user("alice")
    account = world.account(alice, mails=1)

    class TakeOver(Observer):
        def before_run(self, *, provider: str) -> None:
            with world.sessions.begin() as session:
                session.execute(
                    update(MailAccount)
                    .where(MailAccount.id == account)
                    .values(lease_owner="someone-else")
                )

    # When the run ends a success, recorded on the account's health
    outcome = run_job(
        world,
        job_with_grant(world, alice, account),
        account,
        circuit=CircuitPolicy(),
        observer=TakeOver(),
    )
    # Then the account shows the success and its health check, and the other holder keeps the
    # lease
    assert outcome.finished is not None and outcome.finished.status == "success"
    assert outcome.health_recorded
    with world.sessions() as session:
        row = session.get_one(MailAccount, account)
        assert row.last_success_at is not None and row.health_checked_at is not None
        assert (row.health_status, row.lease_owner) == (Health.HEALTHY, "someone-else")


def test_finalisation_happens_exactly_once(world):
    alice = world.user("alice")
    a, b = world.account(alice), world.account(alice)
    with world.sessions.begin() as session:
        job = jobs.create_job(session, user_id=alice.id, account_ids=[a, b], type="all", options={})
    with world.sessions.begin() as session:
        assert jobs.finish_run(session, job_id=job.id, account_id=a, status="success") is None
    with world.sessions.begin() as session:
        finished = jobs.finish_run(
            session, job_id=job.id, account_id=b, status="failed", error_class="timeout"
        )
    assert finished is not None and finished.status == "partial_failure"
    with world.sessions.begin() as session:  # a late duplicate changes nothing
        assert jobs.finish_run(session, job_id=job.id, account_id=b, status="success") is None
        assert jobs.finalise_if_done(session, job.id) is None


def test_failing_processor_marks_mail_for_reprocessing(world):
    # Given an account with two new mails and a processor with a bug
    alice = world.user("alice")
    account = world.account(alice, mails=2)
    calls = []

    def broken(mail: Mail):
        calls.append(mail.id)
        raise RuntimeError("plug-in bug")

    # When the account is fetched
    first = run_with(world, alice, account, {"broken": broken})
    # Then the fetch succeeds, both mails are stored, and both are marked for reprocessing
    assert first.finished.status == "success"
    assert (first.result.saved, first.result.processed) == (2, 0)
    assert {email.process_status for email in world.emails(account)} == {"retry"}
    assert len(calls) == 2  # once per mail: not again by the same run's reprocessing
    # When the processor is fixed, the next run (with no new mail) takes the mail up again
    second = run_with(
        world, alice, account, {"fixed": lambda mail: {"subject": mail.fields["subject"]}}
    )
    assert second.result.saved == 0
    with world.sessions() as session:
        run = session.scalars(
            select(AccountRun).where(AccountRun.job_id == second.finished.job_id)
        ).one()
    assert run.processed == 2
    assert {email.process_status for email in world.emails(account)} == {"done"}
    stored = world.emails(account)[0]
    annotations = json.loads(
        alice.key.decrypt(
            stored.annotations_enc, table="emails", column="annotations", row=stored.id
        )
    )
    assert annotations["fixed"]["subject"].startswith("Nachricht")


def test_a_processor_returning_what_json_cannot_hold_counts_as_failed(world):
    # Given a processor that returns a set and one that works
    alice = world.user("alice")
    account = world.account(alice, mails=1)
    processors = {"odd": lambda mail: {1, 2}, "fine": lambda mail: mail.fields["subject"]}
    # When the account is fetched
    outcome = run_with(world, alice, account, processors)
    # Then the mail is stored, marked for reprocessing, with what the working processor said
    assert outcome.finished.status == "success"
    [email] = world.emails(account)
    assert email.process_status == "retry"
    annotations = json.loads(
        alice.key.decrypt(email.annotations_enc, table="emails", column="annotations", row=email.id)
    )
    assert set(annotations) == {"fine"}


def test_processors_cannot_change_the_stored_fields(world):
    # Given a processor that tries to rewrite the mail it is shown
    alice = world.user("alice")
    account = world.account(alice, mails=1)

    def meddling(mail: Mail):
        mail.fields["subject"] = "changed"

    # When the account is fetched
    run_with(world, alice, account, {"meddling": meddling})
    # Then the stored fields are what the parser gave, and the processor counts as failed
    [email] = world.emails(account)
    fields = json.loads(
        alice.key.decrypt(email.parsed_enc, table="emails", column="parsed", row=email.id)
    )
    assert fields["subject"].startswith("Nachricht")
    assert email.process_status == "retry"


def test_builtin_processor_runs_in_the_process_phase(world):
    alice = world.user("alice")
    account = world.account(alice, mails=1)
    status = world.run(alice)
    assert status["accounts"][0]["processed"] == 1
    assert "process" in status["accounts"][0]["phases"]
    [email] = world.emails(account)
    assert email.process_status == "done"
    annotations = json.loads(
        alice.key.decrypt(email.annotations_enc, table="emails", column="annotations", row=email.id)
    )
    assert annotations == {"newsletter": {"newsletter": False}}


def background(world: World, user: User) -> None:
    with world.sessions.begin() as session:
        grants.grant_background(
            session,
            user_id=user.id,
            key=user.key,
            public_key=grants.public_key_bytes(world.private_key),
            ttl_seconds=3600,
        )


def test_scheduler_claims_due_accounts_once(world):
    # Given two users, only one of whom allowed background sync
    alice, bob = world.user("alice"), world.user("bob")
    a1, a2 = world.account(alice), world.account(alice)
    broken = world.account(alice)
    world.account(bob)
    background(world, alice)
    with world.sessions.begin() as session:
        session.execute(
            update(MailAccount).where(MailAccount.id == broken).values(health_status=Health.BROKEN)
        )
    # When the scheduler looks twice in a row
    with world.sessions.begin() as session:
        first = schedule.claim_due_accounts(session)
    with world.sessions.begin() as session:
        second = schedule.claim_due_accounts(session)
    # Then alice's healthy accounts are claimed once; bob (no grant) and Health.BROKEN ones never
    assert first == {alice.id: [a1, a2]}
    assert second == {}


def test_scheduled_job_uses_the_background_grant_and_keeps_it(world):
    alice = world.user("alice")
    account = world.account(alice, mails=2)
    background(world, alice)
    job_id = world.pipeline.enqueue_fetch_job(alice.id, account, max_mails=None)
    world.wait()
    status = world.pipeline.get_job_status(job_id, alice.id)
    assert (status.type, status.status, status.emails_fetched) == (
        "scheduled",
        "success",
        2,
    )
    with world.sessions() as session:
        assert alice.id in grants.users_with_background_grant(session)


def test_accounts_of_users_without_background_grant_show_locked(world):
    alice = world.user("alice")
    world.account(alice)
    [health] = world.pipeline.get_account_health(alice.id)
    assert health.shown_health == Health.LOCKED and health.locked
    background(world, alice)
    [health] = world.pipeline.get_account_health(alice.id)
    assert health.shown_health == "HEALTHY" and not health.locked
    with pytest.raises(NotFound):
        world.pipeline.enqueue_fetch_job(world.user("bob").id)  # no key and no grant


def test_account_with_an_open_run_is_not_claimed(world):
    alice = world.user("alice")
    account = world.account(alice)
    background(world, alice)
    with world.sessions.begin() as session:
        jobs.create_job(session, user_id=alice.id, account_ids=[account], type="all", options={})
    with world.sessions.begin() as session:
        assert schedule.claim_due_accounts(session) == {}


def test_performance_metrics_from_job_records(world):
    alice = world.user("alice")
    world.account(alice, mails=3)
    world.run(alice)
    metrics = world.pipeline.get_performance_metrics(alice.id)
    assert metrics.runs == 1
    assert metrics.phases["fetch"].count == 1
    assert metrics.account_run_duration is not None and metrics.account_run_duration.p95 > 0
    today = utcnow().date().isoformat()
    assert (metrics.trend[-1].date, metrics.trend[-1].jobs, metrics.trend[-1].emails) == (
        today,
        1,
        3,
    )
    assert len(metrics.trend) == 7


def test_scheduler_tick_deletes_expired_key_grants(world):
    # Given one user whose background grant has expired and one whose grant is live
    alice, bob = world.user("alice"), world.user("bob")
    background(world, alice)
    background(world, bob)
    with world.sessions.begin() as session:
        session.execute(
            update(KeyGrant)
            .where(KeyGrant.user_id == alice.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    # When the scheduler ticks
    from actors.schedule import schedule_due

    schedule_due()
    # Then only the live grant is left
    with world.sessions() as session:
        assert session.scalars(select(KeyGrant.user_id)).all() == [bob.id]


def test_scheduler_tick_starts_one_job_per_user_for_their_due_accounts(world):
    # Given a user with background sync and two due accounts
    alice = world.user("alice")
    first, second = world.account(alice, mails=1), world.account(alice, mails=2)
    background(world, alice)
    # When the scheduler ticks and the workers run what it enqueued
    from actors.schedule import schedule_due

    schedule_due()
    world.wait()
    # Then one scheduled job covered both accounts and succeeded
    [job] = world.pipeline.list_jobs(alice.id)
    status = world.pipeline.get_job_status(job.job_id, alice.id)
    assert (status.type, status.status) == ("scheduled", "success")
    assert {run.account_id: run.saved for run in status.accounts} == {first: 1, second: 2}


def test_a_scheduled_job_leaves_out_accounts_of_other_users(world):
    # Given alice with background sync and an account of bob's
    alice, bob = world.user("alice"), world.user("bob")
    mine = world.account(alice)
    theirs = world.account(bob)
    background(world, alice)
    # When a scheduled job for alice is asked to cover both
    job_id = world.pipeline.enqueue_scheduled_job(alice.id, [mine, theirs])
    world.wait()
    # Then only alice's account was fetched
    status = world.pipeline.get_job_status(job_id, alice.id)
    assert [run.account_id for run in status.accounts] == [mine]


def test_scheduler_tick_deletes_finished_jobs_past_the_retention(world):
    # Given a job finished 40 days ago, one finished yesterday and one still open from 40 days ago
    alice = world.user("alice")
    account = world.account(alice)
    ids = []
    for _ in range(3):
        with world.sessions.begin() as session:
            job = jobs.create_job(
                session, user_id=alice.id, account_ids=[account], type="account", options={}
            )
            ids.append(job.id)
    old, recent, open_old = ids
    for job_id, days in ((old, 40), (recent, 1)):
        with world.sessions.begin() as session:
            jobs.finish_run(session, job_id=job_id, account_id=account, status="success")
            session.execute(
                update(PipelineJob)
                .where(PipelineJob.id == job_id)
                .values(finished_at=utcnow() - timedelta(days=days))
            )
    with world.sessions.begin() as session:
        session.execute(
            update(PipelineJob)
            .where(PipelineJob.id == open_old)
            .values(created_at=utcnow() - timedelta(days=40))
        )
    # When the scheduler ticks
    from actors.schedule import schedule_due

    schedule_due()
    # Then the old finished job is gone with its run; the recent and the open one stay
    with world.sessions() as session:
        assert set(session.scalars(select(PipelineJob.id))) == {recent, open_old}
        assert set(session.scalars(select(AccountRun.job_id))) == {recent, open_old}


def test_scheduler_tick_ends_runs_whose_message_was_lost_and_syncs_their_accounts(world):
    # Given a user with background sync, and a job of two hours ago whose message never came
    # (Redis lost it): its run is still pending, so the account is never due
    alice = world.user("alice")
    account = world.account(alice, mails=2)
    background(world, alice)
    with world.sessions.begin() as session:
        lost = jobs.create_job(
            session, user_id=alice.id, account_ids=[account], type="account", options={}
        ).id
        session.execute(
            update(PipelineJob)
            .where(PipelineJob.id == lost)
            .values(created_at=utcnow() - timedelta(hours=2))
        )

    # When the scheduler ticks and the workers run what it enqueued
    from actors.schedule import schedule_due

    schedule_due()
    world.wait()

    # Then the lost run failed with its reason, its job ended, and a new scheduled job synced
    ended = world.pipeline.get_job_status(lost, alice.id)
    [run] = ended.accounts
    assert (ended.status, run.status, run.error_class) == ("failed", "failed", "unknown")
    assert run.error is not None and "message was lost" in run.error
    [scheduled] = [j for j in world.pipeline.list_jobs(alice.id) if j.job_id != lost]
    assert (scheduled.type, scheduled.status, scheduled.emails_fetched) == (
        "scheduled",
        "success",
        2,
    )


def test_unreadable_stored_credentials_fail_the_run_and_free_the_account(world):
    # Given an account whose stored credentials were copied from another row (they no longer open)
    alice = world.user("alice")
    good, bad = world.account(alice), world.account(alice)
    with world.sessions.begin() as session:
        accounts = {a.id: a for a in session.scalars(select(MailAccount))}
        accounts[bad].credentials_enc = accounts[good].credentials_enc
    # When the account is fetched
    status = world.run(alice, bad)
    # Then the run fails with an error class after a bounded number of attempts, the job ends,
    # and the account's lease is free for the next run
    [run] = status["accounts"]
    assert status["status"] == "failed"
    assert (run["status"], run["error_class"]) == ("failed", "unknown")
    assert run["attempt"] == 2
    with world.sessions() as session:
        assert session.get_one(MailAccount, bad).lease_owner is None


def test_the_run_tells_its_observer_the_accounts_provider_before_any_phase(world):
    # Given a GMX account with one new mail and an observer that records what it is told
    alice = world.user("alice")
    account = world.account(alice, mails=1, provider="gmx")
    told = []

    class Recorder(Observer):
        def before_run(self, *, provider: str) -> None:
            told.append(("provider", provider))

        def after_phase(self, phase: str, seconds: float) -> None:
            told.append(("phase", phase))

    # When the account is fetched
    run_with(world, alice, account, {}, observer=Recorder())
    # Then the provider came first, once, before the phases
    assert told[0] == ("provider", "gmx")
    assert [entry for entry in told if entry[0] == "provider"] == [("provider", "gmx")]
    assert ("phase", "fetch") in told


def test_a_probe_that_never_reports_does_not_hold_the_circuit_half_open(world):
    # Given an account whose circuit opened long ago
    alice = world.user("alice")
    account = world.account(alice, mails=1)
    long_ago = utcnow() - timedelta(seconds=CIRCUIT.cooldown_seconds + 60)
    with world.sessions.begin() as session:
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == account)
            .values(circuit_state="open", circuit_opened_at=long_ago, health_status="DEGRADED")
        )
    # When a probe is let through but its run never reports (its worker died, or it waited)
    with world.sessions.begin() as session:
        assert health.circuit_gate(session, account, circuit=CIRCUIT) == Gate.PROBE
    # Then the next run is skipped while that probe may still be under way ...
    with world.sessions.begin() as session:
        assert health.circuit_gate(session, account, circuit=CIRCUIT) == Gate.SKIP
    # ... and once a cool-down has passed without an answer, the next run is the probe and heals it
    with world.sessions.begin() as session:
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == account)
            .values(circuit_opened_at=long_ago)  # the silent probe was let through long ago
        )
    status = world.run(alice, account)
    assert (status["status"], status["accounts"][0]["saved"]) == ("success", 1)
    with world.sessions() as session:
        assert session.get_one(MailAccount, account).circuit_state == "closed"


FINAL_STATUSES = {
    # the runs' final statuses -> the job's status and reason
    (): ("failed", "no_accounts"),
    ("success", "success"): ("success", None),
    ("success", "failed"): ("partial_failure", None),
    ("success", "skipped"): ("partial_failure", "some_skipped"),
    ("success", "failed", "skipped"): ("partial_failure", "some_skipped"),
    ("failed", "failed"): ("failed", None),
    ("failed", "skipped"): ("failed", "some_skipped"),
    ("skipped", "skipped"): ("failed", "all_skipped"),
}


@pytest.mark.parametrize("runs", list(FINAL_STATUSES))
def test_a_job_succeeds_only_when_every_account_was_fetched(runs):
    # Given the final statuses of a job's runs, When the job is finalised
    status, reason = jobs.final_status(list(runs))
    # Then it is success only if every run succeeded, failed if none did, and says why when
    # skips or the lack of accounts decided it
    assert (status, reason) == FINAL_STATUSES[runs]


def test_a_job_without_accounts_is_failed_at_once_and_drops_its_key(world: World):
    # Given bob, who has no account
    bob = world.user("bob")
    # When he asks for a fetch of all his accounts
    job_id = world.pipeline.enqueue_fetch_job(bob.id, key=bob.key)
    # Then the job is final at once, failed for want of accounts, and no key grant outlives it
    status = world.pipeline.get_job_status(job_id, bob.id)
    assert (status.status, status.reason, status.final) == ("failed", "no_accounts", True)
    with world.sessions() as session:
        assert session.scalar(select(func.count()).select_from(KeyGrant)) == 0


def test_a_run_reads_a_folder_list_left_in_clear_and_seals_it(world):
    # Given an account with mail whose folder list is still in clear, as before migration 0016
    user = world.user("clear-folders")
    account = world.account(user, mails=2)
    with world.sessions.begin() as session:
        row = session.get_one(MailAccount, account)
        row.folders, row.folders_enc = ["INBOX"], None
    # When a job runs it
    outcome = run_job(world, job_with_grant(world, user, account), account)
    # Then it synced the listed folder, and the list is sealed now, its clear copy gone
    assert outcome.finished is not None and outcome.finished.status == "success"
    with world.sessions() as session:
        row = session.get_one(MailAccount, account)
        assert row.folders is None
        assert account_folders(row, user.key) == ["INBOX"]
        assert session.scalar(select(func.count()).select_from(Email)) == 2
