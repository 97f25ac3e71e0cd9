"""One forecasting run end to end: train -> evaluate beside baselines -> intervals -> export.

Why separate from cli.py: the CLI, the zoo and the benchmark call the same function with a
dataclass; argparse stays in cli.py. Nothing is written until the model is trained and its
export check passed (export_model is atomic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from rnnserve.trainer.export import export_model
from rnnserve.trainer.forecast.baselines import all_baselines
from rnnserve.trainer.forecast.evaluate import (
    HORIZONS,
    KStepResult,
    LevelForecaster,
    TorchForecaster,
    VersusNaive,
    evaluate_all,
    format_table,
    held_out_errors,
    metrics_for_manifest,
    predict,
    versus_naive,
)
from rnnserve.trainer.forecast.intervals import manifest_intervals
from rnnserve.trainer.forecast.metrics import finite_scores
from rnnserve.trainer.forecast.models import min_history
from rnnserve.trainer.forecast.select import train_on_best_representation
from rnnserve.trainer.forecast.series import Series, SeriesError
from rnnserve.trainer.forecast.train import ForecastTrainConfig


@dataclass
class ForecastRun:
    """What one run produced: the model, its MSE table (with baselines) and where it went."""

    model: nn.Module
    table: dict[str, dict[int, float]]  # {predictor name: {k: test MSE}}
    results: list[KStepResult] = field(default_factory=list)
    path: Path | None = None  # the package directory, when exported
    plot: Path | None = None
    history: list[float] = field(default_factory=list)
    # the model beside naive on the validation tail (None for the textbook split's test)
    versus_naive: VersusNaive | None = None


def baselines(series: Series, tau: int) -> list:
    """Naive, seasonal naive (with a season), drift and AR(tau) fitted on the training range."""
    return all_baselines(series.values[: series.num_train], tau, series.season)


def series_digest(series: Series) -> str:
    return hashlib.sha256(series.values.tobytes()).hexdigest()


def run_forecast(
    config: ForecastTrainConfig,
    series: Series,
    *,
    out: Path | None,
    name: str,
    version: str = "1",
    plot_path: Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    alternatives: Sequence[Series] = (),
) -> ForecastRun:
    """Trains config.arch, scores it and the baselines at k = 1, 4, 16, 64, exports to
    out/<name>/<version>/ (when `out` is given) with metrics {mse_k1, ..., mse_k64}.

    `alternatives`: the same split under other candidate representations (select.py); the
    model trains on each and keeps the one its validation tail prefers."""
    # before training: a series too short for AR(tau) must not cost the training run (the
    # candidates share the values, the split and the season the baselines use)
    fitted_baselines = baselines(series, config.tau)
    picked = train_on_best_representation(config, [series, *alternatives], progress, log)
    model, history, series = picked.model, picked.history, picked.series
    predictor = LevelForecaster(TorchForecaster(model, name=config.arch), series)
    table, results = evaluate_all([predictor, *fitted_baselines], series)
    held = len(series.values) - series.num_train
    log(f"representation: {series.representation.name}; {series.held_out} MSE "
        f"({held} held-out values, series units):")  # fmt: skip
    log(format_table(table))
    run = ForecastRun(model, table, results, history=history)
    if series.held_out == "validation":  # a test range is the user's to judge, not a note's
        run.versus_naive = versus_naive(table, config.arch)
    warmed = max(predictor.tau - 1, config.resolved_warmup() + series.representation.lost)
    full = predict(predictor, series, max(HORIZONS), first_origin=warmed)  # whole series
    manifest_series = series.manifest_series(min_history(model))
    try:
        manifest_series["intervals"] = manifest_intervals(full, series)
        cover = manifest_series["intervals"]["test_coverage"]
        log(f"90% interval coverage on the {series.held_out} range: " + ", ".join(
            f"k={k}: {v:.2f}" for k, v in cover.items()))  # fmt: skip
    except SeriesError as exc:
        log(f"no prediction intervals: {exc}")
    if out is not None:
        scores = held_out_errors(results[0], series)
        metrics = metrics_for_manifest(table[config.arch])
        metrics.update(metrics_for_manifest({k: r["mase"] for k, r in scores.items()}, "mase"))
        training = {
            "series": series.source,
            "series_sha256": series_digest(series),
            "num_values": len(series.values),
            "num_train": series.num_train,
            "held_out": series.held_out,
            # the CSV's missing cells, by how they were filled (absent: none were missing)
            **({"missing_filled": series.filled.to_manifest()} if series.filled else {}),
            "representation": series.representation.name,
            # {candidate: validation score}; none without a validation tail (inf is not JSON)
            "representation_scores": finite_scores(picked.val_scores),
            "config": config.to_dict(),
            "final_train_mse": history[-1],
            "baselines": {k: metrics_for_manifest(v) for k, v in table.items() if k != config.arch},
        }
        if run.versus_naive is not None:  # {model, naive, ...: {mse_k1, ...}, worse_than}
            training["validation_vs_naive"] = run.versus_naive.to_manifest()
        run.path = export_model(
            model,
            Path(out),
            name=name,
            version=version,
            vocab=None,
            tokenizer=None,
            series=manifest_series,
            metrics=metrics,
            training=training,
            probe=series.normalised.tolist(),  # the check feeds the series the model serves
            probe_source="the series (normalised as the model reads it)",
        )
        log(f"exported {run.path}")
    if plot_path is not None:
        from rnnserve.trainer.forecast.plot import plot_k_step

        run.plot = plot_k_step(series, full, plot_path, title=f"{name} ({config.arch})")
        log(f"wrote {run.plot}")
    return run
