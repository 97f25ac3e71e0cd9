"""The training curve (run dir curve.png)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # plot_history loads it itself, at its first plot
import pytest

from rnnserve.trainer import plot


@pytest.mark.parametrize("epochs", [1, 3])
def test_the_curve_marks_whole_epochs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: int
) -> None:
    """One epoch was drawn on an axis of 0.96, 0.98, ..., 1.04; three at 1.0, 1.25, ..."""
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    history = [{"epoch": e, "train_ppl": 20.0 - e, "val_ppl": 18.0 - e, "uniform_ppl": 31.0}
               for e in range(1, epochs + 1)]  # fmt: skip
    assert plot.plot_history(history, tmp_path / "curve.png").is_file()
    (ax,) = figures[0].axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.parametrize(("low", "high"), [(25.1, 30.7), (3.2, 180.0)])
def test_the_perplexity_axis_reads_plain_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, low: float, high: float
) -> None:
    """A run between 25 and 31 had its axis labelled 2.5×10¹ ... 3.1×10¹ (log axis defaults)."""
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    history = [{"epoch": 1, "train_ppl": high, "val_ppl": high, "uniform_ppl": high},
               {"epoch": 2, "train_ppl": low, "val_ppl": low, "uniform_ppl": high}]  # fmt: skip
    plot.plot_history(history, tmp_path / "curve.png")
    (ax,) = figures[0].axes
    labels = [t.get_text() for minor in (False, True) for t in ax.get_yticklabels(minor=minor)]
    shown = [label for label in labels if label]
    assert shown, labels
    assert all(label.replace(".", "").isdigit() for label in shown), shown
