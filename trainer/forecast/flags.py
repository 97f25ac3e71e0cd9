"""Flags that `train --task forecast` and `backtest` share, light enough to import while
the parser is built (no torch): the representation, the season and the validation tail."""

from __future__ import annotations

import argparse

from rnnserve.trainer.forecast.representation import TRANSFORMS

MLP_HIDDEN, RECURRENT_HIDDEN = 10, 32  # --hidden defaults: the textbook's MLP, the RNNs


def season_flag(text: str) -> int | None:
    """`--season auto` -> None (detect), otherwise the period (0 = none)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def add_series_arguments(group) -> None:
    """The representation and validation flags `train` and `backtest` share."""
    group.add_argument(
        "--transform",
        default=None,
        choices=TRANSFORMS,
        help="what the model learns: level, diff (first differences) or auto (diff when the "
        "ADF test finds a unit root, unless the validation tail prefers levels; default, "
        "except level for the textbook split)",
    )
    group.add_argument(
        "--season",
        type=season_flag,
        default=None,
        help="seasonal period m for seasonal differencing and the seasonal-naive baseline: "
        "auto (from the autocorrelation; default), 0 (none) or m >= 2",
    )
    group.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="validation tail for early stopping (default 10%% of the series, 16 to 64)",
    )
    group.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="after early stopping, skip the short training pass over the whole series",
    )
