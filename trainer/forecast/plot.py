"""The textbook pictures as PNG: a series with its k-step predictions, and MSE bars.

matplotlib runs headless (Agg) and is imported only here, so the rest of the package and
its tests do not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.evaluate import KStepResult
from rnnserve.trainer.forecast.series import Series
from rnnserve.trainer.plot_path import plot_format, pyplot


def draw_k_step(ax, series: Series, result: KStepResult, horizons=(1, 4, 16, 64), title=""):
    """The series, with the k-step predictions x̂_{t+k} drawn at time t + k, for each k."""
    time = np.arange(1, len(series.values) + 1)  # the textbook counts t from 1
    ax.plot(time, series.values, color="0.6", lw=0.8, label="data")
    for k in horizons:
        if k > result.predictions.shape[1]:
            continue
        targets, preds = result.at_horizon(k)
        keep = targets < len(series.values)
        ax.plot(time[targets[keep]], preds[keep], lw=1.2, label=f"{k}-step preds")
    ax.axvline(series.num_train + 0.5, color="k", ls=":", lw=0.8)
    ax.set_xlabel("time")
    ax.set_ylabel("x")
    ax.set_title(title or f"{result.name}: k-step predictions (train | test)")
    ax.legend(loc="best", fontsize=8)  # lower left hid the start of a rising series


def draw_mse_bars(ax, table: dict[str, dict[int, float]], horizons=(1, 4, 16, 64), title=""):
    """Grouped bars: test MSE of every predictor at every horizon (log scale)."""
    names = list(table)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(horizons))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [table[name][k] for k in horizons], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [f"k={k}" for k in horizons])
    ax.set_yscale("log")
    ax.set_ylabel("test MSE")
    ax.set_title(title or "k-step prediction error on the test range")
    ax.legend(fontsize=8)


def plot_k_step(series: Series, result: KStepResult, path: Path, title: str = "") -> Path:
    """PNG of `draw_k_step` (the textbook's figure)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    draw_k_step(ax, series, result, title=title)
    return _save(fig, plt, path)


def plot_report(
    series: Series, result: KStepResult, table: dict[str, dict[int, float]], path: Path
) -> Path:
    """Two panels: the textbook figure for one model, and the MSE bars of all predictors."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    draw_k_step(left, series, result)
    draw_mse_bars(right, table)
    return _save(fig, plt, path)


def plot_backtest(result, path: Path, k: int = 16, context: int | None = None) -> Path:
    """Two panels for one backtest (backtest.BacktestResult): the test window with the
    k-step forecasts of the best model and the best baseline, and MASE bars by horizon."""
    plt = pyplot()
    series = result.series
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    start = max(0, series.num_train - (context or 2 * (len(series.values) - series.num_train)))
    time = np.arange(len(series.values))
    left.plot(time[start:], series.values[start:], color="0.5", lw=0.9, label="data")
    by_name = {r.name: r for r in result.results}
    for name in (result.best("model", k), result.best("baseline", k)):
        targets, preds = by_name[name].at_horizon(k)
        keep = (targets >= series.num_train) & (targets < len(series.values))
        mase = result.scores[name][k]["mase"]
        left.plot(time[targets[keep]], preds[keep], lw=1.2, label=f"{name} (MASE {mase:.2f})")
    left.axvline(series.num_train - 0.5, color="k", ls=":", lw=0.8)
    left.set_title(f"{result.source}: {k}-step forecasts over the test window")
    left.set_xlabel("time index")
    left.legend(fontsize=8)
    horizons = sorted(next(iter(result.scores.values())))
    table = {n: {h: row[h]["mase"] for h in horizons} for n, row in result.scores.items()}
    learned = sorted(set(result.representations.values())) or [result.representation]
    draw_mse_bars(right, table, horizons, title=f"MASE (models on {' / '.join(learned)})")
    right.set_ylabel("MASE (test window)")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    try:
        fmt = plot_format(path, "cannot write plot")  # as named: matplotlib adds .png to none
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format=fmt)
    except OSError as exc:
        raise TrainerError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
