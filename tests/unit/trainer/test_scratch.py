"""Scratch cells vs torch.nn with the same weights, and each GRU variant vs its own equation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnserve.trainer.scratch import ScratchStack

B, T, IN, H = 3, 7, 5, 4


def _pair(arch: str, layers: int, reset_after: bool = True):
    torch.manual_seed(0)
    fast = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[arch](IN, H, layers, batch_first=True)
    with torch.no_grad():  # non-zero biases so a bias mix-up shows
        for name, p in fast.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    scratch = ScratchStack(arch, IN, H, layers, reset_after).load_from_torch(fast)
    return fast, scratch


def _state(arch: str, layers: int):
    h = torch.randn(layers, B, H)
    return (h, torch.randn(layers, B, H)) if arch == "lstm" else h


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
def test_scratch_equals_torch_nn(arch: str, layers: int) -> None:
    fast, scratch = _pair(arch, layers)
    x = torch.randn(B, T, IN)
    state = _state(arch, layers)
    want_out, want_state = fast(x, state)
    got_out, got_state = scratch(x, state)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    flat = lambda s: s if isinstance(s, tuple) else (s,)  # noqa: E731
    for g, w in zip(flat(got_state), flat(want_state), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _gru_step_by_equation(layer, x, h, reset_after: bool):
    """The GRU equations written out once more, straight from the weights."""
    p = {n: v.detach() for n, v in layer.named_parameters()}
    r = torch.sigmoid(x @ p["W_xr"] + p["b_xr"] + h @ p["W_hr"] + p["b_hr"])
    z = torch.sigmoid(x @ p["W_xz"] + p["b_xz"] + h @ p["W_hz"] + p["b_hz"])
    if reset_after:
        cand = torch.tanh(x @ p["W_xh"] + p["b_xh"] + r * (h @ p["W_hh"] + p["b_hh"]))
    else:
        cand = torch.tanh(x @ p["W_xh"] + p["b_xh"] + (r * h) @ p["W_hh"] + p["b_hh"])
    return z * h + (1 - z) * cand


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_variants_follow_their_own_equation(reset_after: bool) -> None:
    fast, scratch = _pair("gru", 1, reset_after)
    x, h = torch.randn(B, IN), torch.randn(B, H)
    got, _ = scratch.layers[0].step(x, h)
    torch.testing.assert_close(got, _gru_step_by_equation(scratch.layers[0], x, h, reset_after))
    torch_h = fast(x[:, None], h[None])[1][0]
    if reset_after:
        torch.testing.assert_close(got, torch_h, atol=1e-5, rtol=1e-5)
    else:  # the textbook GRU is a different function from torch.nn.GRU
        assert (got - torch_h).abs().max() > 1e-3


def test_textbook_gru_single_bias_equivalence() -> None:
    """Reset before the product: b_xh + b_hh act as the textbook's single bias b_h."""
    _, scratch = _pair("gru", 1, reset_after=False)
    layer = scratch.layers[0]
    x, h = torch.randn(B, IN), torch.randn(B, H)
    before, _ = layer.step(x, h)
    with torch.no_grad():
        layer.b_xh += layer.b_hh
        layer.b_hh.zero_()
    after, _ = layer.step(x, h)
    torch.testing.assert_close(before, after)
