"""`train --task forecast` with the language models' flags, as a new user gave them: each was
accepted and silently ignored (the test failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.trainer.cli import main


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (["--optimizer", "sgd"], "--optimizer applies"),
        (["--time-budget=60", "--dropout", "0.3"], "--dropout, --time-budget apply"),
        (["--threads", "2"], "--threads applies"),
        (["--max-tokens", "500"], "--max-tokens applies"),
        (["--dist-timeout", "30"], "--dist-timeout applies"),  # forecasting trains in one process
    ],
)
def test_text_model_flags_are_refused_not_ignored(
    tmp_path: Path, capsys, given: list[str], named: str
) -> None:
    """`--task forecast --optimizer sgd` trained with Adam, `--time-budget 60` set no budget."""
    out = tmp_path / "models"
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--epochs", "1", "--no-progress",
            "--out", str(out), *given]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named} to the language models, not to --task forecast"), err
    assert not out.exists()


def test_the_forecast_flags_still_train(tmp_path: Path, capsys) -> None:
    argv = ["train", "--arch", "mlp", "--epochs", "1", "--no-progress", "--hidden", "4",
            "--lr", "0.01", "--clip", "2", "--seed", "3", "--batch-size", "8",
            "--num-steps", "20", "--out", str(tmp_path / "models"), "--name", "f"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "models" / "f" / "1" / "model.onnx").is_file()
