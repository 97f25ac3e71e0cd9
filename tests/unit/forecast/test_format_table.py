"""The printed MSE table of a short series, as a new user saw it (failed before its fix)."""

from __future__ import annotations

import math

from rnnserve.trainer.forecast.evaluate import format_table


def test_a_horizon_no_target_reaches_is_left_out_of_the_table() -> None:
    """A 60-value series (24 held out) printed a `k=64` column of `nan` for every predictor,
    which the manifest leaves out."""
    nan = math.nan
    table = {
        "mlp": {1: 0.5, 4: 0.4, 16: 0.3, 64: nan},
        "naive": {1: 0.06, 4: 0.8, 16: 0.4, 64: nan},
    }
    lines = format_table(table).splitlines()
    assert lines[0].split() == ["model", "k=1", "k=4", "k=16"]
    assert "nan" not in "\n".join(lines)
    table["naive"][64] = 1.0  # a horizon some predictor reaches stays
    assert format_table(table).splitlines()[0].split()[-1] == "k=64"
