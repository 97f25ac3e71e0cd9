"""One-step and k-step recursive prediction over the test range, and the MSE table.

As in the textbook, the k-step prediction of x_{t+k} is made at t from the true values up to
t: the model warms up on x_1..x_t, predicts x̂_{t+1}, is fed x̂_{t+1} to predict x̂_{t+2}, and
so on k times. Every predictor is scored on the same targets: the test range x_i,
i >= num_train, each predicted from origin t = i - k. Errors are in the series' own units
(representation and normalisation undone), so models and baselines compare directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from rnnserve.trainer.forecast.baselines import LastValue, SeasonalNaive
from rnnserve.trainer.forecast.metrics import METRICS, errors, mase_scale
from rnnserve.trainer.forecast.series import Series

HORIZONS = (1, 4, 16, 64)


class KStepPredictor(Protocol):
    name: str
    tau: int

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray: ...


class TorchForecaster:
    """Adapts an exportable forecast model (state interface) to `k_step` in the model's own
    space (the normalised representation); LevelForecaster wraps it in series units."""

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        self.model = model
        self.name = name or str(model.arch)
        self.tau = int(getattr(model, "tau", 1)) if model.arch == "mlp" else 1

    @torch.no_grad()
    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        model = self.model
        was_training = model.training
        model.eval()
        axes = [spec.batch_axis for spec in model.state_specs()]
        device = next(model.parameters()).device
        state = [s.to(device) for s in model.initial_state(1)]
        wanted = {int(t): i for i, t in enumerate(origins)}
        first = [torch.empty(0)] * len(origins)  # x̂_{t+1} per origin, [1, 1, 1]
        saved: list[tuple[torch.Tensor, ...]] = [()] * len(origins)
        series = torch.as_tensor(values, dtype=torch.float32, device=device)
        start = int(origins.min())
        if start > 0:  # before the first origin: one call over the whole prefix
            _, *state = model(series[:start].view(1, -1, 1), *state)
        for t in range(start, int(origins.max()) + 1):  # then one true value at a time
            out, *state = model(series[t].view(1, 1, 1), *state)
            if t in wanted:
                first[wanted[t]] = out
                saved[wanted[t]] = tuple(state)
        pred = torch.cat(first, dim=0)  # [n, 1, 1]
        state = [torch.cat([s[j] for s in saved], dim=ax) for j, ax in enumerate(axes)]
        columns = [pred[:, 0, 0]]
        for _ in range(k_max - 1):  # feed predictions back, all origins as one batch
            pred, *state = model(pred, *state)
            columns.append(pred[:, 0, 0])
        model.train(was_training)
        return torch.stack(columns, dim=1).cpu().numpy()  # [n, k_max]


class LevelForecaster:
    """A model in the series' own units: levels -> representation -> normalise -> the model's
    k_step -> undo both. Its `tau` is the shortest history it needs (window + differencing)."""

    def __init__(self, inner: TorchForecaster, series: Series) -> None:
        self.inner = inner
        self.name = inner.name
        self.representation = series.representation
        self.normaliser = series.normaliser
        self.tau = inner.tau + self.representation.lost

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        rep = self.representation
        z = self.normaliser.apply(rep.apply(values))
        z[: rep.lost] = 0.0
        steps = self.normaliser.undo(self.inner.k_step(z, origins, k_max))
        return rep.undo(values, origins, steps)


@dataclass
class KStepResult:
    """Predictions x̂_{t+k} (raw units) for origins t and horizons k = 1..k_max."""

    name: str
    origins: np.ndarray  # int [n]
    predictions: np.ndarray  # float64 [n, k_max]; [i, k-1] predicts x_{origins[i] + k}

    def at_horizon(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(target indices t + k, predictions) for horizon k."""
        return self.origins + k, self.predictions[:, k - 1]


def predict(
    predictor: KStepPredictor, series: Series, k_max: int, first_origin: int
) -> KStepResult:
    """k-step predictions (series units) from every origin first_origin..T-2."""
    origins = np.arange(first_origin, len(series.values) - 1)
    preds = predictor.k_step(series.values.astype(np.float64), origins, k_max)
    return KStepResult(predictor.name, origins, np.asarray(preds, dtype=np.float64))


def held_out_errors(
    result: KStepResult, series: Series, horizons=HORIZONS, unobserved: np.ndarray | None = None
) -> dict[int, dict[str, float]]:
    """{k: {mase, smape, mse}} over the held-out targets x_i (num_train <= i < T), less
    those `unobserved` marks (bool [T]: cells the file left empty, filled only as history)."""
    scale = mase_scale(series.values[: series.num_train], series.season)
    table: dict[int, dict[str, float]] = {}
    for k in horizons:
        targets, preds = result.at_horizon(k)
        keep = (targets >= series.num_train) & (targets < len(series.values))
        if unobserved is not None:
            keep &= ~unobserved[np.minimum(targets, len(unobserved) - 1)]
        if not keep.any():
            table[k] = {m: float("nan") for m in METRICS}
            continue
        table[k] = errors(series.values[targets[keep]], preds[keep], scale)
    return table


