"""Baselines: last value, and AR(tau) fitted by least squares."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.trainer.forecast.baselines import LastValue, LinearAR
from rnnserve.trainer.forecast.series import SeriesError


def ar2_series(n: int = 300) -> np.ndarray:
    """A noiseless AR(2) with known coefficients: x_t = 0.5 + 1.2 x_{t-1} - 0.5 x_{t-2}."""
    x = np.zeros(n)
    x[0], x[1] = 1.0, -0.5
    for t in range(2, n):
        x[t] = 0.5 + 1.2 * x[t - 1] - 0.5 * x[t - 2]
    return x


def test_last_value_repeats_the_origin() -> None:
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0], dtype=np.float32)
    out = LastValue().k_step(values, np.array([1, 3]), 3)
    assert out.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    out = LastValue().k_step(values, np.array([2]), 2)
    assert out.tolist() == [[4.0, 4.0]]


def test_linear_ar_recovers_known_coefficients() -> None:
    ar = LinearAR.fit(ar2_series(), tau=2)
    # weights[j] multiplies x_{t - tau + 1 + j}: [x_{t-1}, x_t]
    assert np.allclose(ar.weights, [-0.5, 1.2], atol=1e-6)
    assert ar.bias == pytest.approx(0.5, abs=1e-6)


def test_linear_ar_k_step_is_the_recursion() -> None:
    x = ar2_series()
    ar = LinearAR.fit(x, tau=2)
    origins = np.array([5, 40, 100])
    out = ar.k_step(x, origins, 10)
    # the model is exact, so recursive predictions equal the series itself
    for i, t in enumerate(origins):
        assert np.allclose(out[i], x[t + 1 : t + 11], atol=1e-3)


def test_linear_ar_refuses_too_little_data_and_early_origins() -> None:
    with pytest.raises(SeriesError, match="too few"):
        LinearAR.fit(np.arange(5.0), tau=4)
    ar = LinearAR.fit(ar2_series(), tau=3)
    with pytest.raises(SeriesError, match="needs 3 values"):
        ar.k_step(ar2_series(), np.array([0, 5]), 2)


def test_seasonal_naive_repeats_the_last_season() -> None:
    from rnnserve.trainer.forecast.baselines import SeasonalNaive

    values = np.arange(10.0)
    out = SeasonalNaive(4).k_step(values, np.array([7]), 9)
    # x̂_{8..16} = x_{4..7} twice, then x_4 again
    assert out.tolist() == [[4, 5, 6, 7, 4, 5, 6, 7, 4]]


def test_drift_extends_the_line_through_the_first_and_last_value() -> None:
    from rnnserve.trainer.forecast.baselines import Drift

    values = np.array([1.0, 5.0, 2.0, 7.0])
    out = Drift().k_step(values, np.array([3]), 3)
    assert np.allclose(out, [[9.0, 11.0, 13.0]])  # slope (7 - 1) / 3


def test_all_baselines_add_seasonal_naive_only_with_a_season() -> None:
    from rnnserve.trainer.forecast.baselines import all_baselines

    x = ar2_series()
    assert [b.name for b in all_baselines(x, 4, 0)] == ["naive", "drift", "linear-ar"]
    names = [b.name for b in all_baselines(x, 4, 12)]
    assert names == ["naive", "seasonal-naive", "drift", "linear-ar"]
