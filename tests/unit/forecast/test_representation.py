"""Representations: apply/undo round trips, and the server's inverse equals the trainer's."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.forecasting import Series as ServerSeries
from rnnserve.trainer.forecast.representation import Representation

CASES = [Representation(0, 0), Representation(1, 0), Representation(0, 12), Representation(1, 12)]


def seasonal_trend(n: int = 120) -> np.ndarray:
    t = np.arange(n)
    noise = np.random.default_rng(0).normal(0, 0.3, n)
    return 50 + 0.2 * t + 3 * np.sin(2 * np.pi * t / 12) + noise


@pytest.mark.parametrize("rep", CASES, ids=lambda r: r.name)
def test_undo_of_the_true_representation_gives_back_the_future(rep: Representation) -> None:
    x = seasonal_trend()
    r = rep.apply(x)
    assert np.isnan(r[: rep.lost]).all() and np.isfinite(r[rep.lost :]).all()
    origins = np.array([rep.lost + 3, 40, 90])
    k = 20  # longer than the season: the recursion reuses its own predictions
    steps = r[origins[:, None] + np.arange(1, k + 1)[None, :]]
    back = rep.undo(x, origins, steps)
    want = x[origins[:, None] + np.arange(1, k + 1)[None, :]]
    assert np.allclose(back, want, atol=1e-9)


def test_undo_from_many_origins_with_a_long_season_reads_only_k_seed_levels() -> None:
    """undo gathered the last m true levels of every origin, [n, m]: 4.7 GB for the whole-
    series predictions of a 1M-point series with season 626, a MemoryError after training.
    The first K of them are all the recursion reads."""
    import tracemalloc

    m, k = 1_000, 4
    rep = Representation(0, m)
    x = 10 + np.sin(2 * np.pi * np.arange(12_000) / m) + 0.001 * np.arange(12_000)
    r = rep.apply(x)
    origins = np.arange(m, 11_000)
    steps = r[origins[:, None] + np.arange(1, k + 1)[None, :]]
    tracemalloc.start()
    try:
        back = rep.undo(x, origins, steps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.allclose(back, x[origins[:, None] + np.arange(1, k + 1)[None, :]], atol=1e-9)
    assert peak < 10 * steps.nbytes, (peak, steps.nbytes)


def test_undo_only_reads_the_history_before_the_origin() -> None:
    rep = Representation(1, 12)
    x = seasonal_trend()
    origin = np.array([60])
    steps = np.zeros((1, 5))
    changed = x.copy()
    changed[61:] += 1000.0
    assert np.allclose(rep.undo(x, origin, steps), rep.undo(changed, origin, steps))
    # zero seasonal growth forecasts last season's values plus this year's change so far
    assert rep.undo(x, origin, steps)[0, 0] == pytest.approx(x[49] + (x[60] - x[48]))


@pytest.mark.parametrize("rep", CASES, ids=lambda r: r.name)
def test_server_inverse_equals_the_trainers(rep: Representation) -> None:
    x = seasonal_trend()
    mean, std = 0.3, 1.7
    entry = {"mean": mean, "std": std, "tau": rep.lost + 4, "representation": rep.to_manifest()}
    server = ServerSeries.from_manifest(entry)
    z = (rep.apply(x) - mean) / std
    z[: rep.lost] = 0.0
    assert np.allclose(server.represent(x), z)
    origins = np.arange(rep.lost, len(x) - 1)
    preds = np.random.default_rng(1).normal(size=(len(origins), 30))
    assert np.allclose(server.levels(x, origins, preds), rep.undo(x, origins, preds * std + mean))


def test_old_manifests_read_as_levels_and_bad_representations_are_refused() -> None:
    from rnnserve.server.errors import UnsupportedTask

    old = ServerSeries.from_manifest({"mean": 1.0, "std": 2.0, "tau": 4, "features": 1})
    assert (old.difference, old.season, old.tau) == (0, 0, 4)
    with pytest.raises(UnsupportedTask, match="representation"):
        ServerSeries.from_manifest({"tau": 1, "representation": {"difference": 2}})


def test_server_intervals_add_the_residual_quantiles_per_step() -> None:
    s = ServerSeries.from_manifest(
        {"tau": 1, "intervals": {"lower": [-1.0, -2.0], "upper": [1.0, 3.0]}}
    )
    lower, upper = s.interval(np.array([10.0, 20.0, 30.0]))
    assert lower == [9.0, 18.0, 28.0] and upper == [11.0, 23.0, 33.0]  # step 3 reuses the last


def test_representation_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Representation(2, 0)
    with pytest.raises(ValueError):
        Representation(0, 1)
    assert Representation(1, 52).to_manifest() == {
        "name": "seasonal-diff(52)+diff",
        "difference": 1,
        "season": 52,
    }


def test_server_intervals_hold_the_forecast_even_from_a_biased_manifest() -> None:
    # manifests written before the trainer widened its bounds to 0 can lie on one side
    entry = {"mean": 0.0, "std": 1.0, "tau": 1,
             "intervals": {"lower": [0.5, -1.0], "upper": [2.0, -0.2]}}  # fmt: skip
    forecast = np.array([10.0, 20.0, 30.0])
    lower, upper = ServerSeries.from_manifest(entry).interval(forecast)
    assert lower == [10.0, 19.0, 29.0] and upper == [12.0, 20.0, 30.0]
    assert all(lo <= f <= hi for lo, f, hi in zip(lower, forecast, upper, strict=True))


@pytest.mark.parametrize(
    "entry",
    [
        {"mean": 0.0, "std": float("nan"), "tau": 1},
        {"mean": float("inf"), "std": 1.0, "tau": 1},
        {"mean": 0.0, "std": 1.0, "tau": 1, "intervals": {"lower": [float("nan")], "upper": [1]}},
    ],
)
def test_server_refuses_a_non_finite_series_entry(entry: dict) -> None:
    """JSON lets a hand-edited manifest hold NaN: every Forecast then failed with an
    INVALID_ARGUMENT blaming history[0] (or returned NaN bounds), not the model."""
    from rnnserve.server.errors import UnsupportedTask

    with pytest.raises(UnsupportedTask, match="finite"):
        ServerSeries.from_manifest(entry)


class _ScalingGraph:
    """A stand-in forecast graph: prediction = 1e10 * value, in float32 as ORT computes."""

    def initial_state(self, batch: int) -> list[np.ndarray]:
        return []

    def run(self, x: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        with np.errstate(over="ignore"):
            return (x * np.float32(1e10)).astype(np.float32), state


class _InlineRuntime:
    async def call(self, fn, *args):
        return fn(*args)


@pytest.mark.parametrize("fitted", [False, True])
def test_a_forecast_that_overflows_in_the_graph_is_invalid_not_inf(fitted: bool) -> None:
    """A history within float32 can overflow inside the graph (an MLP's weighted sum of
    values near 3e38 gave forecast [-inf, nan, nan] with status OK)."""
    import asyncio
    from types import SimpleNamespace

    from rnnserve.server.errors import BadRequest
    from rnnserve.server.forecasting import forecast
    from rnnserve.server.settings import Settings

    series = {"mean": 0.0, "std": 1.0, "tau": 1, "intervals": {"lower": [-1.0], "upper": [1.0]}}
    entry = SimpleNamespace(manifest=SimpleNamespace(series=series), model=_ScalingGraph())
    run = forecast(entry, _InlineRuntime(), Settings(), [1.0, 2.0], 3, fitted)
    ok = asyncio.run(run)  # small values stay finite: the check refuses only overflow
    assert ok.forecast[0] == pytest.approx(2e10)
    with pytest.raises(BadRequest, match=r"history: .*overflowed"):
        asyncio.run(forecast(entry, _InlineRuntime(), Settings(), [1.0, 1e30], 3, fitted))
