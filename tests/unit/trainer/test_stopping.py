"""Early stopping, the time budget and weight averaging as pure rules (the training loop uses
them as is)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rnnserve.trainer.averaging import WeightAverage
from rnnserve.trainer.early_stopping import EarlyStopping
from rnnserve.trainer.models import RNNLM, ModelConfig
from rnnserve.trainer.time_budget import (
    NO_LIMIT,
    TimeBudget,
    decay_steps,
    further_epochs,
    scaled_average_from,
)
from rnnserve.trainer.train import TrainConfig, fit


def _observed(stopper: EarlyStopping) -> tuple[torch.nn.Linear, EarlyStopping]:
    """Epochs 1-3 at perplexities 5.0, 4.0, 4.5; each epoch's weights are filled with its
    number, so the best (epoch 2) reads 2.0."""
    model = torch.nn.Linear(2, 1)
    for epoch, ppl in enumerate([5.0, 4.0, 4.5], start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        stopper.observe(epoch, ppl, model)
    return model, stopper


def test_early_stopping_counts_epochs_since_the_best_and_keeps_its_weights() -> None:
    model, stopper = _observed(EarlyStopping(patience=2))
    assert (stopper.best_epoch, stopper.epochs_since_best, stopper.should_stop()) == (2, 1, False)
    stopper.observe(4, 4.0, model)  # equal is not better
    assert stopper.should_stop()
    assert not stopper.restore_if_better(model, 3.9)  # the model's own is better: kept
    assert model.weight[0, 0].item() == 3.0
    assert stopper.restore_if_better(model, 4.2)
    assert model.weight[0, 0].item() == 2.0  # epoch 2's weights


def test_no_patience_never_stops_and_keeps_no_copy() -> None:
    stopper = EarlyStopping(patience=0)
    model = torch.nn.Linear(2, 1)
    for epoch in range(1, 10):
        stopper.observe(epoch, float(epoch), model)
    assert not stopper.should_stop() and stopper.best_state is None
    assert not stopper.restore_if_better(model, 100.0)


def test_replay_rebuilds_the_counters_of_a_resumed_run() -> None:
    stopper = EarlyStopping(patience=2)
    stopper.replay([{"epoch": 1, "val_ppl": 5.0}, {"epoch": 2, "val_ppl": 4.0},
                    {"epoch": 3, "val_ppl": 4.1}, {"epoch": 4, "val_ppl": 4.2}])  # fmt: skip
    assert (stopper.best_epoch, stopper.best_ppl) == (2, 4.0) and stopper.should_stop()
    assert stopper.best_state is None  # weights from before the resume are not restorable


def test_the_state_with_the_best_weights_survives_a_weights_only_checkpoint(
    tmp_path: Path,
) -> None:
    model, stopper = _observed(EarlyStopping(patience=3))
    torch.save({"early_stopping": stopper.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["early_stopping"]
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(saved)
    assert (resumed.best_epoch, resumed.best_ppl, resumed.epochs_since_best) == (2, 4.0, 1)
    assert resumed.restore_if_better(model, 4.5) and model.weight[0, 0].item() == 2.0
    without = EarlyStopping(patience=0)  # no patience keeps no copy, resumed or not
    without.load_state_dict(saved)
    assert without.best_state is None and without.best_epoch == 2


def test_further_epochs_fit_the_budget_at_the_slowest_pace() -> None:
    assert further_epochs(0, 1e9, 1e9) == NO_LIMIT
    assert further_epochs(100, 40, 20) == 3
    assert further_epochs(100, 85, 20) == 0
    assert further_epochs(100, 100, 0) == 0
    assert further_epochs(100, 10, 0) == NO_LIMIT


def test_an_infinite_budget_is_no_limit_not_an_overflow() -> None:
    """math.floor(inf) raised OverflowError after the first epoch of --time-budget inf."""
    assert further_epochs(math.inf, 30, 10) == NO_LIMIT
    assert further_epochs(1e300, 30, 1e-300) == NO_LIMIT  # a quotient past any int: no limit


def test_fit_with_an_infinite_time_budget_runs_every_epoch() -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("rnn", 9, hidden=4, embed=2))
    ids = [4 + i % 5 for i in range(300)]
    cfg = TrainConfig(epochs=2, num_steps=4, batch_size=4, time_budget=math.inf)
    history = fit(model, ids[:250], ids[250:], cfg, progress=False, log=lambda *_: None)
    assert [r["epoch"] for r in history] == [1, 2] and "stopped" not in history[-1]


def test_a_shortened_run_averages_the_same_share() -> None:
    assert scaled_average_from(13, 24, 24) == 13
    assert scaled_average_from(13, 24, 12) == 7  # half of 12 epochs: 7..12
    assert scaled_average_from(13, 24, 1) == 1
    assert scaled_average_from(0, 24, 12) == 0


def test_a_cut_run_stretches_its_learning_rate_schedule_to_end_where_planned() -> None:
    assert [decay_steps(e, 24, 24) for e in (1, 2, 24)] == [0, 1, 23]  # no cut: as planned
    assert [decay_steps(e, 24, 12) for e in (1, 12)] == [0, 23]  # cut at 12: ends at 0.9**23
    assert decay_steps(6, 24, 12) == 5 * 23 / 11
    assert decay_steps(3, 24, 1) == 2  # no estimate yet (or one epoch): unchanged
    assert decay_steps(20, 24, 12) == 23  # past a stale estimate: never beyond the plan


def test_time_budget_measures_the_slowest_epoch() -> None:
    now = [0.0]
    budget = TimeBudget(60, clock=lambda: now[0])
    for seconds in (10.0, 14.0, 12.0):
        budget.epoch_started()
        now[0] += seconds
        budget.epoch_ended()
    assert budget.slowest_epoch == 14.0 and budget.elapsed() == 36.0
    assert further_epochs(budget.seconds, budget.elapsed(), budget.slowest_epoch) == 1


def test_a_resumed_average_follows_the_model_to_its_device() -> None:
    """A checkpointed mean loads on the CPU; a run resumed on a GPU (here: the meta device,
    which also refuses to mix with CPU tensors) failed at its first averaged epoch."""
    model = torch.nn.Linear(2, 1)
    saved = WeightAverage()
    saved.update(model)
    resumed = WeightAverage()
    resumed.load_state_dict(saved.state_dict())
    model.to("meta")
    resumed.update(model)
    assert resumed.count == 2 and resumed.mean["weight"].device.type == "meta"
