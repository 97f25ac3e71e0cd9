"""Prediction intervals from residual quantiles, stored in manifest.series["intervals"].

For every horizon k = 1..K the k-step residuals x_{t+k} - x̂_{t+k} over the training range
give an empirical lower and upper quantile; the interval for step k of a forecast is
[x̂_k + lower[k-1], x̂_k + upper[k-1]] in series units (steps beyond K reuse the last entry).
Each bound is widened to 0 when the residuals all lie on one side (a model biased over the
training range), so an interval always holds its own forecast: lower <= x̂_k <= upper.
Each offset is then the running extreme over horizons 1..k (lower the running minimum, upper
the running maximum): a k-step interval is never narrower than a (k-1)-step one, since
uncertainty accumulates with the horizon, and sampling noise in the per-horizon quantiles
would otherwise make some steps narrower than the step before.
They are in-sample residuals, so they tend to be a little narrow: the coverage measured on
the test range travels with them (`test_coverage`), and docs/forecasting.md reports it.
"""

from __future__ import annotations

import numpy as np

from rnnserve.trainer.forecast.evaluate import HORIZONS, KStepResult
from rnnserve.trainer.forecast.series import Series, SeriesError

LEVELS = (0.05, 0.95)  # a central 90 % interval
MIN_RESIDUALS = 20  # fewer training residuals at a horizon: reuse the previous horizon's


def residual_quantiles(
    result: KStepResult, series: Series, levels: tuple[float, float] = LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """(lower [K], upper [K]): quantiles of the k-step residuals with training-range targets,
    lower <= 0 <= upper, each bound's magnitude non-decreasing in k (`widening`)."""
    k_max = result.predictions.shape[1]
    lower, upper = np.zeros(k_max), np.zeros(k_max)
    for k in range(1, k_max + 1):
        targets, preds = result.at_horizon(k)
        keep = targets < series.num_train
        if keep.sum() < MIN_RESIDUALS:
            if k == 1:
                raise SeriesError("too few training values to estimate prediction intervals")
            lower[k - 1], upper[k - 1] = lower[k - 2], upper[k - 2]
            continue
        residuals = series.values[targets[keep]] - preds[keep].astype(np.float64)
        low, high = np.quantile(residuals, levels)
        lower[k - 1], upper[k - 1] = min(low, 0.0), max(high, 0.0)  # hold the forecast
    return widening(lower, upper)


def widening(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets whose magnitudes never shrink with the horizon: the running minimum of `lower`
    and running maximum of `upper`. Each step's interval then contains the one before (about
    its own forecast), and since both already hold 0, every interval still holds its forecast."""
    return np.minimum.accumulate(lower), np.maximum.accumulate(upper)


def coverage(
    result: KStepResult, series: Series, lower: np.ndarray, upper: np.ndarray, horizons=HORIZONS
) -> dict[int, float]:
    """Fraction of test-range targets inside their interval, per horizon."""
    out: dict[int, float] = {}
    for k in horizons:
        targets, preds = result.at_horizon(k)
        keep = (targets >= series.num_train) & (targets < len(series.values))
        truth = series.values[targets[keep]]
        lo = preds[keep] + lower[k - 1]
        hi = preds[keep] + upper[k - 1]
        out[k] = float(np.mean((truth >= lo) & (truth <= hi))) if keep.any() else float("nan")
    return out


def manifest_intervals(result: KStepResult, series: Series) -> dict:
    """The manifest.series["intervals"] entry (all numbers in series units)."""
    lower, upper = residual_quantiles(result, series)
    return {
        "method": "empirical quantiles of k-step residuals over the training range",
        "levels": list(LEVELS),
        # six significant digits, not six decimals: a series in units of 1e-8 lost its whole
        # interval to rounding (served lower == forecast == upper)
        "lower": [float(f"{v:.6g}") for v in lower],
        "upper": [float(f"{v:.6g}") for v in upper],
        "test_coverage": {  # horizons with no held-out target are left out (JSON has no NaN)
            str(k): v for k, v in coverage(result, series, lower, upper).items() if np.isfinite(v)
        },
    }
