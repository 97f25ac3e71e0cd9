"""`rnn-trainer package --task forecast`: a forecast package from a graph exported elsewhere.

Why: a forecaster trained by the user's own code (plain torch, exported to ONNX) should be
served by Forecast without `rnn-trainer train`. The graph is read and fitted to the server's
contract by trainer/package_forecast_graph.py; what it cannot say (the normalisation, the
representation, the intervals) comes from flags or is computed from the series the user
gives. manifest.series is made by the same code `train --task forecast` uses
(Series.manifest_series, intervals.manifest_intervals), so the server reads a packaged
forecaster exactly as a trained one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import onnx

from rnnserve.artifact.manifest import ONNX_FILE, Manifest, sha256_file
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.evaluate import HORIZONS, LevelForecaster, predict
from rnnserve.trainer.forecast.intervals import LEVELS, MIN_RESIDUALS, manifest_intervals, widening
from rnnserve.trainer.forecast.models import FORECAST_ARCHS
from rnnserve.trainer.forecast.pipeline import series_digest
from rnnserve.trainer.forecast.representation import Representation
from rnnserve.trainer.forecast.series import Normaliser, Series, SeriesError, load_csv, make_series
from rnnserve.trainer.forecast.train import ForecastTrainConfig
from rnnserve.trainer.graph_check import OrtGraph
from rnnserve.trainer.package import (
    RECURRENT_OPS,
    left_to_right,
    load_graph,
    save_manifest,
    source_record,
)
from rnnserve.trainer.package_forecast_graph import (
    ForecastInterface,
    OrtForecaster,
    adapt_forecast,
    carried_window,
    check_forecast_graph,
    check_forecast_interface,
    resolve_forecast,
)
from rnnserve.trainer.precision import check_convertible
from rnnserve.trainer.staging import package_dir, staged
from rnnserve.trainer.wording import plural

TRANSFORMS = ("level", "diff")  # what the model was trained on: `auto` is train's to choose
FAR_OFF = 3.0  # a series normalised by the given statistics with |mean| or std beyond this


@dataclass
class ForecastPackageRequest:
    """What `rnn-trainer package --task forecast` was asked; None means: infer it from the
    graph, or compute it from `series` (a CSV file) and its `column`."""

    onnx_path: Path
    out: Path
    name: str
    version: str = "1"
    mean: float | None = None  # the normalisation the model was trained with ...
    std: float | None = None  # ... of the representation, in series units
    series: Path | None = None  # CSV: the statistics (if not given), the check, the intervals
    column: str | None = None
    transform: str = "level"  # level | diff (first differences)
    season: int = 0  # seasonal differencing period (0: none)
    tau: int | None = None  # the window: the shortest history before differencing
    residual_std: list[float] | None = None  # one-step (, two-step, ...) residual std
    input_name: str | None = None
    output_name: str | None = None
    states: list[str] | None = None
    layout: str | None = None
    arch: str | None = None
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)


def representation_of(transform: str, season: int) -> Representation:
    if transform not in TRANSFORMS:
        raise TrainerError(f"--transform must be one of {', '.join(TRANSFORMS)} (what the"
                           f" model was trained on), got {transform!r}")  # fmt: skip
    try:
        return Representation(int(transform == "diff"), season)
    except ValueError as exc:
        raise TrainerError(f"--season must be 0 (none) or a period >= 2, got {season}") from exc


def _finite(flag: str, value: float, positive: bool = False) -> None:
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise TrainerError(f"{flag} must be {kind}, got {value}")


def check_request(request: ForecastPackageRequest) -> None:
    """Refuses what is missing or malformed before the graph is read."""
    if (request.mean is None) != (request.std is None):
        given = "--mean" if request.mean is not None else "--std"
        raise TrainerError(f"{given} needs {'--std' if given == '--mean' else '--mean'} too:"
                           " the normalisation the model was trained with")  # fmt: skip
    if request.mean is None and request.series is None:
        raise TrainerError(
            "a forecaster needs the normalisation its model was trained with: give --mean and"
            " --std (of the values the model reads, in series units), or --series FILE.csv"
            " --column NAME to compute them from (--mean 0 --std 1: the model reads raw values)"
        )
    if request.mean is not None and request.std is not None:
        _finite("--mean", request.mean)
        _finite("--std", request.std, positive=True)
    if (request.series is None) != (request.column is None):
        raise TrainerError("--series FILE.csv and --column NAME go together (the CSV column"
                           " holding the series)")  # fmt: skip
    for value in request.residual_std or []:
        _finite("--residual-std", value, positive=True)
    if request.tau is not None and request.tau < 1:
        raise TrainerError(f"--tau must be at least 1, got {request.tau}")


def architecture_of(graph: onnx.GraphProto, given: str | None, window: int | None) -> str:
    """--arch, else the graph's recurrent op, else mlp when its state is the window of the
    last values it was fed (a window model's)."""
    if given is not None:
        if given not in FORECAST_ARCHS:
            raise TrainerError(f"--arch {given!r} is not one of {', '.join(FORECAST_ARCHS)}")
        return given
    ops = sorted({RECURRENT_OPS[n.op_type] for n in graph.node if n.op_type in RECURRENT_OPS})
    if len(ops) == 1:
        return ops[0]
    if not ops and window is not None:
        return "mlp"
    why = f"ops of {', '.join(ops)}" if ops else "no LSTM, GRU or RNN op, and no window state"
    raise TrainerError(f"cannot tell the architecture ({why} in the graph); name it with --arch"
                       f" ({', '.join(FORECAST_ARCHS)})")  # fmt: skip


def window_of(found: ForecastInterface, carried: int | None, given: int | None) -> tuple[int, str]:
    """The model's window (manifest tau before differencing) and where it came from: --tau,
    the window its state carries, or 1 (a recurrent model)."""
    if given is None:
        if carried is None:
            return 1, "a recurrent model needs no window"
        what = "input" if found.window is not None else f"state {found.iface.states[0].input!r}"
        return carried, f"the window model's {what} [batch, {carried}]"
    if found.window is not None and given != carried:
        raise TrainerError(f"--tau {given}: the window model reads {carried} values")
    return given, "--tau"


def series_of(request: ForecastPackageRequest, rep: Representation) -> tuple[Series, list[str]]:
    """The Series whose normaliser and representation go into manifest.series: read from
    the CSV (statistics of its whole column unless --mean/--std are given), or no values."""
    notes: list[str] = []
    if request.series is None:
        assert request.mean is not None and request.std is not None  # check_request
        return Series(np.empty(0), 0, Normaliser(request.mean, request.std), "given", rep), notes
    values = load_csv(request.series, str(request.column))
    source = f"{request.series}:{request.column}"
    series = make_series(values, len(values), source, rep, held_out="validation")
    if request.mean is None or request.std is None:
        return series, notes
    series = replace(series, normaliser=Normaliser(request.mean, request.std))
    z = series.normalised[rep.lost :].astype(np.float64)
    mean, std = float(np.mean(z)), float(np.std(z))
    if abs(mean) > FAR_OFF or not 1 / FAR_OFF <= std <= FAR_OFF:
        notes.append(
            f"note: {source} ({rep.name}) normalised with --mean {request.mean:g} --std"
            f" {request.std:g} has mean {mean:.3g} and std {std:.3g}, far from 0 and 1: are"
            " they the statistics the model was trained with?"
        )
    return series, notes


def given_intervals(residual_std: list[float]) -> dict[str, Any]:
    """manifest.series.intervals from residual standard deviations (series units) of steps
    1, 2, ...: a central 90 % normal interval per step, the last reused beyond them, widths
    never shrinking with the horizon (intervals.widening, as computed ones)."""
    z = NormalDist().inv_cdf(LEVELS[1])
    scale = np.asarray(residual_std, np.float64)
    lower, upper = widening(-z * scale, z * scale)
    return {
        "method": "normal, from the residual standard deviations given (--residual-std)",
        "levels": list(LEVELS),
        "lower": [float(f"{v:.6g}") for v in lower],
        "upper": [float(f"{v:.6g}") for v in upper],
        "test_coverage": {},
    }


def computed_intervals(
    onnx_path: Path, found: ForecastInterface, series: Series, window: int, arch: str
) -> dict[str, Any]:
    """manifest.series.intervals from the packaged graph's k-step residuals over the series,
    by the code `train --task forecast` runs (after the same warm-up). Raises SeriesError
    when the series is too short for them."""
    iface = found.iface
    inner = OrtForecaster(OrtGraph(onnx_path, iface.input, iface.output, iface.states),
                          iface.states, window, arch)  # fmt: skip
    predictor = LevelForecaster(inner, series)  # type: ignore[arg-type]  # duck-typed
    warmup = ForecastTrainConfig(arch=arch, tau=window).resolved_warmup()
    first = max(predictor.tau - 1, warmup + series.representation.lost)
    if len(series.values) - 1 - first < MIN_RESIDUALS:
        raise SeriesError(
            f"{series.source} has {len(series.values)} values; intervals need at least"
            f" {first + 1 + MIN_RESIDUALS} (a warm-up of {first} and {MIN_RESIDUALS} residuals)"
        )
    entry = manifest_intervals(predict(predictor, series, max(HORIZONS), first), series)
    entry["method"] = f"empirical quantiles of k-step residuals over {series.source} (--series)"
    return entry


def package_forecaster(request: ForecastPackageRequest) -> Path:
    """Writes OUT/NAME/VERSION/{model.onnx, manifest.json} of task forecast; returns that
    directory. Raises TrainerError saying what does not fit and why; nothing is left behind
    on failure."""
    target = package_dir(request.out, request.name, request.version)
    check_request(request)
    rep = representation_of(request.transform, request.season)
    model = load_graph(request.onnx_path)
    left_to_right(model.graph, "value")
    found = resolve_forecast(
        model, input_name=request.input_name, output_name=request.output_name,
        states=request.states, layout=request.layout,
    )  # fmt: skip
    adapted = adapt_forecast(model, found)
    serialized = adapted.SerializeToString()
    check_forecast_interface(model.graph, serialized, found)
    carried = carried_window(serialized, found)
    arch = architecture_of(model.graph, request.arch, carried)
    check_convertible(arch, "forecast", request.precision)
    window, window_from = window_of(found, carried, request.tau)
    series, notes = series_of(request, rep)
    probe = series.normalised if len(series.values) else None
    probe_source = "the series (normalised as the model reads it)"
    with staged(target) as tmp:
        onnx_path = tmp / ONNX_FILE
        onnx.save(adapted, str(onnx_path))
        try:
            parity = check_forecast_graph(onnx_path, found.iface, probe, probe_source)
        except TrainerError as exc:  # pairs swapped by a guess fail here, not by their shape
            raise TrainerError(f"{exc}{found.iface.pair_hint()}") from exc
        entry = series.manifest_series(window)
        intervals = "none"
        if request.residual_std:
            entry["intervals"], intervals = given_intervals(request.residual_std), "given"
        elif len(series.values):
            try:
                entry["intervals"] = computed_intervals(onnx_path, found, series, window, arch)
                intervals = f"computed from {series.source}"
            except SeriesError as exc:
                notes.append(f"note: no prediction intervals: {exc}; give --residual-std")
        else:
            notes.append(
                "note: no prediction intervals (Forecast returns no lower/upper): give"
                " --residual-std, or --series to compute them"
            )
        given = request.mean is not None
        training = {
            **source_record(request.onnx_path, found.layout, found.notes),
            "normalisation": "given (--mean, --std)" if given else f"computed from {series.source}",
            "representation": rep.name,
            "window": {"tau": window, "from": window_from},
            "intervals": intervals,
        }
        if len(series.values):
            training.update(series=series.source, series_sha256=series_digest(series),
                            num_values=len(series.values))  # fmt: skip
        hyperparameters: dict[str, Any] = {"source": "onnx"}
        if arch == "mlp":
            hyperparameters["tau"] = window
        manifest = Manifest(
            name=request.name,
            version=request.version,
            task="forecast",
            architecture=arch,
            hyperparameters=hyperparameters,
            input_name=found.iface.input,
            output_name=found.iface.output,
            state=found.iface.states,
            series=entry,
            training=training,
            onnx_sha256=sha256_file(onnx_path),
            parity=parity,
        )
        save_manifest(tmp, manifest)
    norm = series.normaliser
    request.notes[:] = [
        *found.notes,
        f"normalisation: mean {norm.mean:.6g}, std {norm.std:.6g} of the {rep.name}"
        + ("" if request.mean is not None else f" of {series.source}"),
        f"window: {window} ({window_from}); a forecast needs at least"
        f" {plural(entry['tau'], 'value')}",
        *notes,
    ]
    return target
