"""The backtest's JSON report stays strict JSON when a model diverged."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from rnnserve.trainer.forecast.backtest_cli import report
from rnnserve.trainer.forecast.series import Filled


def test_a_diverged_models_scores_are_null_in_the_report() -> None:
    """inf and NaN have no JSON spelling: json.dumps would write Infinity and NaN, which
    JavaScript's and Go's readers refuse."""
    scores = {
        "gru": {16: {"mase": math.inf, "smape": math.nan, "mse": math.inf}},
        "naive": {16: {"mase": 1.0, "smape": 12.5, "mse": 4.0}},
    }
    result = SimpleNamespace(
        series=SimpleNamespace(values=[1.0] * 40, num_train=24, season=0), source="s.csv",
        representation="level", representations={"gru": "level"}, val_scores={"gru": {}},
        scores=scores, models=["gru"], train_seconds={"gru": 1.0},
    )  # fmt: skip
    text = json.dumps(report(result, {}), allow_nan=False)  # raises on a non-finite number
    back = json.loads(text)["scores"]
    assert back["gru"]["16"] == {"mase": None, "smape": None, "mse": None}
    assert back["naive"]["16"] == {"mase": 1.0, "smape": 12.5, "mse": 4.0}


def test_the_filled_cells_are_recorded_as_the_manifest_records_them() -> None:
    """The backtest said how many missing values it filled, but its report did not keep it:
    `missing_filled` has manifest.training's shape, and is absent when nothing was missing."""
    result = SimpleNamespace(
        series=SimpleNamespace(values=[1.0] * 40, num_train=24, season=0), source="s.csv:v",
        representation="level", representations={}, val_scores={}, scores={"naive": {16: {}}},
        models=[], train_seconds={},
    )  # fmt: skip
    assert "missing_filled" not in report(result, {})
    filled = Filled("s.csv", "v", interpolated=4, repeated=3)
    assert report(result, {}, filled)["missing_filled"] == {
        "column": "v", "interpolated": 4, "repeated": 3,
    }  # fmt: skip
    ends = Filled("s.csv", "v", trailing=5)
    assert report(result, {}, ends)["missing_filled"] == {
        "column": "v", "interpolated": 0, "repeated": 0, "leading": 0, "trailing": 5,
    }  # fmt: skip