def mse_by_horizon(result: KStepResult, series: Series, horizons=HORIZONS) -> dict[int, float]:
    """MSE over the held-out targets x_i (i >= num_train, i < T) for each horizon k."""
    return {k: row["mse"] for k, row in held_out_errors(result, series, horizons).items()}


def evaluate_all(
    predictors: list[KStepPredictor], series: Series, horizons=HORIZONS
) -> tuple[dict[str, dict[int, float]], list[KStepResult]]:
    """The MSE table {name: {k: mse}} and the raw predictions, on shared origins."""
    k_max = max(horizons)
    first = max(max(p.tau for p in predictors) - 1, series.num_train - k_max, 0)
    results = [predict(p, series, k_max, first) for p in predictors]
    return {r.name: mse_by_horizon(r, series, horizons) for r in results}, results


def format_table(table: dict[str, dict[int, float]], horizons=HORIZONS) -> str:
    """A fixed-width text table, one row per predictor; a horizon with no held-out target
    (NaN in every row: a short test range has none at k = 64) is left out, as the manifest
    leaves it out, rather than printed as a column of nan."""
    horizons = [k for k in horizons if any(np.isfinite(row[k]) for row in table.values())]
    width = max(12, *(len(n) + 2 for n in table))
    lines = ["model".ljust(width) + "".join(f"k={k}".rjust(10) for k in horizons)]
    for name, row in table.items():
        lines.append(name.ljust(width) + "".join(f"{row[k]:10.4g}" for k in horizons))
    return "\n".join(lines)


def metrics_for_manifest(row: dict[int, float], prefix: str = "mse") -> dict[str, float]:
    """{mse_k1, mse_k4, ...} for manifest.metrics, leaving out a horizon with no held-out
    target (NaN): JSON has no NaN, and strict readers (JavaScript) refuse the manifest."""
    return {f"{prefix}_k{k}": float(v) for k, v in row.items() if np.isfinite(v)}


# the trivial forecasts a learned model must beat to be worth serving (baselines.py's names)
NAIVE_NAMES = (LastValue.name, SeasonalNaive.name)


@dataclass
class VersusNaive:
    """The model's held-out MSE beside naive's (and seasonal naive's, with a season) at every
    horizon of the table: a model worse than repeating the last value at every horizon used
    to be exported without a word (untuned infl and tbilrate in the README)."""

    model: str
    table: dict[str, dict[int, float]]  # {the model and each naive baseline: {k: mse}}

    def scored(self, baseline: str) -> list[int]:
        """The horizons where both have a score (NaN: no held-out target at that k)."""
        mine, theirs = self.table[self.model], self.table[baseline]
        return [k for k in mine if not (math.isnan(mine[k]) or math.isnan(theirs[k]))]

    @property
    def worse_than(self) -> list[str]:
        """The naive baselines whose MSE is below the model's at every scored horizon."""
        mine = self.table[self.model]
        return [
            name for name in self.table if name != self.model and self.scored(name)
            and all(mine[k] > self.table[name][k] for k in self.scored(name))
        ]  # fmt: skip

    def to_manifest(self) -> dict[str, object]:
        """manifest.training.validation_vs_naive: {model, naive[, seasonal-naive]: {mse_k1,
        ...}, worse_than: [the baselines it loses to at every horizon]}."""
        entry: dict[str, object] = {
            "model" if name == self.model else name: metrics_for_manifest(row)
            for name, row in self.table.items()
        }
        entry["worse_than"] = self.worse_than
        return entry

    def note(self, held: int, command: str) -> str | None:
        """One `note:` line when the model loses to a naive forecast at every horizon (None
        otherwise); `held`: the tail's length, `command`: the backtest to run instead."""
        losers = self.worse_than
        if not losers:
            return None
        mine = self.table[self.model]
        horizons = [k for k in mine if all(k in self.scored(name) for name in losers)]
        numbers = "; ".join(
            f"k={k}: {mine[k]:.4g} vs " + ", ".join(f"{n} {self.table[n][k]:.4g}" for n in losers)
            for k in horizons
        )
        what = " and ".join(
            "naive (the last value repeated)" if n == LastValue.name
            else f"{n} (the value one season back)" for n in losers
        )  # fmt: skip
        return (
            f"note: on the validation tail ({held} values) the {self.model} forecasts worse "
            f"than {what} at every horizon: MSE {numbers}; compare it with the baselines out "
            f"of sample before serving it: {command}"
        )


def versus_naive(table: dict[str, dict[int, float]], model: str) -> VersusNaive:
    """The model's row of evaluate_all's table beside the naive baselines' rows in it."""
    rows = {model: table[model], **{n: table[n] for n in NAIVE_NAMES if n in table}}
    return VersusNaive(model, rows)
