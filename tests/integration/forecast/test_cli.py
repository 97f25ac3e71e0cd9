"""`rnn-trainer train --task forecast` and the zoo's sine models, end to end in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rnnserve.trainer.cli import main
from rnnserve.trainer.forecast.zoo import build_forecast_models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "2", "--num-steps", "16", "--rollout", "2", "--hidden", "4", "--no-progress"]


def sine_csv(path: Path, n: int = 200, gap: bool = False) -> Path:
    t = np.arange(n)
    rows = [f"{i},{'' if gap and i == 50 else f'{np.sin(0.05 * i) + 3:.5f}'}" for i in t]
    path.write_text("t,level\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_train_csv_mlp_exports_package_with_metrics_and_plot(tmp_path: Path, capsys) -> None:
    csv = sine_csv(tmp_path / "s.csv", gap=True)
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--tau", "5", "--series", str(csv)]
    argv += ["--column", "level", "--out", str(tmp_path / "models"), "--name", "lvl", *TINY]
    argv += ["--transform", "diff", "--season", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "linear-ar" in out and "naive" in out and "drift" in out and "k=64" in out
    package = tmp_path / "models" / "lvl" / "1"
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["task"] == "forecast" and manifest["architecture"] == "mlp"
    horizons = ("k1", "k4", "k16", "k64")
    assert set(manifest["metrics"]) == {f"{m}_{k}" for m in ("mse", "mase") for k in horizons}
    # a CSV trains on all but a small validation tail (10 % of 200 is 20 values), and the
    # model learns normalised first differences of that part
    diffs = np.diff(np.sin(0.05 * np.arange(180)) + 3)
    assert manifest["series"]["representation"] == {"name": "diff", "difference": 1, "season": 0}
    assert manifest["series"]["tau"] == 5 + 1 and manifest["series"]["features"] == 1
    assert manifest["series"]["mean"] == pytest.approx(diffs.mean(), abs=1e-4)
    assert manifest["series"]["std"] == pytest.approx(diffs.std(), abs=1e-4)
    assert manifest["training"]["num_train"] == 180
    assert manifest["training"]["held_out"] == "validation"
    intervals = manifest["series"]["intervals"]
    assert len(intervals["lower"]) == 64 and all(
        lo <= hi for lo, hi in zip(intervals["lower"], intervals["upper"], strict=True)
    )
    # a k-step band is never narrower than the (k-1)-step one
    assert np.all(np.diff(intervals["lower"]) <= 0) and np.all(np.diff(intervals["upper"]) >= 0)
    assert (package / "forecast.png").read_bytes()[:8] == PNG_MAGIC


def test_train_csv_keeps_the_representation_its_validation_tail_prefers(tmp_path: Path) -> None:
    steps = np.random.default_rng(0).normal(0, 1, 200)
    csv = tmp_path / "walk.csv"  # a random walk: the ADF test calls for differences
    csv.write_text("t,level\n" + "\n".join(f"{i},{v:.5f}" for i, v in enumerate(steps.cumsum())))
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--series", str(csv), "--column"]
    argv += ["level", "--out", str(tmp_path / "models"), "--name", "walk", *TINY]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "models" / "walk" / "1" / "manifest.json").read_text())
    scores = manifest["training"]["representation_scores"]
    assert set(scores) == {"diff", "level"}
    chosen = min(scores, key=scores.get)
    assert manifest["training"]["representation"] == chosen
    assert manifest["series"]["representation"]["name"] == chosen  # what the server undoes


def test_textbook_manifest_is_strict_json(tmp_path: Path, capsys) -> None:
    """The textbook split has no validation tail, so no validation score: it used to be
    written as `Infinity`, which strict JSON readers (JavaScript, Go) refuse. Nor is the
    model compared with naive there (no note, no record): the test range is for the user."""
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--out", str(tmp_path), *TINY]
    assert main([*argv, "--name", "sine"]) == 0
    assert "note:" not in capsys.readouterr().out
    text = (tmp_path / "sine" / "1" / "manifest.json").read_text()

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    manifest = json.loads(text, parse_constant=refuse)
    assert manifest["training"]["representation_scores"] == {}
    assert "validation_vs_naive" not in manifest["training"]


def test_a_model_worse_than_naive_on_the_validation_tail_is_said_and_recorded(
    tmp_path: Path, capsys
) -> None:
    """A model that forecasts the tail worse than repeating the last value at every horizon
    (untuned infl and tbilrate in the README) was exported without a word: one `note:` line
    names the numbers and the backtest to run; the manifest records the comparison."""
    steps = np.random.default_rng(0).normal(0, 1, 200)
    csv = tmp_path / "walk.csv"  # a random walk: naive is the best forecast there is
    csv.write_text("t,level\n" + "\n".join(f"{i},{v:.5f}" for i, v in enumerate(steps.cumsum())))
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--series", str(csv), "--column"]
    argv += ["level", "--out", str(tmp_path / "models"), "--name", "walk", *TINY]
    assert main([*argv, "--transform", "diff", "--season", "0"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert "validation tail (20 values) the mlp forecasts worse than naive" in notes[0]
    assert f"rnn-trainer backtest --series {csv} --column level" in notes[0]
    manifest = json.loads((tmp_path / "models" / "walk" / "1" / "manifest.json").read_text())
    training = manifest["training"]
    record = training["validation_vs_naive"]
    assert record["worse_than"] == ["naive"] and set(record) == {"model", "naive", "worse_than"}
    assert record["naive"] == training["baselines"]["naive"]  # the same table, not a rescoring
    assert all(record["model"][k] > record["naive"][k] for k in record["naive"])
    for key, naive in record["naive"].items():  # the numbers the note names
        k, model = key.removeprefix("mse_k"), record["model"][key]
        assert f"k={k}: {model:.4g} vs naive {naive:.4g}" in notes[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--column", "nope"], "column 'nope' is not in"),
        (["--column", "level", "--missing", "error"], "missing value"),
        (["--column", "level", "--arch", "ngram"], "--task forecast needs --arch"),
        (["--column", "level", "--tau", "0"], "--tau must be at least 1"),
        (["--column", "level", "--corpus", "x.txt"], "not --corpus"),
        (["--column", "level", "--bidirectional"], "does not apply to forecasting"),
        (["--column", "level", "--rollout", "99"], "--rollout must be between"),
        (["--column", "level", "--warmup", "-3"], "--warmup must be at least 0"),
        (["--column", "level", "--lr", "inf"], "--lr must be a positive finite number"),
        (["--column", "level", "--lr", "0"], "--lr must be a positive finite number"),
        (["--column", "level", "--lr", "nan"], "--lr must be a positive finite number"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, extra: list[str], message) -> None:
    csv = sine_csv(tmp_path / "s.csv", gap=True)
    argv = ["train", "--task", "forecast", "--series", str(csv), "--out", str(tmp_path), *TINY]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "series-gru").exists()


def test_a_series_too_short_for_ar_tau_is_refused_before_training(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """AR(95) needs 191 values and the 200-value series trains on 180: refused at once, not
    after the model has trained."""
    from rnnserve.trainer.forecast import pipeline

    def trained(*args, **kwargs):
        raise AssertionError("the model trained before the baselines were fitted")

    monkeypatch.setattr(pipeline, "train_on_best_representation", trained)
    csv = sine_csv(tmp_path / "s.csv")
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--series", str(csv), "--column"]
    argv += ["level", "--tau", "95", "--out", str(tmp_path), *TINY]
    assert main(argv) == 2
    assert "to fit AR(95): least squares needs at least 191" in capsys.readouterr().err


@pytest.mark.slow
def test_zoo_tiny_builds_sine_mlp_and_sine_gru(tmp_path: Path) -> None:
    paths = build_forecast_models(tmp_path, "tiny")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["sine-mlp/1", "sine-gru/1"]
    taus = [json.loads((p / "manifest.json").read_text())["series"]["tau"] for p in paths]
    assert taus == [4, 1]
    only = build_forecast_models(tmp_path / "only", "tiny", only=["sine-gru", "lstm"])
    assert [p.name for p in only] == ["1"] and only[0].parent.name == "sine-gru"


def test_num_steps_below_the_default_rollout_trains(tmp_path: Path) -> None:
    """`--num-steps 16` alone failed on a default the user never set ("--rollout must be
    between 0 and --num-steps (16)"): the default rollout is cut to the windows; a rollout
    the user gives is still checked."""
    csv = sine_csv(tmp_path / "s.csv")
    argv = ["train", "--task", "forecast", "--series", str(csv), "--column", "level", "--out",
            str(tmp_path), "--epochs", "1", "--num-steps", "16", "--hidden", "4",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv, "--rollout", "17"]) == 2


@pytest.mark.parametrize("flag, value", [("--name", ""), ("--version", "v2")])
def test_a_name_or_version_the_server_cannot_serve_is_refused_before_training(
    tmp_path: Path, capsys, flag: str, value: str
) -> None:
    """--name "" replaced the zoo's sine-<arch>; --version v2 trained, then failed to export."""
    argv = ["train", "--task", "forecast", "--out", str(tmp_path), *TINY, flag, value]
    assert main(argv) == 2
    assert "error: " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_filled_cells_are_said_and_recorded(tmp_path: Path, capsys) -> None:
    """A CSV's missing cells were filled silently: the run says how many, of which column and
    how, and the manifest records it beside the series."""
    csv = sine_csv(tmp_path / "s.csv", gap=True)  # one gap, at row 50: before the tail
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--series", str(csv), "--column",
            "level", "--out", str(tmp_path / "models"), "--name", "gap", *TINY]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "missing cell" in line]
    assert said == [
        f"{csv}: filled 1 missing cell of column 'level': 1 before the validation tail by "
        "linear interpolation (--missing error refuses it)"
    ]
    manifest = json.loads((tmp_path / "models" / "gap" / "1" / "manifest.json").read_text())
    assert manifest["training"]["missing_filled"] == {
        "column": "level", "interpolated": 1, "repeated": 0,
    }  # fmt: skip


def test_a_rollout_above_the_automatic_num_steps_is_refused_naming_both(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """`--rollout 150` without --num-steps trained with a rollout of 100 (the automatic
    windows), silently: it is refused before training, naming both flags."""
    from rnnserve.trainer.forecast import pipeline

    def trained(*args, **kwargs):
        raise AssertionError("the model trained with a rollout it cut")

    monkeypatch.setattr(pipeline, "train_on_best_representation", trained)
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--epochs", "1", "--hidden", "4",
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main([*argv, "--rollout", "150"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --rollout 150 is above --num-steps, which is 100 here"), err
    assert "give --num-steps 150" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
