"""Backpropagation through time inside one window: full, truncated, or randomized.

full:      one forward pass over the window; gradients flow through all num_steps steps.
truncated: the window is run in chunks of `k` steps and the state is detached between
           chunks, so no gradient crosses a chunk boundary.
random:    Tallec & Ollivier (2017), d2l §9.7: before every step the chain to the previous
           state is kept with probability p and cut otherwise; a kept link's gradient is
           multiplied by 1/p. Each link's factor xi/p has mean 1 and the factors are
           independent, so the expected gradient equals the full one (unbiased), while most
           backward paths stop after a few steps.

The forward values are identical in all three modes (DropConnect, too, draws one mask per
window: `one_mask_per_window`); only the backward graph differs. Activation dropout draws its
masks per call, so with it on the modes draw different (equally valid) masks.
"""

from __future__ import annotations

import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import one_mask_per_window

BPTT_MODES = ("full", "truncated", "random")


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as x; the gradient flowing back through it is multiplied by `factor`."""
    if factor == 1.0:
        return x
    detached = x.detach()
    return detached + factor * (x - detached)


def run_window(
    model: torch.nn.Module,
    x: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    mode: str = "full",
    k: int = 8,
    p: float = 0.5,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Runs `model` over x [batch, time]; returns (logits [batch, time, vocab], final state)."""
    if mode == "full":
        out, *new_state = model(x, *state)
        return out, tuple(new_state)
    if mode == "truncated":
        if k < 1:
            raise TrainerError("--bptt-k must be at least 1")
        outs = []
        with one_mask_per_window(model):
            for start in range(0, x.shape[1], k):
                if start:
                    state = tuple(s.detach() for s in state)
                out, *rest = model(x[:, start : start + k], *state)
                state = tuple(rest)
                outs.append(out)
        return torch.cat(outs, dim=1), state
    if mode == "random":
        if not 0.0 < p <= 1.0:
            raise TrainerError(f"--bptt-p must be in (0, 1], got {p}")
        outs = []
        with one_mask_per_window(model):
            for t in range(x.shape[1]):
                if t:
                    keep = torch.rand((), generator=gen).item() < p
                    state = tuple(scale_grad(s, 1.0 / p) if keep else s.detach() for s in state)
                out, *rest = model(x[:, t : t + 1], *state)
                state = tuple(rest)
                outs.append(out)
        return torch.cat(outs, dim=1), state
    raise TrainerError(f"unknown --bptt {mode!r}; choose one of {', '.join(BPTT_MODES)}")
