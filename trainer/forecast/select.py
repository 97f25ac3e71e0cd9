"""Choosing the representation on the validation tail: train on every candidate, keep the best.

detect.py proposes the candidates (the automatic choice first; levels beside differences
when the ADF test calls for differences, since it cannot tell a unit root from a level
shift). Each candidate trains the same config; the one whose early-stopping score (the mean
squared 1..16-step error on the tail, in the series' units, before the refit pass) is lowest
wins, ties going to the automatic choice. Scores in series units compare across
representations, and the tail is never the backtest's test window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from torch import nn

from rnnserve.trainer.forecast.series import Series
from rnnserve.trainer.forecast.train import ForecastTrainConfig, fit_forecaster


@dataclass
class Selected:
    """The winning model, its training losses and series, and every candidate's score."""

    model: nn.Module
    history: list[float]
    series: Series
    val_scores: dict[str, float] = field(default_factory=dict)  # {representation: score}


def train_on_best_representation(
    config: ForecastTrainConfig,
    candidates: Sequence[Series],
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Selected:
    """Trains config on every candidate series and keeps the lowest validation score."""
    if not candidates:
        raise ValueError("no candidate series")
    scores: dict[str, float] = {}
    best: Selected | None = None
    for series in candidates:
        trained = fit_forecaster(config, series, progress)
        scores[series.representation.name] = trained.val_score
        if best is None or trained.val_score < scores[best.series.representation.name]:
            best = Selected(trained.model, trained.history, series)
    best = cast(Selected, best)  # candidates is not empty
    best.val_scores = scores
    if len(candidates) > 1:
        table = ", ".join(f"{name} {score:.4g}" for name, score in scores.items())
        log(f"  {config.arch}: validation score {table} -> {best.series.representation.name}")
    return best
