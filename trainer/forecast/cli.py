"""`rnn-trainer train --task forecast`: the forecasting flags and the run.

trainer/cli.py owns the common train flags and calls `add_arguments` only for forecast
invocations, so the forecast defaults set here (a GRU, more epochs on a short series, a
smaller model) never change the language models' defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.flags import MLP_HIDDEN, RECURRENT_HIDDEN, add_series_arguments
from rnnserve.trainer.forecast.models import FORECAST_ARCHS
from rnnserve.trainer.forecast.pipeline import run_forecast
from rnnserve.trainer.forecast.series import MISSING_POLICIES, SPLITS, Series, load_candidates
from rnnserve.trainer.forecast.train import AUTO_STEPS, ForecastTrainConfig, auto_num_steps
from rnnserve.trainer.given_flags import refuse_unused
from rnnserve.trainer.staging import package_dir

# Common flags whose language-model defaults do not suit a 1000-value series.
FORECAST_DEFAULTS = {
    "arch": "gru",
    "epochs": 300,
    "num_steps": None,  # up to 100, fewer when a short series needs it
    "batch_size": 64,
    "hidden": None,  # 10 for mlp (the textbook's), 32 for rnn/gru/lstm
}
DEFAULT_ROLLOUT = 32  # steps of the multi-step loss (ForecastTrainConfig's default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds only the forecast-specific flags to the trainer's `train` parser."""
    group = parser.add_argument_group("forecast (--task forecast)")
    group.add_argument(
        "--series", default=None, help="CSV file with a header row (default: the textbook sine)"
    )
    group.add_argument("--column", default=None, help="the CSV column to forecast")
    group.add_argument(
        "--tau", type=int, default=4, help="mlp window and AR(tau) baseline order (default 4)"
    )
    group.add_argument(
        "--missing",
        default="interpolate",
        choices=MISSING_POLICIES,
        help="missing CSV cells: interpolate linearly (default) or stop with an error",
    )
    group.add_argument(
        "--rollout",
        type=int,
        default=None,
        help="horizon of the multi-step training loss (predictions fed back; 0 = one-step "
        f"only; default {DEFAULT_ROLLOUT}, at most --num-steps)",
    )
    group.add_argument(
        "--warmup", type=int, default=None, help="unscored steps per window (tau-1 / 16)"
    )
    group.add_argument(
        "--plot", default=None, help="PNG of the k-step predictions (default: PKG/forecast.png)"
    )
    add_series_arguments(group)
    group.add_argument(
        "--split",
        default=None,
        choices=SPLITS,
        help="tail: all but --val-size values train (default for --series); textbook: the "
        "first 60%% train, the rest test (default for the built-in sine)",
    )
    group.add_argument(
        "--patience", type=int, default=10, help="early stopping: validation checks (0 = off)"
    )
    parser.set_defaults(**FORECAST_DEFAULTS)


def config_from_args(args: argparse.Namespace) -> ForecastTrainConfig:
    """Fills the training dataclass from the parsed flags (validating what argparse cannot)."""
    arch = args.arch
    if arch not in FORECAST_ARCHS:
        raise TrainerError(f"--task forecast needs --arch {' | '.join(FORECAST_ARCHS)}, not {arch}")
    if args.layers != 1 and arch == "mlp":
        raise TrainerError("--layers applies to rnn/gru/lstm; the mlp has one hidden layer")
    hidden = args.hidden if args.hidden is not None else (
        MLP_HIDDEN if arch == "mlp" else RECURRENT_HIDDEN
    )  # fmt: skip
    return ForecastTrainConfig(
        arch=arch,
        tau=args.tau,
        hidden=hidden,
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_steps=args.num_steps,
        warmup=args.warmup,
        rollout=_rollout(args.rollout, args.num_steps),
        lr=args.lr,
        clip=args.clip or None,
        seed=args.seed,
        device=args.device,
        patience=args.patience,
        refit=args.refit,
    )


