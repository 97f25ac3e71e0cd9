"""Residual-quantile prediction intervals: quantiles from training targets, test coverage."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.trainer.forecast.evaluate import KStepResult
from rnnserve.trainer.forecast.intervals import coverage, manifest_intervals, residual_quantiles
from rnnserve.trainer.forecast.series import SeriesError, split_series, textbook_series


def shifted_truth(series, k_max: int, noise_scale: float, seed: int = 0) -> KStepResult:
    """Predictions = truth + uniform noise growing with k, so quantiles are known."""
    rng = np.random.default_rng(seed)
    origins = np.arange(0, len(series.values) - 1)
    idx = np.minimum(origins[:, None] + np.arange(1, k_max + 1)[None, :], len(series.values) - 1)
    scale = noise_scale * np.arange(1, k_max + 1)[None, :]  # [1, k_max]
    preds = series.values[idx] + rng.uniform(-1, 1, size=idx.shape) * scale
    return KStepResult("fake", origins, preds.astype(np.float32))


def test_quantiles_follow_the_residual_spread() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    result = shifted_truth(series, 8, noise_scale=0.1)
    lower, upper = residual_quantiles(result, series)
    # residual = truth - pred ~ U(-0.1k, 0.1k): 5 % / 95 % quantiles are -/+ 0.09k
    k = np.arange(1, 9)
    assert np.allclose(upper, 0.09 * k, atol=0.02 * k)
    assert np.allclose(lower, -0.09 * k, atol=0.02 * k)
    cover = coverage(result, series, lower, upper, horizons=(1, 8))
    assert all(0.8 <= v <= 0.97 for v in cover.values())


def test_coverage_counts_only_test_targets() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    result = shifted_truth(series, 2, noise_scale=0.0)
    result.predictions[result.origins + 1 >= series.num_train] += 5.0  # test targets missed
    lower, upper = residual_quantiles(result, series)
    assert np.allclose(lower, 0.0, atol=1e-6) and np.allclose(upper, 0.0, atol=1e-6)
    assert coverage(result, series, lower, upper, horizons=(1,))[1] == 0.0


def test_manifest_entry_and_too_little_data() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    entry = manifest_intervals(shifted_truth(series, 64, 0.01), series)
    assert entry["levels"] == [0.05, 0.95]
    assert len(entry["lower"]) == len(entry["upper"]) == 64
    assert set(entry["test_coverage"]) == {"1", "4", "16", "64"}
    short = split_series(textbook_series()[:40], 4, "short")
    with pytest.raises(SeriesError, match="too few"):
        late = KStepResult("late", np.arange(20, 39), np.zeros((19, 4), dtype=np.float32))
        residual_quantiles(late, short)


def test_an_interval_always_holds_its_forecast() -> None:
    # a model that predicts 0.3 too low everywhere: every residual is in (0.2, 0.4), and the
    # raw 5 % quantile (about 0.21) would put the whole interval above the forecast
    series = split_series(textbook_series(), 4, "textbook")
    result = shifted_truth(series, 4, noise_scale=0.0)
    rng = np.random.default_rng(0)
    result.predictions[:] -= 0.3 + rng.uniform(-0.1, 0.1, size=result.predictions.shape)
    lower, upper = residual_quantiles(result, series)
    assert np.all(lower == 0.0) and np.all(upper > 0.35)
    flipped = KStepResult("high", result.origins, result.predictions + 0.6)
    lower, upper = residual_quantiles(flipped, series)
    assert np.all(lower < -0.35) and np.all(upper == 0.0)


def test_horizons_without_held_out_targets_are_left_out_not_nan() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    result = shifted_truth(series, 64, 0.01)
    early = KStepResult("early", result.origins[:590], result.predictions[:590])
    entry = manifest_intervals(early, series)  # origins < 590 reach no test target at k <= 4
    assert set(entry["test_coverage"]) == {"16", "64"}
    assert all(np.isfinite(v) for v in entry["test_coverage"].values())


def test_widths_never_shrink_with_the_horizon() -> None:
    # residual spread 0.4, 0.1, 0.3, 0.05 at k = 1..4 (a seasonal model can be surer of step 4
    # than of step 1 in sample): the raw quantiles would give step 2 and 4 narrower bands
    series = split_series(textbook_series(), 4, "textbook")
    result = shifted_truth(series, 4, noise_scale=0.0)
    rng = np.random.default_rng(0)
    spread = np.array([0.4, 0.1, 0.3, 0.05])
    result.predictions[:] += rng.uniform(-1, 1, size=result.predictions.shape) * spread
    lower, upper = residual_quantiles(result, series)
    assert np.all(np.diff(lower) <= 0) and np.all(np.diff(upper) >= 0)
    assert np.all(np.diff(upper - lower) >= 0)
    assert np.allclose(lower, lower[0]) and np.allclose(upper, upper[0])  # step 1 is widest
    assert lower[0] < -0.3 and upper[0] > 0.3
    cover = coverage(result, series, lower, upper, horizons=(1, 2, 3, 4))
    assert cover[1] < 0.97 and all(cover[k] == 1.0 for k in (2, 4))  # wider than needed there


def test_a_series_in_small_units_keeps_its_interval_in_the_manifest() -> None:
    """The offsets were rounded to 6 decimals: a series in units of 1e-8 served a forecast
    with lower == forecast == upper while the trainer reported 0.93 coverage."""
    series = split_series(textbook_series().astype(np.float64) * 1e-8, 4, "tiny")
    result = shifted_truth(series, 64, noise_scale=1e-10)
    lower, upper = residual_quantiles(result, series)
    entry = manifest_intervals(result, series)
    assert all(u > 0 for u in entry["upper"]) and all(v < 0 for v in entry["lower"])
    assert entry["upper"] == pytest.approx(list(upper), rel=1e-5)
    assert entry["lower"] == pytest.approx(list(lower), rel=1e-5)
