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
    assert "weights averaged over epoch 2 alone" in capsys.readouterr().out


def test_a_one_epoch_average_is_the_last_epoch_and_is_validated_once(monkeypatch) -> None:
    """`--epochs 2 --average-from 2` said "averaged over epochs 2-2" and scored the same
    weights twice: a mean of one epoch is that epoch's weights, said so, scored once."""
    from rnnserve.trainer import train as train_module

    scored: list[int] = []

    def counted(*args, **kwargs):
        scored.append(1)
        return perplexity(*args, **kwargs)

    monkeypatch.setattr(train_module, "perplexity", counted)
    data = [0, 1, 2, 1] * 300, [0, 1, 2, 1] * 30
    lines: list[str] = []
    averaged_model, plain_model = _model(), _model()
    cfg = TrainConfig(epochs=2, num_steps=8, batch_size=8, average_from=2)
    averaged = fit(averaged_model, *data, cfg, progress=False, log=lines.append)
    assert len(scored) == 2  # once per epoch, not a third time for the "mean"
    assert "weights averaged over epoch 2 alone: the mean of one epoch is its own weights" in (
        "\n".join(lines)
    )
    assert not any("epochs 2-2" in line for line in lines)
    last = averaged[-1]
    assert last["averaged_epochs"] == 1 and "val_ppl_last_weights" not in last
    plain = fit(plain_model, *data, TrainConfig(epochs=2, num_steps=8, batch_size=8), **QUIET)
    assert last["val_ppl"] == plain[-1]["val_ppl"]
    for (name, a), b in zip(averaged_model.state_dict().items(),
                            plain_model.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name


def test_counts_of_one_epoch_are_singular() -> None:
    """Patience 1 stopped the run "for 1 epochs"."""
    train, val = [0, 1, 2] * 400, [2, 1, 0] * 40  # learning train makes val worse
    cfg = TrainConfig(epochs=12, num_steps=8, batch_size=8, lr=0.05, patience=1)
    last = fit(_model(), train, val, cfg, **QUIET)[-1]
    assert last["stopped"] == "early stopping: no better validation perplexity for 1 epoch"
