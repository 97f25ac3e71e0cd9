"""Rolling-origin backtest: every model and every baseline on the same held-out window.

The last `test_size` values are the test window; nothing in it is seen by training. Each
model trains on the values before it (their own last `val_size` values validate, for early
stopping), baselines are fitted on the same values, then every origin t from the end of the
training part to the end of the series forecasts up to 16 steps from the true history
x_1..x_t alone (the model is not refitted). When several representations are candidates
(select.py), each model trains on each and keeps the one its validation tail prefers.
The k-step errors whose targets lie in the test window give MASE, sMAPE and MSE at
k = 1, 4, 16 (metrics.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnserve.trainer.forecast.baselines import all_baselines
from rnnserve.trainer.forecast.evaluate import (
    KStepResult,
    LevelForecaster,
    TorchForecaster,
    held_out_errors,
    predict,
)
from rnnserve.trainer.forecast.select import train_on_best_representation
from rnnserve.trainer.forecast.series import (
    Series,
    SeriesError,
    fill_without_look_ahead,
    tail_candidates,
)
from rnnserve.trainer.forecast.train import ForecastTrainConfig

BACKTEST_HORIZONS = (1, 4, 16)
TEST_FRACTION = 0.2
MIN_TEST = 16


def default_test_size(length: int) -> int:
    """20 % of the series, at least 16 values."""
    return max(MIN_TEST, round(length * TEST_FRACTION))


@dataclass
class BacktestResult:
    """Scores {predictor: {k: {mase, smape, mse}}} and the predictions behind them."""

    source: str
    series: Series  # num_train = start of the test window
    representation: str
    scores: dict[str, dict[int, dict[str, float]]]
    results: list[KStepResult] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # names of the learned predictors
    train_seconds: dict[str, float] = field(default_factory=dict)
    representations: dict[str, str] = field(default_factory=dict)  # {model: what it learned}
    val_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # {model: {rep: s}}
    # the file's gaps filled (fill_without_look_ahead): (interpolated before the test window,
    # repeated in it), as Filled counts them for the report's `missing_filled`
    filled: tuple[int, int] = (0, 0)

    def best(self, kind: str, k: int, metric: str = "mase") -> str:
        """Name of the best model ("model") or baseline ("baseline") at horizon k."""
        names = [n for n in self.scores if (n in self.models) == (kind == "model")]
        # NaN (a diverged model) compares false both ways: min() would keep it when first
        return min(names, key=lambda n: _worst_if_nan(self.scores[n][k][metric]))


def _worst_if_nan(score: float) -> float:
    return math.inf if math.isnan(score) else score


def backtest(
    values: np.ndarray,
    source: str,
    configs: dict[str, ForecastTrainConfig],
    *,
    tau: int = 8,
    test_size: int | None = None,
    val_size: int | None = None,
    transform: str = "auto",
    season: int | None = None,
    horizons: tuple[int, ...] = BACKTEST_HORIZONS,
    log: Callable[[str], None] = print,
) -> BacktestResult:
    """Trains every config (keyed by display name) and scores it beside the baselines."""
    n = len(values)
    test = default_test_size(n) if test_size is None else test_size
    if test_size is None and test >= n:  # not the user's --test-size: say what is missing
        raise SeriesError(
            f"series {source} has {n} values: too few for a backtest, whose default test "
            f"window alone is {test} (20 %, at least {MIN_TEST}; --test-size sets it)"
        )
    if not 1 <= test < n:
        raise SeriesError(f"--test-size must be in [1, {n - 1}] for {n} values, got {test}")
    unobserved = np.isnan(values)  # gaps the file left (load_csv(keep_gaps=True))
    if unobserved.any():
        values = fill_without_look_ahead(values, n - test, source)
        log(f"{source}: {int(unobserved.sum())} missing values filled from the past only; "
            f"{int(unobserved[n - test:].sum())} in the test window are not scored")  # fmt: skip
    # the label says which values "has N values" counts: the part before the test window
    label = f"{source} (before the test window of {test})"
    candidates = tail_candidates(values[: n - test], tau, label, val_size, transform, season)
    fit = candidates[0]
    # the evaluation view: the test window held out (each model carries its own
    # representation and normaliser; the season, hence the MASE scale, is shared)
    series = Series(values, n - test, fit.normaliser, source, fit.representation, "test")
    names = " or ".join(c.representation.name for c in candidates)
    log(f"{source}: {n} values, test window {test}, representation {names}")
    # before training: a part too short for AR(tau) must not cost every model's training run
    baselines = all_baselines(values[: n - test], tau, fit.season)
    predictors: list = []
    seconds: dict[str, float] = {}
    chosen: dict[str, str] = {}
    val_scores: dict[str, dict[str, float]] = {}
    for name, config in configs.items():
        started = time.monotonic()
        picked = train_on_best_representation(config, candidates, log=log)
        seconds[name] = round(time.monotonic() - started, 1)
        chosen[name] = picked.series.representation.name
        val_scores[name] = picked.val_scores
        predictors.append(LevelForecaster(TorchForecaster(picked.model, name=name), picked.series))
        log(f"  trained {name} in {seconds[name]} s")
    k_max = max(horizons)
    everyone = [*predictors, *baselines]
    first = max(max(p.tau for p in everyone) - 1, series.num_train - k_max, 0)
    results = [predict(p, series, k_max, first) for p in everyone]
    scores = {r.name: held_out_errors(r, series, horizons, unobserved) for r in results}
    filled = (int(unobserved[: n - test].sum()), int(unobserved[n - test :].sum()))
    return BacktestResult(
        source, series, fit.representation.name, scores, results, list(configs), seconds,
        chosen, val_scores, filled,
    )  # fmt: skip


def format_scores(result: BacktestResult, horizons=BACKTEST_HORIZONS) -> str:
    """Markdown: one row per predictor, MASE / sMAPE / MSE at every horizon."""
    head = "| model | " + " | ".join(f"MASE@{k} | sMAPE@{k} | MSE@{k}" for k in horizons) + " |"
    lines = [head, "|---|" + "---:|" * (3 * len(horizons))]
    for name, row in result.scores.items():
        cells = []
        for k in horizons:
            cells += [f"{row[k]['mase']:.3f}", f"{row[k]['smape']:.2f}", f"{row[k]['mse']:.4g}"]
        label = name if name in result.models else f"{name} (baseline)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
