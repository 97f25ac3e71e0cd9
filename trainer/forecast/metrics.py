"""Forecast errors per lead time k: MSE, MASE and sMAPE (the M4 competition's measures).

M4 (Makridakis et al., 2020) defines, for a forecast ŷ of y over lead times 1..h,
    sMAPE = 200 / h * sum |y - ŷ| / (|y| + |ŷ|)
    MASE  = (1/h sum |y - ŷ|) / (1 / (n - m) sum_{t=m+1..n} |y_t - y_{t-m}|)
with the denominator the in-sample mean absolute error of the seasonal naive forecast over
the n training values (m = 1 without a season). Here each lead time k is reported on its
own (the errors of the k-th step, pooled over the rolling origins), so "MASE at k = 16" is
the 16-step-ahead error against the same scale; MSE is in the series' units squared.
"""

from __future__ import annotations

import math

import numpy as np

from rnnserve.trainer.forecast.series import SeriesError

METRICS = ("mase", "smape", "mse")


def mase_scale(train: np.ndarray, season: int) -> float:
    """In-sample MAE of the seasonal naive forecast (naive when season < 2)."""
    x = np.asarray(train, dtype=np.float64)
    m = season if season >= 2 else 1
    if len(x) <= m:
        raise SeriesError(f"MASE needs more than {m} training values, got {len(x)}")
    scale = float(np.mean(np.abs(x[m:] - x[:-m])))
    if scale == 0:
        raise SeriesError("MASE is undefined: the training range repeats itself exactly")
    return scale


def errors(truth: np.ndarray, pred: np.ndarray, scale: float) -> dict[str, float]:
    """{mase, smape, mse} of predictions `pred` for targets `truth` (same shape)."""
    y = np.asarray(truth, dtype=np.float64)
    f = np.asarray(pred, dtype=np.float64)
    diff = np.abs(y - f)
    denom = np.abs(y) + np.abs(f)
    ratio = np.divide(diff, denom, out=np.zeros_like(diff), where=denom > 0)
    return {
        "mase": float(np.mean(diff) / scale),
        "smape": float(200.0 * np.mean(ratio)),
        "mse": float(np.mean(diff**2)),
    }


def finite_scores(scores: dict[str, float]) -> dict[str, float]:
    """The scores JSON can hold: a run without a validation tail scores inf (no score), and
    `Infinity` in a manifest or report makes strict readers (JavaScript, Go) refuse the file."""
    return {name: score for name, score in scores.items() if math.isfinite(score)}
