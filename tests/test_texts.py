"""Every word of the vocabulary a user can meet has a German and an English text."""

from __future__ import annotations

import pytest

from mailpipe.models import Notification
from mailpipe.vocabulary import ErrorClass, Health, JobReason, JobStatus, JobType, RunStatus
from web.i18n import LANGUAGES, TEXTS
from web.present import accounts_label, error_text, notification_text, status_text

VOCABULARY = [
    *(f"error_{member}" for member in ErrorClass),
    *(f"status_{member}" for member in JobStatus),
    *(f"status_{member}" for member in RunStatus),
    *(f"health_{member}" for member in Health),
    *(f"reason_{member}" for member in JobReason),
]


@pytest.mark.parametrize("key", VOCABULARY)
def test_every_error_class_status_and_health_is_said_in_german_and_english(key):
    # Given a word of the vocabulary, Then both languages have their own text for it
    said = {lang: TEXTS[lang].get(key) for lang in LANGUAGES}
    assert all(said.values()), f"{key} lacks a text in {[k for k, v in said.items() if not v]}"
    assert said["de"] != said["en"], f"{key} is not translated"


@pytest.mark.parametrize("error_class", list(ErrorClass))
def test_no_error_class_falls_back_to_the_unknown_text(error_class):
    # Given an error class other than unknown, When the page says it, Then it says that class
    for lang in LANGUAGES:
        shown = error_text(error_class, lang)
        assert shown
        if error_class != ErrorClass.UNKNOWN:
            assert shown != error_text(ErrorClass.UNKNOWN, lang)


def test_a_skipped_run_with_an_open_circuit_says_so_not_something_unexpected():
    # Given a run skipped because the account's circuit is open
    # When the page says its status and cause in English
    status, cause = status_text(RunStatus.SKIPPED, "en"), error_text("circuit_open", "en")
    # Then it is a skip with its reason, not "Something unexpected went wrong"
    assert status == "Skipped"
    assert "kept failing" in cause and "unexpected" not in cause


def test_running_out_of_retries_is_said_in_the_readers_language():
    # Given the notification a partly successful job leaves for an account out of retries
    row = Notification(
        kind="retries_exhausted",
        message="E-Mail: fetching failed after every retry (timeout); ...",
        params={"provider": "E-Mail", "error_class": "timeout"},
    )
    # When the page says it in German and in English
    german, english = notification_text(row, "de"), notification_text(row, "en")
    # Then each names the account's provider in that language and the cause in user words
    assert german.startswith("E-Mail: Abruf auch nach allen Wiederholungen fehlgeschlagen.")
    assert "Der Mailserver hat nicht rechtzeitig geantwortet." in german
    assert english.startswith("Mail: fetching failed even after every retry.")
    assert "The mail server did not answer in time." in english


def test_job_history_marks_push_and_scheduled_runs_in_both_languages():
    # Given the label of one account
    labels = {7: "GMX · anna@example.org"}
    # When the history names jobs the user did not start, Then it says who did
    assert accounts_label(JobType.PUSH, [7], labels, "de") == "GMX · anna@example.org (Push)"
    assert accounts_label(JobType.PUSH, [7], labels, "en") == "GMX · anna@example.org (push)"
    assert accounts_label(JobType.SCHEDULED, [7], labels, "de").endswith("(automatisch)")
