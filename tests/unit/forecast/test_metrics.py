"""MASE and sMAPE as the M4 competition defines them."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.trainer.forecast.metrics import errors, mase_scale
from rnnserve.trainer.forecast.series import SeriesError


def test_mase_scale_is_the_in_sample_seasonal_naive_mae() -> None:
    train = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    assert mase_scale(train, 0) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mase_scale(train, 2) == pytest.approx((3 + 5 + 7) / 3)
    with pytest.raises(SeriesError, match="undefined"):
        mase_scale(np.ones(6), 0)


def test_errors_by_hand() -> None:
    got = errors(np.array([10.0, 20.0]), np.array([12.0, 20.0]), scale=4.0)
    assert got["mse"] == pytest.approx(2.0)
    assert got["mase"] == pytest.approx(1.0 / 4.0)
    assert got["smape"] == pytest.approx(200.0 * (2 / 22 + 0) / 2)
    assert errors(np.zeros(2), np.zeros(2), 1.0)["smape"] == 0.0  # 0/0 counts as no error
