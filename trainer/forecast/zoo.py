"""The forecasting part of the model zoo: `sine-mlp` (tau 4) and `sine-gru`, version 1.

Called by trainer.zoo.build_zoo. `default` trains them with the benchmark's settings (about
ten seconds each on one core); `tiny` keeps the same names and interfaces but trains for a
handful of steps, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.pipeline import run_forecast
from rnnserve.trainer.forecast.series import load_series
from rnnserve.trainer.forecast.train import ForecastTrainConfig

FORECAST_ZOO = ("sine-mlp", "sine-gru")
TAU = 4

_CONFIGS = {
    "default": {
        "sine-mlp": ForecastTrainConfig(arch="mlp", tau=TAU, hidden=10, epochs=300),
        "sine-gru": ForecastTrainConfig(arch="gru", tau=TAU, hidden=32, epochs=300),
    },
    "tiny": {
        "sine-mlp": ForecastTrainConfig(arch="mlp", tau=TAU, hidden=4, epochs=3, num_steps=32),
        "sine-gru": ForecastTrainConfig(
            arch="gru", tau=TAU, hidden=4, epochs=3, num_steps=32, rollout=4
        ),
    },
}


def build_forecast_models(
    out: Path,
    preset: str = "default",
    only: list[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Trains and exports the sine models into out/<name>/1/; returns the package dirs.

    `only` may name other zoo models too (trainer.zoo validates names); they are skipped."""
    if preset not in _CONFIGS:
        raise TrainerError(f"unknown preset {preset!r}; choose one of {', '.join(_CONFIGS)}")
    series = load_series(None, None, TAU)
    if log is None:  # `progress`: print the runs' lines
        log = print if progress else (lambda *_: None)
    written: list[Path] = []
    for name in FORECAST_ZOO:
        if only is not None and name not in only:
            continue
        run = run_forecast(_CONFIGS[preset][name], series, out=Path(out), name=name, log=log)
        if run.path is not None:
            written.append(run.path)
    return written
