"""BPTT modes: same forward values; randomized truncation's gradient averages to the full one."""

from __future__ import annotations

import pytest
import torch

from rnnserve.trainer.bptt import run_window, scale_grad
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import RNNLM, ModelConfig
from rnnserve.trainer.train import TrainConfig

T = 6


def _setup(arch: str = "rnn"):
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(arch, vocab_size=7, hidden=5, layers=1, embed=3))
    x = torch.randint(0, 7, (2, T))
    y = torch.randint(0, 7, (2, T))
    return model, x, y


def _grad(model, x, y, mode: str, **kw) -> torch.Tensor:
    model.zero_grad()
    logits, _ = run_window(model, x, model.initial_state(2), mode, **kw)
    # only the last step's loss: its gradient reaches back through every link
    torch.nn.functional.cross_entropy(logits[:, -1], y[:, -1]).backward()
    return torch.cat([p.grad.flatten() for p in model.rnn.parameters()])


def test_scale_grad_keeps_value_scales_gradient() -> None:
    w = torch.tensor([2.0], requires_grad=True)
    out = scale_grad(w * 3, 0.25)
    assert out.item() == 6.0
    out.backward()
    assert w.grad.item() == pytest.approx(0.75)


@pytest.mark.parametrize("mode", ["truncated", "random"])
def test_modes_have_the_same_forward_values(mode: str) -> None:
    model, x, _ = _setup("lstm")
    want, want_state = run_window(model, x, model.initial_state(2), "full")
    got, got_state = run_window(model, x, model.initial_state(2), mode, k=2, p=0.3,
                                gen=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(got, want)
    for g, w in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", ["truncated", "random"])
def test_dropconnect_draws_one_mask_per_window_in_every_mode(mode: str) -> None:
    """With DropConnect on (training), chunked and per-step runs use the full run's mask:
    drawn from the same seed they give the same values."""
    torch.manual_seed(1)
    config = ModelConfig("gru", vocab_size=7, hidden=5, layers=2, embed=3, weight_drop=0.5)
    model = RNNLM(config).train()
    x = torch.randint(0, 7, (2, T))
    torch.manual_seed(7)
    want, _ = run_window(model, x, model.initial_state(2), "full")
    torch.manual_seed(7)
    got, _ = run_window(model, x, model.initial_state(2), mode, k=2, p=0.3,
                        gen=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(got, want)
    assert not hasattr(model.rnn, "_window_weight_drop")  # the window's mask is gone after


def test_truncation_changes_the_gradient() -> None:
    model, x, y = _setup()
    full = _grad(model, x, y, "full")
    trunc = _grad(model, x, y, "truncated", k=2)
    assert (full - trunc).norm() > 1e-3 * full.norm()


@pytest.mark.parametrize("k", [1, 2, 4, T + 3])
def test_truncated_gradient_equals_a_manual_detach_every_k_steps(k: int) -> None:
    """The loss over every step, so each chunk boundary changes the gradient: it must be
    exactly the one of a step-by-step run whose state is detached before steps k, 2k, ..."""
    model, x, y = _setup("lstm")

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 7), y.reshape(-1))

    model.zero_grad()
    loss(run_window(model, x, model.initial_state(2), "truncated", k=k)[0]).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    state, outs = model.initial_state(2), []
    for t in range(T):
        if t and t % k == 0:
            state = tuple(s.detach() for s in state)
        out, *state = model(x[:, t : t + 1], *state)
        outs.append(out)
    loss(torch.cat(outs, dim=1)).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_random_truncation_is_unbiased() -> None:
    """Mean of N randomized-truncation gradients -> the full gradient (law of large numbers).

    The tolerance is 4 standard errors of the mean per coordinate, from the sample itself; a
    biased estimator (e.g. dropping the 1/p reweighting) fails it (checked below).
    """
    model, x, y = _setup()
    full = _grad(model, x, y, "full")
    gen = torch.Generator().manual_seed(123)
    n = 600
    samples = torch.stack([_grad(model, x, y, "random", p=0.5, gen=gen) for _ in range(n)])
    mean, sem = samples.mean(0), samples.std(0) / n**0.5
    assert torch.all((mean - full).abs() <= 4 * sem + 1e-6)
    # without the reweighting the same test must fail: it detects bias
    trunc = _grad(model, x, y, "truncated", k=1)  # every link cut: the most biased estimate
    assert not torch.all((trunc - full).abs() <= 4 * sem + 1e-6)


def test_bad_bptt_settings_are_clear_errors() -> None:
    model, x, _ = _setup()
    with pytest.raises(TrainerError, match="bptt"):
        run_window(model, x, model.initial_state(2), "sideways")
    with pytest.raises(TrainerError, match="bptt-p"):
        run_window(model, x, model.initial_state(2), "random", p=0.0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"bptt": "truncated", "bptt_k": 0}, "--bptt-k"),
        ({"bptt": "random", "bptt_p": 0.0}, "--bptt-p"),
        ({"bptt": "random", "bptt_p": float("nan")}, "--bptt-p"),
    ],
)
def test_bad_bptt_settings_are_refused_with_the_other_flags(flags: dict, message: str) -> None:
    """TrainConfig.validate, which train runs before it reads the corpus and makes the run
    dir: run_window refused them only at the first batch, after both."""
    with pytest.raises(TrainerError, match=message):
        TrainConfig(**flags).validate()
    TrainConfig(bptt="full", bptt_k=0, bptt_p=0.0).validate()  # unused by full: not refused
