"""Pure parts of the client: status -> exception mapping, exit codes, backoff schedule."""

from __future__ import annotations

import math
import random

import grpc
import pytest

from rnnserve.client import errors
from rnnserve.client.connection import channel_options
from rnnserve.client.retry import RetryPolicy


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_status_maps_to_a_class_keeping_code(code: grpc.StatusCode) -> None:
    if code is grpc.StatusCode.OK:
        return
    cls = errors.error_class(code)
    assert issubclass(cls, errors.RnnServeError)
    assert cls.code == code.name
    assert cls.exit_code == code.value[0]


def test_exit_codes_are_distinct_and_nonzero() -> None:
    codes = errors.exit_codes()
    assert len(set(codes.values())) == len(codes)
    assert 0 not in codes.values()
    assert codes["INVALID_ARGUMENT"] == 3
    assert codes["NOT_FOUND"] == 5


def test_error_keeps_details_and_formats_one_line() -> None:
    err = errors.NotFound("model 'x' not found")
    assert (err.code, err.details) == ("NOT_FOUND", "model 'x' not found")
    assert str(err) == "NOT_FOUND: model 'x' not found"
    assert isinstance(err, errors.RnnServeError)


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    caps = [policy.cap(n) for n in range(1, 7)]
    assert caps[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert caps[4:] == [1.0, 1.0]


def test_backoff_stays_at_the_cap_however_many_retries() -> None:
    """A generous budget (RetryPolicy(max_attempts=5000), a long wait behind a proxy) reaches
    retries where multiplier ** n no longer fits a float: still the cap, not OverflowError."""
    policy = RetryPolicy(max_attempts=5000, initial_backoff=0.1, max_backoff=2.0)
    assert policy.cap(1025) == policy.cap(4999) == 2.0
    assert 1.0 <= policy.backoff(4999) <= 2.0
    assert RetryPolicy(initial_backoff=0.0).cap(4999) == 0.0


def test_backoff_is_jittered_within_bounds() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=5.0, jitter_floor=0.5)
    rng = random.Random(0)
    for retry in range(1, 6):
        samples = [policy.backoff(retry, rng) for _ in range(50)]
        cap = policy.cap(retry)
        assert all(0.5 * cap <= s <= cap for s in samples)
        assert len(set(samples)) > 1  # actually jittered


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_backoff": -1}, {"multiplier": 0.5}, {"jitter_floor": 2}],
)
def test_bad_policy_is_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("initial_backoff", math.nan),
        ("initial_backoff", math.inf),
        ("max_backoff", math.nan),
        ("max_backoff", math.inf),
        ("multiplier", math.nan),
        ("multiplier", math.inf),
        ("max_attempts", math.nan),
    ],
)
def test_a_policy_that_is_not_finite_is_refused_naming_the_field(field: str, value: float) -> None:
    """NaN passes every `< 0` check and later made time.sleep fail mid-retry (or, as
    max_attempts, retried forever); an infinite pause never ends."""
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})


@pytest.mark.parametrize(
    ("policy", "first", "most"),
    [
        (RetryPolicy(), 100, 2000),
        (RetryPolicy(initial_backoff=0.5, max_backoff=30), 500, 30000),
        (RetryPolicy(initial_backoff=0, max_backoff=0), 100, 100),  # never a busy loop
        (RetryPolicy(initial_backoff=1e9, max_backoff=1e9), 2**31 - 1, 2**31 - 1),
    ],
)
def test_channels_redial_on_the_retry_schedule(policy: RetryPolicy, first: int, most: int):
    """gRPC's own redial wait (1 s, growing to 120 s) swallowed every retry of the default
    policy: the channel redials as often as the client retries."""
    options = dict(channel_options(None, retry=policy))
    assert options["grpc.initial_reconnect_backoff_ms"] == first
    assert options["grpc.max_reconnect_backoff_ms"] == most
