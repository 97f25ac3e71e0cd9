"""The default model zoo (docs/contracts.md): one small model of every architecture.

Why presets: `default` is what `make run` serves (a few minutes on 2 cores, the lstm writes
English-ish text); `tiny` builds the same names and interfaces in seconds for tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import ModelConfig
from rnnserve.trainer.pipeline import DataConfig, train_count_model, train_recurrent
from rnnserve.trainer.train import TrainConfig

TEXT_MODELS = ("rnn", "gru", "lstm", "lstm-deep", "bilstm", "ngram", "hmm")
FORECAST_MODELS = ("sine-mlp", "sine-gru")
ZOO = (*TEXT_MODELS, *FORECAST_MODELS)


@dataclass(frozen=True)
class Preset:
    max_tokens: int | None  # corpus prefix used (None: all of it)
    hidden: int
    embed: int
    epochs: int
    deep_epochs: int
    num_steps: int
    batch_size: int
    lr: float
    hmm_states: int
    hmm_epochs: int
    lstm: dict = field(default_factory=dict)  # overrides for `lstm`, the model the docs use


_DEFAULT_LSTM = {
    "hidden": 256,
    "embed": 64,
    "dropout": 0.2,
    "epochs": 16,
    "batch_size": 32,
    "lr": 0.005,
    "lr_decay": 0.93,
}
PRESETS = {
    "tiny": Preset(12_000, 16, 8, 1, 1, 16, 32, 0.01, 4, 2),
    "default": Preset(None, 128, 32, 12, 10, 64, 64, 0.01, 32, 50, lstm=_DEFAULT_LSTM),
}


def _recurrent(name: str) -> tuple[str, int, bool]:
    """(arch, layers, bidirectional) for a zoo name."""
    return {
        "rnn": ("rnn", 1, False),
        "gru": ("gru", 1, False),
        "lstm": ("lstm", 1, False),
        "lstm-deep": ("lstm", 2, False),
        "bilstm": ("lstm", 1, True),
    }[name]


def _check_out(out: Path, names: list[str]) -> None:
    """Refuses an OUT (or OUT/NAME) that is a file before any training: it failed only at the
    first export, minutes into the default preset, leaving that model's checkpoint behind."""
    for path in (out, *(out / name for name in names)):
        if path.exists() and not path.is_dir():
            raise TrainerError(f"--out: {path} is not a directory; the zoo writes OUT/NAME/1/")


def build_zoo(
    out: Path,
    preset: str = "default",
    only: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Trains and exports the zoo into out/<name>/1/; returns the package dirs written.

    `progress`: the tqdm bars; `log`: the lines (each model, epoch and export), by default
    printed with the bars and silent without (a library call). `zoo --no-progress` keeps
    the lines: it printed nothing for the default preset's minutes of training."""
    if preset not in PRESETS:
        raise TrainerError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if only is not None and not only:  # `--only` given no names: build nothing, silently
        raise TrainerError(f"--only needs at least one zoo name: {', '.join(ZOO)}")
    unknown = sorted(set(only or []) - set(ZOO))
    if unknown:
        raise TrainerError(f"unknown zoo model(s) {', '.join(unknown)}; known: {', '.join(ZOO)}")
    wanted = [n for n in ZOO if only is None or n in only]
    p = PRESETS[preset]
    out = Path(out)
    _check_out(out, wanted)
    data = DataConfig(max_tokens=p.max_tokens)
    if log is None:
        log = print if progress else (lambda *_: None)
    written: list[Path] = []
    for i, name in enumerate(n for n in wanted if n in TEXT_MODELS):
        started = time.monotonic()
        log(f"== [{i + 1}/{len(wanted)}] {name} ({preset}) ==")
        if name in ("ngram", "hmm"):
            try:
                path = train_count_model(
                    name, data, out=out, name=name, n=3, alpha=1.0, states=p.hmm_states,
                    epochs=p.hmm_epochs, progress=progress, log=log,
                )  # fmt: skip
            except ImportError as exc:
                print(
                    f"warning: skipping {name}: its module is not available ({exc})",
                    file=sys.stderr,
                )
                continue
        else:
            arch, layers, bi = _recurrent(name)
            extra = p.lstm if name == "lstm" else {}
            config = ModelConfig(
                arch, 1, extra.get("hidden", p.hidden), layers, extra.get("embed", p.embed), bi,
                extra.get("dropout", 0.0),
            )  # fmt: skip
            train = TrainConfig(
                epochs=extra.get("epochs", p.deep_epochs if layers > 1 or bi else p.epochs),
                num_steps=p.num_steps, batch_size=extra.get("batch_size", p.batch_size),
                lr=extra.get("lr", p.lr), lr_decay=extra.get("lr_decay", 1.0),
                sampling="sequential", seed=0,
            )  # fmt: skip
            path = train_recurrent(
                config, train, data, out=out, name=name, progress=progress, log=log
            )
        assert path is not None
        written.append(path)
        log(f"   -> {path} ({time.monotonic() - started:.1f}s)")
    forecast = [n for n in wanted if n in FORECAST_MODELS]
    if forecast:
        try:
            from rnnserve.trainer.forecast.zoo import build_forecast_models
        except ImportError as exc:
            print(
                f"warning: skipping {', '.join(forecast)}: trainer.forecast.zoo is missing ({exc})",
                file=sys.stderr,
            )
        else:
            log(f"== forecasting models {', '.join(forecast)} ({preset}) ==")
            written += build_forecast_models(out, preset, only=forecast, log=log)
    return written
