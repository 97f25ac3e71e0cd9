"""Flags of `rnn-trainer package --task forecast` (a forecaster brought from elsewhere).

Why its own file: package_cli.py's flags are a language model's (vocabulary, tokenizer);
these say what a forecaster's graph cannot (normalisation, representation, window,
intervals). Each task refuses the other's flags by name rather than ignoring them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.given_flags import refuse_unused

TASKS = ("lm", "forecast")
FORECAST_FLAGS = ("mean", "std", "series", "column", "transform", "season", "tau", "residual_std")
LM_FLAGS = ("vocab", "tokenizer", "keep_case", "letters_only", "text")


def residual_stds(text: str) -> list[float]:
    """`S` or `S1,S2,...`: residual standard deviations of steps 1, 2, ... (series units)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected S or S1,S2,... (numbers), got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", choices=TASKS, default="lm",
        help="lm: a language model (--vocab, --tokenizer); forecast: a forecaster (its flags"
             " below, docs/trainer.md)",
    )  # fmt: skip
    group = p.add_argument_group("forecaster (--task forecast)")
    group.add_argument(
        "--mean",
        type=float,
        default=None,
        help="the normalisation's mean the model was trained with (series units)",
    )
    group.add_argument("--std", type=float, default=None,
                       help="the normalisation's standard deviation (series units)")  # fmt: skip
    group.add_argument(
        "--series", default=None, metavar="FILE.csv",
        help="the series: computes --mean/--std when not given (its whole column), feeds the"
             " check and computes the prediction intervals",
    )  # fmt: skip
    group.add_argument("--column", default=None, help="the CSV column of --series")
    group.add_argument(
        "--transform", choices=("level", "diff"), default=None,
        help="what the model reads: levels or first differences (default level)",
    )  # fmt: skip
    group.add_argument(
        "--season",
        type=int,
        default=None,
        help="seasonal differencing period the model reads (default 0: none)",
    )
    group.add_argument(
        "--tau", type=int, default=None,
        help="the model's window (default: from the graph; 1 for rnn/gru/lstm)",
    )  # fmt: skip
    group.add_argument(
        "--residual-std", type=residual_stds, default=None, metavar="S[,S2,...]",
        help="the k-step residual standard deviations for the 90%% intervals (default: computed"
             " from --series)",
    )  # fmt: skip


def refuse_across_tasks(args: argparse.Namespace) -> None:
    """The other task's flags, typed with this one, are refused by name (not ignored)."""
    argv = getattr(args, "argv", None) or []
    if args.task == "forecast":
        refuse_unused(argv, {"language models (--task lm)": LM_FLAGS}, "--task forecast")
        return
    refuse_unused(argv, {"forecasters (--task forecast)": FORECAST_FLAGS}, "a language model",
                  "; add --task forecast to package a forecaster")  # fmt: skip
    missing = [f"--{d}" for d in ("vocab", "tokenizer") if getattr(args, d) is None]
    if missing:  # required by argparse before forecasters were packaged too
        hint = " (a forecaster: add --task forecast)" if len(missing) == 2 else ""
        raise TrainerError(f"a language model needs {' and '.join(missing)}{hint}")


def run(args: argparse.Namespace) -> int:
    """`package --task forecast`: checks, writes, reports; returns 0."""
    from rnnserve.trainer.package_forecast import ForecastPackageRequest, package_forecaster

    request = ForecastPackageRequest(
        onnx_path=Path(args.onnx), out=Path(args.out), name=args.name, version=args.version,
        mean=args.mean, std=args.std, series=Path(args.series) if args.series else None,
        column=args.column, transform=args.transform or "level", season=args.season or 0,
        tau=args.tau, residual_std=args.residual_std, input_name=args.input,
        output_name=args.output, states=args.state, layout=args.layout, arch=args.arch,
        precision=args.precision,
    )  # fmt: skip
    path = package_forecaster(request)
    args.published = path  # written: a stdout closed from here on cuts only the report
    for note in request.notes:
        print(note)
    print(f"packaged {path}")
    return 0
