"""make_optimizer: --weight-decay is decoupled with Adam (AdamW) and plain L2 with SGD."""

from __future__ import annotations

import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import RNNLM, ModelConfig
from rnnserve.trainer.train import TrainConfig, fit, make_optimizer


def _one_step(cfg: TrainConfig) -> float:
    """The weight after one step from 2.0 with a zero gradient: only the decay moves it."""
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    opt = make_optimizer(layer, cfg)
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt.step()
    return layer.weight.detach().item()


def test_adam_without_weight_decay_leaves_a_weight_with_no_gradient() -> None:
    assert _one_step(TrainConfig(lr=0.1)) == 2.0


def test_adam_with_weight_decay_is_adamw_shrinking_each_weight_by_lr_times_decay() -> None:
    assert isinstance(make_optimizer(torch.nn.Linear(1, 1), TrainConfig(weight_decay=0.5)),
                      torch.optim.AdamW)  # fmt: skip
    assert _one_step(TrainConfig(lr=0.1, weight_decay=0.5)) == pytest.approx(2.0 * (1 - 0.05))


def test_sgd_weight_decay_is_l2_on_the_gradient() -> None:
    got = _one_step(TrainConfig(lr=0.1, optimizer="sgd", weight_decay=0.5))
    assert got == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)


def test_negative_weight_decay_is_refused() -> None:
    with pytest.raises(TrainerError, match="--weight-decay"):
        TrainConfig(weight_decay=-0.1).validate()


@pytest.mark.parametrize("flag", ["clip", "weight_decay", "time_budget"])
def test_nan_settings_are_refused(flag: str) -> None:
    """NaN passed `< 0`: a NaN --clip silently turned clipping off, a NaN --time-budget
    crashed after the first epoch."""
    with pytest.raises(TrainerError, match="--" + flag.replace("_", "-")):
        TrainConfig(**{flag: float("nan")}).validate()


@pytest.mark.parametrize(("before", "after"), [(0.2, 0.0), (0.0, 0.2)])
def test_a_resumed_optimizer_takes_this_runs_weight_decay(before: float, after: float) -> None:
    """optimizer.load_state_dict brings the checkpoint's weight decay (and AdamW's decoupling):
    a run resumed with --weight-decay 0 went on decaying by 0.2, and the other way round."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("rnn", 9, hidden=4, embed=2))
    saved = make_optimizer(model, TrainConfig(weight_decay=before)).state_dict()
    cfg = TrainConfig(epochs=1, num_steps=4, batch_size=4, weight_decay=after)
    optimizer = make_optimizer(model, cfg)
    optimizer.load_state_dict(saved)  # what --resume does
    ids = [4 + i % 5 for i in range(120)]
    fit(model, ids[:100], ids[100:], cfg, optimizer=optimizer, progress=False, log=lambda *_: None)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == after
    assert group.get("decoupled_weight_decay", after > 0) == (after > 0)
