"""Model semantics: the lm is causal; the infill model never sees the token it predicts."""

from __future__ import annotations

import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import RNNLM, BiRNNInfill, ModelConfig, build_model

V, B, T = 11, 2, 9


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
def test_infill_logits_ignore_their_own_position(arch: str, layers: int) -> None:
    torch.manual_seed(0)
    model = BiRNNInfill(ModelConfig(arch, V, hidden=6, layers=layers, embed=4)).eval()
    x = torch.randint(0, V, (B, T))
    (base,) = model(x)
    t = 4
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % V
    (changed,) = model(y)
    torch.testing.assert_close(changed[:, t], base[:, t])  # own token: no influence
    assert (changed[:, t - 1] - base[:, t - 1]).abs().max() > 1e-6  # neighbours: influence
    assert (changed[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_lm_is_causal_and_state_continues(arch: str) -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(arch, V, hidden=6, layers=2, embed=4)).eval()
    x = torch.randint(0, V, (B, T))
    full, *_ = model(x, *model.initial_state(B))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % V
    changed, *_ = model(y, *model.initial_state(B))
    torch.testing.assert_close(changed[:, :5], full[:, :5])
    assert (changed[:, 5:] - full[:, 5:]).abs().max() > 1e-6
    first, *state = model(x[:, :4], *model.initial_state(B))
    rest, *_ = model(x[:, 4:], *state)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)


def test_state_specs_match_initial_state() -> None:
    model = build_model(ModelConfig("lstm", V, hidden=6, layers=3, embed=4))
    specs = model.state_specs()
    assert [s.name for s in specs] == ["h", "c"]
    for spec, tensor in zip(specs, model.initial_state(5), strict=True):
        assert tensor.shape[spec.batch_axis] == 5
        assert [d for i, d in enumerate(spec.shape) if i != spec.batch_axis] == [3, 6]
    assert build_model(ModelConfig("gru", V, bidirectional=True)).state_specs() == []


def test_unknown_arch_is_a_trainer_error() -> None:
    with pytest.raises(TrainerError, match="unknown arch"):
        ModelConfig("transformer", V)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_weight_drop_masks_recurrent_weights_only_while_training(
    arch: str, bidirectional: bool
) -> None:
    torch.manual_seed(0)
    plain = build_model(
        ModelConfig(arch, V, hidden=6, layers=2, embed=4, bidirectional=bidirectional)
    )
    config = ModelConfig(arch, V, 6, 2, 4, bidirectional, weight_drop=0.5)
    dropped = build_model(config)
    dropped.load_state_dict(plain.state_dict())  # the same parameters, the same names
    x = torch.randint(0, V, (B, T))
    state = [] if bidirectional else plain.initial_state(B)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x, *state)[0], plain(x, *state)[0])  # eval: no mask
    plain.train(), dropped.train()
    out = dropped(x, *state)[0]
    assert (out - plain(x, *state)[0]).abs().max() > 1e-4  # training: masked recurrence
    out.sum().backward()
    hidden_to_hidden = [p for n, p in dropped.named_parameters() if "weight_hh" in n]
    assert hidden_to_hidden and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in hidden_to_hidden
    )


def test_weight_drop_must_be_a_probability() -> None:
    with pytest.raises(TrainerError, match="weight_drop"):
        ModelConfig("gru", V, weight_drop=1.0)