def _rollout(given: int | None, num_steps: int | None) -> int:
    """--rollout as given, else the default cut to a given --num-steps: `--num-steps 16` alone
    used to fail on a default the user never set ("--rollout must be between 0 and 16")."""
    if given is not None:
        return given
    return DEFAULT_ROLLOUT if num_steps is None else min(DEFAULT_ROLLOUT, num_steps)


def _rollout_fits(rollout: int, config: ForecastTrainConfig, candidates: list[Series]) -> None:
    """A --rollout the user gave must fit in the automatic --num-steps too (the docs: "at most
    --num-steps"): it was cut to them silently (`--rollout 150` trained with 100)."""
    steps = min(auto_num_steps(config, series) for series in candidates)
    if rollout > steps:
        raise TrainerError(
            f"--rollout {rollout} is above --num-steps, which is {steps} here (not given: at "
            f"most {AUTO_STEPS}, fewer on a short training part); the rollout must fit in a "
            f"window: lower --rollout or give --num-steps {rollout}"
        )


# `train` flags of the language models that a forecaster has no use for: given with --task
# forecast they were silently ignored (`--optimizer sgd`, `--time-budget 60` looked followed)
TEXT_ONLY_FLAGS = (
    "embed", "dropout", "weight_drop", "lr_decay", "average_from", "time_budget", "optimizer",
    "weight_decay", "bptt", "bptt_k", "bptt_p", "sampling", "threads", "n", "alpha", "states",
    "hmm_method", "level", "keep_punctuation", "min_freq", "val_fraction", "max_tokens",
    "run_dir", "dist_timeout",
)  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    """Trains, prints the MSE table, exports to args.out/<name>/<version>; returns 0."""
    if getattr(args, "bidirectional", False):
        raise TrainerError("--bidirectional does not apply to forecasting (the future is unknown)")
    if getattr(args, "corpus", None):
        raise TrainerError("--task forecast reads --series FILE.csv --column NAME, not --corpus")
    if getattr(args, "resume", None):
        raise TrainerError("--resume is not supported for --task forecast (runs take seconds)")
    refuse_unused(
        getattr(args, "argv", None) or [], {"the language models": TEXT_ONLY_FLAGS},
        "--task forecast", " (its flags: `rnn-trainer train --task forecast --help`)",
    )  # fmt: skip
    config = config_from_args(args)
    series, *alternatives = load_candidates(
        args.series, args.column, config.tau, args.missing, split=args.split,
        val_size=args.val_size, transform=args.transform, season=args.season,
    )  # fmt: skip
    if args.rollout is not None and args.num_steps is None:
        _rollout_fits(args.rollout, config, [series, *alternatives])
    default = f"{'sine' if args.series is None else 'series'}-{config.arch}"
    name = default if args.name is None else args.name  # "" is refused, not replaced
    version = str(getattr(args, "version", "1") or "1")
    package_dir(Path(args.out), name, version)  # a bad name or version: now, not after training
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else out / name / version / "forecast.png"
    if args.plot:  # a bad --plot is said now, not after the model is trained and published
        from rnnserve.trainer.plot_path import plot_format

        plot_format(plot, "--plot", "forecast.png")
    print(
        f"forecast {config.arch}: {len(series.values)} values from {series.source}, "
        f"train {series.num_train}, {series.held_out} {len(series.values) - series.num_train}, "
        "representation "
        + " or ".join(s.representation.name for s in [series, *alternatives])
        + (" (the validation tail decides)" if alternatives else "")
    )
    if series.filled:
        print(series.filled.describe(series.held_out))
    for warning in series.warnings:
        print(warning, file=sys.stderr)
    run = run_forecast(
        config,
        series,
        out=out,
        name=name,
        version=version,
        plot_path=plot,
        progress=not getattr(args, "no_progress", False),
        alternatives=alternatives,
    )
    if run.versus_naive is not None:
        held = len(series.values) - series.num_train
        command = shlex.join(
            ["rnn-trainer", "backtest", "--series", str(args.series), "--column", str(args.column)]
        )
        note = run.versus_naive.note(held, command)
        if note:
            print(note)
    return 0
