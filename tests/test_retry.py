"""The one retry policy: what comes back, how often, and what breaks an account."""

from __future__ import annotations

import pytest

from mailpipe.retry import RetryPolicy
from mailpipe.vocabulary import SKIPS, ErrorClass, Health


def test_transient_failures_come_back_up_to_the_limit_and_unknown_ones_once():
    # Given the policy with three retries
    policy = RetryPolicy(max_retries=3)
    # When attempts fail with a timeout, an unknown error and a wrong password
    timeouts = [policy.should_retry(ErrorClass.TIMEOUT, attempt=n) for n in (1, 2, 3, 4)]
    unknown = [policy.should_retry(ErrorClass.UNKNOWN, attempt=n) for n in (1, 2)]
    wrong = policy.should_retry(ErrorClass.INVALID_CREDENTIALS, attempt=1)
    # Then the timeout is retried three times, the unknown error once, the password never
    assert timeouts == [True, True, True, False]
    assert unknown == [True, False]
    assert wrong is False


def test_no_retries_means_no_retry_even_for_unknown_errors():
    policy = RetryPolicy(max_retries=0)
    assert not policy.should_retry(ErrorClass.UNKNOWN, attempt=1)
    assert not policy.should_retry(ErrorClass.TIMEOUT, attempt=1)
    assert not policy.retry_crash(0)


@pytest.mark.parametrize("error_class", list(ErrorClass))
def test_every_class_has_a_health_and_skips_are_never_retried(error_class):
    policy = RetryPolicy()
    health = policy.health_after(error_class)
    assert health in (Health.DEGRADED, Health.BROKEN)
    if error_class in SKIPS:
        assert policy.retries(error_class) == 0


def test_breaking_classes_make_the_account_broken_and_success_heals_it():
    policy = RetryPolicy()
    assert policy.health_after(ErrorClass.TLS_ERROR) == Health.BROKEN
    assert policy.health_after(ErrorClass.CONNECTION_RESET) == Health.DEGRADED
    assert policy.health_after(None) == Health.HEALTHY


@pytest.mark.parametrize(
    "options",
    [{"max_retries": -1}, {"min_backoff_ms": 0}, {"min_backoff_ms": 5, "max_backoff_ms": 4}],
)
def test_a_policy_that_cannot_work_is_refused_with_the_setting_named(options):
    with pytest.raises(ValueError, match="MAILPIPE_"):
        RetryPolicy(**options)
