"""The recipe's stopping rules inside the real training loop, on tiny data (seconds)."""

from __future__ import annotations

import math

import torch

from rnnserve.trainer.models import ModelConfig, build_model
from rnnserve.trainer.train import TrainConfig, fit, perplexity

CPU = torch.device("cpu")
QUIET = {"progress": False, "log": lambda *_: None}


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig("gru", 3, hidden=8, embed=4))


def test_early_stopping_ends_an_overfitting_run_on_its_best_weights() -> None:
    train, val = [0, 1, 2] * 400, [2, 1, 0] * 40  # learning train makes val worse
    model = _model()
    cfg = TrainConfig(epochs=12, num_steps=8, batch_size=8, lr=0.05, patience=2)
    history = fit(model, train, val, cfg, **QUIET)
    last = history[-1]
    assert len(history) < cfg.epochs and last["stopped"].startswith("early stopping")
    best = min(history[:-1], key=lambda r: r["val_ppl"])
    assert last["restored_epoch"] == best["epoch"] and last["val_ppl"] == best["val_ppl"]
    assert last["val_ppl_final_weights"] > last["val_ppl"]
    assert math.isclose(perplexity(model, val, CPU), best["val_ppl"], rel_tol=1e-6)


def test_a_restored_epoch_reports_its_own_train_perplexity() -> None:
    """The last record (and so the manifest) paired the restored epoch's val ppl with the
    last epoch's train ppl: numbers of two different models."""
    train, val = [0, 1, 2] * 400, [2, 1, 0] * 40
    cfg = TrainConfig(epochs=12, num_steps=8, batch_size=8, lr=0.05, patience=2)
    history = fit(_model(), train, val, cfg, **QUIET)
    last = history[-1]
    best = next(r for r in history if r["epoch"] == last["restored_epoch"])
    assert best is not last and last["train_ppl"] == best["train_ppl"]
    assert last["train_ppl_final_weights"] < best["train_ppl"]  # the overfit last epoch's


def test_early_stopping_waits_while_the_weights_are_averaged() -> None:
    train, val = [0, 1, 2] * 400, [2, 1, 0] * 40
    cfg = TrainConfig(epochs=6, num_steps=8, batch_size=8, lr=0.05, patience=1, average_from=2)
    history = fit(_model(), train, val, cfg, **QUIET)
    assert len(history) == 6 and "stopped" not in history[-1]
    assert history[-1]["averaged_epochs"] == 5


def test_the_time_budget_ends_the_run_and_averages_the_same_share() -> None:
    train, val = [0, 1, 2, 1] * 300, [0, 1, 2, 1] * 30
    model = _model()
    cfg = TrainConfig(epochs=8, num_steps=8, batch_size=8, average_from=5, time_budget=1e-6)
    history = fit(model, train, val, cfg, **QUIET)
    (only,) = history  # the first epoch already used the budget
    assert only["stopped"].startswith("time budget")
    assert only["averaged_epochs"] == 1  # half of the one epoch run
    unlimited = fit(_model(), train, val, TrainConfig(epochs=2, num_steps=8, batch_size=8,
                                                      time_budget=0), **QUIET)  # fmt: skip
    assert len(unlimited) == 2


def test_the_default_recipe_trains_and_exports_through_the_cli(tmp_path, capsys) -> None:
    """No tuning flags but a short corpus and 2 epochs: the recipe's 512-wide model with
    dropout, sequential windows and averaging trains, passes the export check and says so."""
    import json

    from rnnserve.artifact.manifest import Manifest
    from rnnserve.trainer import cli
    from rnnserve.trainer.recipe import CHAR

    run, out = tmp_path / "run", tmp_path / "models"
    code = cli.main(["train", "--max-tokens", "4000", "--epochs", "2", "--out", str(out),
                     "--run-dir", str(run), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = Manifest.load(out / "lstm" / "1")
    assert manifest.hyperparameters["hidden"] == CHAR.hidden
    assert manifest.hyperparameters["dropout"] == CHAR.dropout
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["averaged_epochs"] == 1
    assert "weights averaged over epochs 2-2" in capsys.readouterr().out
