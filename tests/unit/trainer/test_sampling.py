"""Exact windows of both sampling schemes on tiny sequences, and the state handling."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.sampling import (
    check_fits,
    detach_state,
    random_batches,
    sequential_batches,
)

IDS = list(range(35))


class FixedOffset(random.Random):
    """An rng whose randint returns a chosen offset and whose shuffle keeps order."""

    def __init__(self, offset: int) -> None:
        super().__init__(0)
        self.offset = offset

    def randint(self, a: int, b: int) -> int:
        return self.offset

    def shuffle(self, x, *args) -> None:  # type: ignore[override]
        pass


def test_sequential_exact_windows() -> None:
    got = list(sequential_batches(IDS, batch_size=2, num_steps=5, rng=FixedOffset(2)))
    # offset 2: usable = ((35-2-1)//2)*2 = 32 tokens -> rows [2..17], [18..33]
    assert [x.tolist() for x, _ in got] == [
        [[2, 3, 4, 5, 6], [18, 19, 20, 21, 22]],
        [[7, 8, 9, 10, 11], [23, 24, 25, 26, 27]],
        [[12, 13, 14, 15, 16], [28, 29, 30, 31, 32]],
    ]
    for x, y in got:
        assert torch.equal(y, x + 1)  # labels are the inputs shifted by one


def test_sequential_rows_continue_across_batches() -> None:
    got = list(sequential_batches(IDS, batch_size=3, num_steps=4, rng=random.Random(7)))
    for (x0, _), (x1, _) in itertools.pairwise(got):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)


def test_random_exact_windows_unshuffled() -> None:
    got = list(random_batches(IDS, batch_size=2, num_steps=5, rng=FixedOffset(1)))
    # offset 1: seq = 1..34 (34 tokens) -> (34-1)//5 = 6 windows starting 1,6,...,26 -> 3 batches
    assert [x.tolist() for x, _ in got] == [
        [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]],
        [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]],
        [[21, 22, 23, 24, 25], [26, 27, 28, 29, 30]],
    ]
    for x, y in got:
        assert torch.equal(y, x + 1)


def test_random_windows_cover_without_overlap() -> None:
    got = list(random_batches(IDS, batch_size=2, num_steps=4, rng=random.Random(3)))
    starts = sorted(int(row[0]) for x, _ in got for row in x)
    assert all(b - a >= 4 for a, b in itertools.pairwise(starts))
    assert len(starts) == 2 * len(got)
    for x, y in got:
        assert x.shape == (2, 4) and torch.equal(y, x + 1)


def test_too_short_is_a_clear_error() -> None:
    with pytest.raises(TrainerError, match="too few"):
        check_fits(20, batch_size=4, num_steps=10)
    check_fits(1000, batch_size=4, num_steps=10)


def test_detach_state_keeps_values_and_cuts_graph() -> None:
    w = torch.ones(3, requires_grad=True)
    state = (w * 2, w * 3)
    cut = detach_state(state)
    assert all(not s.requires_grad for s in cut)
    assert all(torch.equal(a, b) for a, b in zip(cut, state, strict=True))


@pytest.mark.parametrize("scheme", [random_batches, sequential_batches])
def test_offsets_vary_over_epochs_and_every_whole_window_is_used(scheme) -> None:
    """d2l §9.3: each epoch starts at a random offset in [0, num_steps), so window borders
    move between epochs; from it the windows tile the text (random: all whole windows but
    those that do not fill a last batch; sequential: batch_size rows of equal length)."""
    num_steps, batch_size, offsets = 4, 2, set()
    for seed in range(40):
        got = list(scheme(IDS, batch_size, num_steps, random.Random(seed)))
        starts = sorted(int(row[0]) for x, _ in got for row in x)
        offset = starts[0]
        offsets.add(offset)
        if scheme is random_batches:
            windows = (len(IDS) - offset - 1) // num_steps
            want = range(offset, offset + windows * num_steps, num_steps)
            assert len(starts) == windows // batch_size * batch_size
            assert set(starts) <= set(want)
        else:
            row = (len(IDS) - offset - 1) // batch_size
            want = [offset + r * row + i for i in range(0, row - num_steps + 1, num_steps)
                    for r in range(batch_size)]  # fmt: skip
            assert starts == sorted(want)
    assert offsets == set(range(num_steps))
