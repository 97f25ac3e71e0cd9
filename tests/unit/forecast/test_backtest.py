"""The backtest's checks and its ranking, without training a model for long."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnserve.trainer.forecast.backtest import BacktestResult, backtest
from rnnserve.trainer.forecast.series import SeriesError
from rnnserve.trainer.forecast.train import ForecastTrainConfig

TINY = ForecastTrainConfig(arch="mlp", tau=40, hidden=2, epochs=1, num_steps=None, seed=0)


def test_a_part_too_short_for_ar_tau_is_refused_before_any_training() -> None:
    """AR(40) needs 81 values; the 80 before the test window fit the models (tail_candidates
    asks for 49), so every model trained before the baselines' fit refused the series."""
    values = np.random.default_rng(0).normal(size=100)
    logged: list[str] = []
    with pytest.raises(SeriesError, match=r"to fit AR\(40\): least squares needs at least 81"):
        backtest(values, "noise", {"mlp": TINY}, tau=40, log=logged.append)
    assert not any("trained" in line for line in logged), logged


def test_a_series_shorter_than_the_default_test_window_is_not_blamed_on_the_flag() -> None:
    """Without --test-size the error said "--test-size must be in [1, 11] ..., got 16"."""
    values = np.arange(12.0)
    with pytest.raises(SeriesError) as caught:
        backtest(values, "tiny.csv:v", {}, log=lambda _: None)
    message = str(caught.value)
    assert "tiny.csv:v has 12 values: too few for a backtest" in message
    assert "default test window alone is 16" in message and "got 16" not in message
    with pytest.raises(SeriesError, match=r"--test-size must be in \[1, 11\] .* got 20"):
        backtest(values, "tiny.csv:v", {}, test_size=20, log=lambda _: None)


def test_a_diverged_model_is_never_the_best() -> None:
    """NaN compares false both ways, so min() kept a NaN model listed first as the best."""
    scores = {
        "gru": {16: {"mase": math.nan}},
        "mlp": {16: {"mase": 0.9}},
        "naive": {16: {"mase": 1.2}},
        "drift": {16: {"mase": math.nan}},
        "linear-ar": {16: {"mase": 0.8}},
    }
    result = BacktestResult("s", None, "level", scores, models=["gru", "mlp"])  # type: ignore[arg-type]
    assert result.best("model", 16) == "mlp"
    assert result.best("baseline", 16) == "linear-ar"


def _gappy_series() -> np.ndarray:
    """A trend with noise, 120 values; gaps just before the test window (the last 24) and
    inside it."""
    rng = np.random.default_rng(3)
    values = np.arange(120.0) * 0.5 + rng.normal(size=120)
    values[92:96] = np.nan  # the training part's last values
    values[100:103] = np.nan  # inside the window
    return values


def test_gaps_are_filled_from_the_past_only() -> None:
    """A value inside the test window cannot change what is trained on or any forecast made
    before it: interpolating the whole file filled values 92-95 from value 96 on."""
    values = _gappy_series()
    moved = values.copy()
    moved[96] += 100.0  # the first value of the test window
    runs = [backtest(v, "gappy", {}, test_size=24, log=lambda _: None) for v in (values, moved)]
    first, second = runs
    assert np.array_equal(first.series.values[:96], second.series.values[:96])
    for a, b in zip(first.results, second.results, strict=True):
        origins_before = a.origins < 96  # forecasts from origins that do not see value 96
        assert np.array_equal(a.predictions[origins_before], b.predictions[origins_before])


def test_missing_targets_are_not_scored() -> None:
    """The naive forecast's k=1 MSE counts only the targets the file holds."""
    values = _gappy_series()
    result = backtest(values, "gappy", {}, test_size=24, horizons=(1,), log=lambda _: None)
    filled = result.series.values
    observed = [t for t in range(96, 120) if not np.isnan(values[t])]
    expected = float(np.mean([(filled[t] - filled[t - 1]) ** 2 for t in observed]))
    assert math.isclose(result.scores["naive"][1]["mse"], expected, rel_tol=1e-12)
    assert np.array_equal(filled[100:103], [filled[99]] * 3)  # repeated, not interpolated
    # counted for the report's missing_filled: 4 before the window, 3 in it
    assert result.filled == (4, 3)
    whole = backtest(np.arange(120.0) + np.sin(np.arange(120.0)), "s", {}, test_size=24,
                     horizons=(1,), log=lambda _: None)  # fmt: skip
    assert whole.filled == (0, 0)
