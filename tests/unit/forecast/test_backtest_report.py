"""The backtest's JSON report stays strict JSON when a model diverged."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from rnnserve.trainer.forecast.backtest_cli import report


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
