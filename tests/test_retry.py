"""Retries: what is retried, and what a retry leaves alone."""

from __future__ import annotations

import random

import pytest

from ckptkit.retry import RetriesExhausted, RetryPolicy


def test_a_retry_draws_nothing_from_the_trainers_random_stream():
    """The jitter of a retried request once came from the global ``random``: a store failing
    once changed the trainer's data order, and the checkpoint did not hold what it went on with."""
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "stored"

    random.seed(1234)
    before = random.getstate()
    assert RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.001).call("put", flaky) == "stored"
    assert len(calls) == 3  # two waits with jitter between the three tries
    assert random.getstate() == before


def test_the_wait_between_tries_grows_to_its_bound_with_jitter():
    policy = RetryPolicy(attempts=8, backoff_s=1.0, max_backoff_s=4.0)
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        waits = {policy.delay(attempt) for _ in range(20)}
        assert all(base / 2 <= w <= base for w in waits), (attempt, waits)
        assert len(waits) > 1  # jittered: ranks retrying together do not hit the store together


def test_a_store_that_keeps_failing_gives_up_after_the_attempts():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(RetriesExhausted):
        RetryPolicy(attempts=2, backoff_s=0, max_backoff_s=0).call("put", down)
    assert len(calls) == 2


def test_a_store_that_gave_no_answer_in_time_is_told_with_the_settings_to_raise():
    def slow():
        raise TimeoutError("read timed out")

    with pytest.raises(RetriesExhausted) as info:
        RetryPolicy(attempts=2, backoff_s=0, max_backoff_s=0).call("get", slow)
    assert "gave up after 2 attempts" in str(info.value)
    assert "no answer came in time: if the store is only slow, raise the backend's timeout_s" in str(info.value)
    with pytest.raises(RetriesExhausted) as info:
        RetryPolicy(attempts=1, backoff_s=0, max_backoff_s=0).call("get", lambda: (_ for _ in ()).throw(
            ConnectionResetError("reset by peer")))
    assert "timeout_s" not in str(info.value), "a store that answers with a reset is not slow"


def test_an_answer_whose_checksum_disagrees_is_read_again_and_an_unknown_algorithm_is_not():
    """botocore raises FlexibleChecksumError both for an answer damaged on its way (read it
    again) and for a checksum algorithm it does not know (a setting: retrying only delays it)."""
    from ckptkit.retry import is_transient

    class FlexibleChecksumError(Exception):
        pass

    assert is_transient(FlexibleChecksumError("Expected checksum T4I+NA== did not match calculated checksum: kpyFqA=="))
    assert not is_transient(FlexibleChecksumError("Unsupported checksum algorithm: md5"))

