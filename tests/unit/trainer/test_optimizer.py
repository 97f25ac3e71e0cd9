"""make_optimizer: --weight-decay is decoupled with Adam (AdamW) and plain L2 with SGD."""

from __future__ import annotations

import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.train import TrainConfig, make_optimizer


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
