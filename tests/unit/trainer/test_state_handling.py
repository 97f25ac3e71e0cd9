"""How fit() hands the recurrent state from batch to batch under each sampling scheme."""

from __future__ import annotations

import torch

from rnnserve.trainer.models import RNNLM, ModelConfig
from rnnserve.trainer.train import TrainConfig, fit


class Spy(RNNLM):
    """Records the state each training call receives and the state it returns."""

    def __init__(self) -> None:
        super().__init__(ModelConfig("gru", 10, hidden=4, embed=3))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def forward(self, tokens, *state):
        out, h = super().forward(tokens, *state)
        if self.training:
            self.calls.append((state[0].clone(), h.detach().clone(), state[0].requires_grad))
        return out, h


def _run(sampling: str) -> Spy:
    torch.manual_seed(0)
    spy = Spy()
    ids = [(i * 3) % 10 for i in range(400)]
    cfg = TrainConfig(epochs=2, num_steps=5, batch_size=4, sampling=sampling)
    fit(spy, ids, ids[:50], cfg, progress=False, log=lambda *_: None)
    return spy


def test_sequential_carries_state_detached_and_resets_each_epoch() -> None:
    spy = _run("sequential")
    fresh = 0
    for i, (incoming, _, needs_grad) in enumerate(spy.calls):
        assert not needs_grad  # gradient cut at the batch boundary
        if torch.count_nonzero(incoming) == 0:
            fresh += 1  # epoch start
        else:
            torch.testing.assert_close(incoming, spy.calls[i - 1][1])  # carried over
    assert fresh == 2  # exactly one fresh state per epoch
    assert len(spy.calls) > 4


def test_random_reinitialises_every_minibatch() -> None:
    spy = _run("random")
    assert len(spy.calls) > 2
    assert all(torch.count_nonzero(incoming) == 0 for incoming, _, _ in spy.calls)
    assert any(torch.count_nonzero(out) > 0 for _, out, _ in spy.calls)
