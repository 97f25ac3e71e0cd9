"""`rnn-trainer backtest` end to end, and a learned model beating naive on a real series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rnnserve.trainer.cli import main
from rnnserve.trainer.forecast.backtest import backtest
from rnnserve.trainer.forecast.series import load_csv
from rnnserve.trainer.forecast.train import ForecastTrainConfig

DATA = Path(__file__).resolve().parents[3] / "bench" / "data"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_backtest_cli_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    short = tmp_path / "elnino.csv"  # the last 20 years of monthly temperatures
    lines = (DATA / "elnino.csv").read_text().splitlines()
    short.write_text("\n".join([lines[0], *lines[-240:]]) + "\n")
    argv = ["backtest", "--series", str(short), "--column", "temperature", "--arch", "mlp"]
    argv += ["gru", "--epochs", "3", "--hidden", "4", "--out-dir", str(tmp_path / "bt")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("mlp", "gru", "naive", "seasonal-naive", "drift", "linear-ar"):
        assert f"| {name}" in out
    assert "MASE@16" in out and "sMAPE@4" in out and "MSE@1" in out
    report = json.loads((tmp_path / "bt" / "temperature.json").read_text())
    assert report["season"] == 12 and report["test_size"] == 48
    assert set(report["scores"]["gru"]) == {"1", "4", "16"}
    assert set(report["scores"]["gru"]["16"]) == {"mase", "smape", "mse"}
    assert (tmp_path / "bt" / "temperature.png").read_bytes()[:8] == PNG_MAGIC


def test_backtest_cli_refuses_bad_input(tmp_path: Path, capsys) -> None:
    argv = ["backtest", "--series", str(DATA / "nile.csv"), "--column", "volume"]
    assert main([*argv, "--test-size", "100", "--out-dir", str(tmp_path)]) == 2
    assert "--test-size must be in [1, 99]" in capsys.readouterr().err
    assert main([*argv, "--season", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--season must be auto, 0" in capsys.readouterr().err
    # --hidden 0 is refused like `train` refuses it, not read as "the default"
    assert main([*argv, "--arch", "mlp", "--hidden", "0", "--out-dir", str(tmp_path)]) == 2
    assert "--hidden >= 1" in capsys.readouterr().err
    # --lr 0 trained nothing; inf trained NaN weights, reported "best model mlp nan", exit 0
    for lr in ("0", "inf", "nan", "-1"):
        quick = [*argv, "--arch", "mlp", "--epochs", "1", "--no-plot", "--lr", lr]
        assert main([*quick, "--out-dir", str(tmp_path)]) == 2
        assert "--lr must be a positive finite number" in capsys.readouterr().err


def test_backtest_errors_say_what_the_backtest_needs(tmp_path: Path, capsys) -> None:
    short = tmp_path / "short.csv"  # 30 values: 16 test, 14 left to train and validate
    short.write_text("v\n" + "\n".join(str(v) for v in np.sin(np.arange(30.0))) + "\n")
    argv = ["backtest", "--series", str(short), "--column", "v", "--arch", "mlp"]
    assert main([*argv, "--out-dir", str(tmp_path / "bt")]) == 2
    err = capsys.readouterr().err  # not "has 14 values" alone: the file has 30
    assert "short.csv:v (before the test window of 16) has 14 values" in err
    # an output directory that cannot be created fails before any training
    blocker = tmp_path / "file"
    blocker.write_text("")
    long = ["backtest", "--series", str(DATA / "nile.csv"), "--column", "volume"]
    assert main([*long, "--arch", "mlp", "--out-dir", str(blocker / "bt")]) == 2
    captured = capsys.readouterr()
    assert "cannot write" in captured.err and "trained" not in captured.out


def test_backtest_file_names_from_a_column_with_a_slash(tmp_path: Path) -> None:
    csv = tmp_path / "load.csv"  # the column name is not a path: kWh/day.json would be in kWh/
    csv.write_text("kWh/day\n" + "\n".join(str(v) for v in np.sin(np.arange(120.0))) + "\n")
    argv = ["backtest", "--series", str(csv), "--column", "kWh/day", "--arch", "mlp"]
    argv += ["--epochs", "1", "--hidden", "4", "--season", "0", "--out-dir", str(tmp_path / "bt")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "bt" / "kWh_day.json").read_text())["series"].endswith("day")
    assert (tmp_path / "bt" / "kWh_day.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_gru_beats_naive_on_co2_at_16_weeks() -> None:
    """Weekly CO2 rises ~1.5 ppm a year with a seasonal swing: naive misses both, a GRU on
    seasonal differences learns them in a few seconds (fixed seed)."""
    values = load_csv(DATA / "co2.csv", "co2")[-900:]
    config = ForecastTrainConfig(arch="gru", hidden=16, epochs=30, num_steps=None, seed=0)
    result = backtest(values, "co2", {"gru": config}, test_size=120, log=lambda _: None)
    assert result.representation.startswith("seasonal-diff(52)")
    assert result.scores["gru"][16]["mase"] < 0.7 * result.scores["naive"][16]["mase"]
    assert result.scores["gru"][16]["mase"] < result.scores["seasonal-naive"][16]["mase"]


def test_backtest_records_the_representation_each_model_chose(tmp_path: Path) -> None:
    """On the Nile the ADF test calls for differences; each model also tries levels and
    the report says which one its validation tail kept, with both scores."""
    argv = ["backtest", "--series", str(DATA / "nile.csv"), "--column", "volume"]
    argv += ["--arch", "mlp", "--epochs", "4", "--hidden", "4", "--no-plot"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "volume.json").read_text())
    assert report["representation"] == "diff"
    scores = report["validation_scores"]["mlp"]
    assert set(scores) == {"diff", "level"}
    assert report["representations"]["mlp"] == min(scores, key=scores.get)


def test_backtest_ignores_empty_cells_after_the_last_value(tmp_path: Path, capsys) -> None:
    """Rows of dates still to come (an empty value) were filled by repeating the last value:
    they took 20 % of the test window's places and were never scored."""
    rows = [f"d{i},{np.sin(0.4 * i) + 0.01 * i:.5f}" for i in range(120)]
    csv = tmp_path / "load.csv"
    csv.write_text("date,load\n" + "\n".join(rows + [f"d{i}," for i in range(120, 125)]) + "\n")
    argv = ["backtest", "--series", str(csv), "--column", "load", "--arch", "mlp", "--epochs"]
    argv += ["1", "--hidden", "4", "--season", "0", "--no-plot", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ignored 5 empty cells after its last value in column 'load'" in out
    assert "missing values filled" not in out
    report = json.loads((tmp_path / "load.json").read_text())
    assert (report["num_values"], report["test_size"]) == (120, 24)
    assert report["missing_filled"] == {
        "column": "load", "interpolated": 0, "repeated": 0, "leading": 0, "trailing": 5,
    }  # fmt: skip


def test_backtest_report_records_the_missing_cells_it_filled(tmp_path: Path, capsys) -> None:
    """The line said how many missing values were filled, but the JSON report did not keep
    the count: it is `missing_filled`, in manifest.training's shape."""
    cells = [f"{np.sin(0.4 * i) + 0.01 * i:.5f}" for i in range(120)]
    for i in (40, 41, 100, 110, 111):  # 2 before the test window (the last 24), 3 in it
        cells[i] = ""
    csv = tmp_path / "load.csv"
    csv.write_text("date,load\n" + "\n".join(f"d{i},{c}" for i, c in enumerate(cells)) + "\n")
    argv = ["backtest", "--series", str(csv), "--column", "load", "--arch", "mlp", "--epochs"]
    argv += ["1", "--hidden", "2", "--season", "0", "--no-plot", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "5 missing values filled from the past only" in capsys.readouterr().out
    report = json.loads((tmp_path / "load.json").read_text())
    assert report["missing_filled"] == {"column": "load", "interpolated": 2, "repeated": 3}
