"""The CLI layer: forecast flags only for forecast runs; flags fill the dataclasses."""

from __future__ import annotations

import pytest

from rnnserve.trainer.cli import _wants_forecast, build_parser, main, recurrent_train_config
from rnnserve.trainer.recipe import CHAR


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--task", "forecast"], True),
        (["train", "--task=forecast"], True),
        (["train", "--arch", "mlp"], True),
        (["train", "--name", "forecast"], False),
        (["train", "--arch", "lstm", "--name", "mlp"], False),
    ],
)
def test_forecast_detection(argv: list[str], expected: bool) -> None:
    assert _wants_forecast(argv) is expected


def test_lm_defaults_are_not_changed_by_the_forecast_flags() -> None:
    args = build_parser(["train"]).parse_args(["train", "--name", "forecast"])
    assert (args.arch, args.hidden, args.lr) == ("lstm", CHAR.hidden, CHAR.lr)  # the recipe's
    assert recurrent_train_config(args).epochs == CHAR.epochs


def test_unknown_arch_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--arch", "transformer", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown arch") and err.count("\n") == 1


def test_train_flags_are_not_abbreviated(capsys: pytest.CaptureFixture[str]) -> None:
    """--npro would reach torchrun's workers as written, where --nproc is taken out by name."""
    from rnnserve.trainer import cli

    with pytest.raises(SystemExit):
        cli.build_parser(["train"]).parse_args(["train", "--npro", "2"])
