"""`rnn-trainer backtest`: the rolling-origin backtest of backtest.py from the command line.

Prints the table (MASE, sMAPE, MSE at k = 1, 4, 16 for every model and baseline) and
writes OUT_DIR/NAME.json (scores, settings) and OUT_DIR/NAME.png (the test window with
the 16-step forecasts of the best model and the best baseline, and MASE bars).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rnnserve.trainer.errors import TrainerError, os_reason
from rnnserve.trainer.forecast.flags import MLP_HIDDEN, RECURRENT_HIDDEN, add_series_arguments
from rnnserve.trainer.forecast.metrics import finite_scores
from rnnserve.trainer.forecast.series import (
    MISSING_POLICIES,
    Filled,
    describe_dropped,
    read_csv_column,
)

if TYPE_CHECKING:  # torch is imported only when a backtest runs, not to build the parser
    from rnnserve.trainer.forecast.train import ForecastTrainConfig

DEFAULT_TAU = 8
ARCHS = ("mlp", "rnn", "gru", "lstm")  # models.FORECAST_ARCHS, without importing torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series", required=True, help="CSV file with a header row")
    parser.add_argument("--column", required=True, help="the CSV column to forecast")
    parser.add_argument("--missing", default="interpolate", choices=MISSING_POLICIES)
    parser.add_argument(
        "--arch", nargs="+", default=list(ARCHS), choices=ARCHS,
        help="models to train (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--tau", type=int, default=DEFAULT_TAU, help="mlp window and AR(tau) order (default 8)"
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help="test window (default 20%% of the series)"
    )
    add_series_arguments(parser)
    parser.add_argument("--epochs", type=int, default=300, help="at most (early stopping)")
    parser.add_argument("--hidden", type=int, default=None, help="default 10 mlp, 32 recurrent")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    from rnnserve.trainer.cli import seed_value  # imported by it: not at module level

    parser.add_argument("--seed", type=seed_value, default=0, help="0 .. 2**32 - 1")
    parser.add_argument("--out-dir", default="backtest", help="where NAME.json/.png go")
    parser.add_argument("--name", default=None, help="file stem (default: the column)")
    parser.add_argument("--no-plot", action="store_true")


def configs_from_args(args: argparse.Namespace) -> dict[str, ForecastTrainConfig]:
    from rnnserve.trainer.forecast.train import ForecastTrainConfig

    out = {}
    for arch in args.arch:
        default = MLP_HIDDEN if arch == "mlp" else RECURRENT_HIDDEN
        hidden = default if args.hidden is None else args.hidden  # 0 is refused, not default
        layers = 1 if arch == "mlp" else args.layers
        out[arch] = ForecastTrainConfig(
            arch=arch, tau=args.tau, hidden=hidden, layers=layers, epochs=args.epochs,
            num_steps=None, lr=args.lr, seed=args.seed, refit=args.refit,
        )  # fmt: skip
    return out


def run(args: argparse.Namespace) -> int:
    if args.tau < 1 or args.epochs < 1:
        raise TrainerError("--tau and --epochs must be at least 1")
    if not 0 < args.lr < math.inf:  # 0 never trains, inf or NaN trains NaN weights
        raise TrainerError(f"--lr must be a positive finite number, got {args.lr}")
    from rnnserve.trainer.forecast.backtest import backtest, format_scores

    read = read_csv_column(args.series, args.column, args.missing)
    values = read.values  # NaN gaps: backtest() fills them from the past only
    if read.leading or read.trailing:
        print(describe_dropped(str(args.series), args.column, read.leading, read.trailing))
    for warning in read.spikes:
        print(warning, file=sys.stderr)
    configs = configs_from_args(args)
    out = Path(args.out_dir)
    stem = args.name or file_stem(args.column)
    try:  # before training, so an unusable --out-dir does not cost the run
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot write {out}: {os_reason(exc)}") from None
    result = backtest(
        values, f"{args.series}:{args.column}", configs, tau=args.tau,
        test_size=args.test_size, val_size=args.val_size, transform=args.transform or "auto",
        season=args.season,
    )  # fmt: skip
    table = format_scores(result)
    print(table)
    best, base = result.best("model", 16), result.best("baseline", 16)
    print(f"k=16 MASE: best model {best} {result.scores[best][16]['mase']:.3f}, "
          f"best baseline {base} {result.scores[base][16]['mase']:.3f}")  # fmt: skip
    target = out / f"{stem}.json"
    counts = (*result.filled, read.leading, read.trailing)  # Filled's order
    filled = Filled(str(args.series), args.column, *counts) if any(counts) else None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # --name may name a subdirectory
        target.write_text(json.dumps(report(result, configs, filled), indent=2) + "\n")
    except OSError as exc:
        raise TrainerError(f"cannot write {target}: {os_reason(exc)}") from None
    print(f"wrote {target}")
    if not args.no_plot:
        from rnnserve.trainer.forecast.plot import plot_backtest

        print(f"wrote {plot_backtest(result, out / f'{stem}.png')}")
    return 0


def file_stem(column: str) -> str:
    """The column as a file name: path separators become "_" ("kWh/day" is not a path)."""
    return re.sub(r"[/\\]", "_", column).strip() or "series"


def _strict(scores: dict[str, float]) -> dict[str, float | None]:
    """A diverged model's inf or NaN scores as null: JSON has no such numbers, and strict
    readers (JavaScript, Go) refuse the file that holds them."""
    return {m: v if math.isfinite(v) else None for m, v in scores.items()}


def report(result, configs: dict[str, ForecastTrainConfig], filled: Filled | None = None) -> dict:
    """The JSON record of one backtest; `filled`: the file's cells that were missing, as
    manifest.training records them (`missing_filled`, absent when none were)."""
    series = result.series
    return {
        "series": result.source,
        "num_values": len(series.values),
        "test_size": len(series.values) - series.num_train,
        **({"missing_filled": filled.to_manifest()} if filled else {}),
        "representation": result.representation,  # the automatic choice
        "representations": result.representations,  # what each model learned (select.py)
        "validation_scores": {m: finite_scores(s) for m, s in result.val_scores.items()},
        "season": series.season,
        "horizons": sorted(next(iter(result.scores.values()))),
        "scores": {
            n: {str(k): _strict(v) for k, v in row.items()} for n, row in result.scores.items()
        },
        "models": result.models,
        "train_seconds": result.train_seconds,
        "configs": {n: c.to_dict() for n, c in configs.items()},
    }
