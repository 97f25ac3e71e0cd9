"""The textbook pictures as PNG: a series with its k-step predictions, and an MSE bar chart.

matplotlib runs headless (Agg) and is imported only here, so the rest of the package and
its tests do not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.errors import TrainerError
from trainer.forecast.evaluate import KStepResult
from trainer.forecast.series import Series


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise TrainerError("plotting needs matplotlib: pip install 'rnnserve[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_k_step(
    series: Series, result: KStepResult, path: Path, horizons=(1, 4, 16, 64), title: str = ""
) -> Path:
    """The series, with the k-step predictions x̂_{t+k} drawn at time t + k, for each k."""
    plt = _pyplot()
    time = np.arange(1, len(series.values) + 1)  # the textbook counts t from 1
    fig, ax = plt.subplots(figsize=(8, 4))
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
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, plt, path)


def plot_mse_bars(
    table: dict[str, dict[int, float]], path: Path, horizons=(1, 4, 16, 64), title: str = ""
) -> Path:
    """Grouped bars: test MSE of every predictor at every horizon (log scale)."""
    plt = _pyplot()
    names = list(table)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(horizons))
    for i, name in enumerate(names):
        ax.bar(x + i * width, [table[name][k] for k in horizons], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, [f"k={k}" for k in horizons])
    ax.set_yscale("log")
    ax.set_ylabel("test MSE")
    ax.set_title(title or "k-step prediction error on the test range")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise TrainerError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
