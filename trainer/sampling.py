"""Cutting one long id sequence into minibatches of windows (d2l §9.3 / word_language_model).

random:     a random offset per epoch, windows of num_steps in random order; windows in one
            batch are unrelated, so the state is re-initialised for every minibatch.
sequential: the sequence is cut into batch_size contiguous rows; batch i+1 continues batch i
            row by row, so the state is initialised once per epoch and carried across
            batches with its gradient detached (`detach_state`).
Labels are always the inputs shifted by one token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from rnnserve.trainer.errors import TrainerError

SAMPLINGS = ("random", "sequential")
Batch = tuple[torch.Tensor, torch.Tensor]  # X, Y: [batch, num_steps] int64 each


def num_batches(length: int, batch_size: int, num_steps: int) -> int:
    """Batches one epoch yields at offset 0 (both schemes agree on it up to the offset)."""
    return ((length - 1) // num_steps) // batch_size


def check_fits(length: int, batch_size: int, num_steps: int, what: str = "corpus") -> None:
    if batch_size < 1 or num_steps < 1:
        raise TrainerError("batch-size and num-steps must be at least 1")
    # the random offset can take up to num_steps - 1 tokens away
    if num_batches(length - (num_steps - 1), batch_size, num_steps) < 1:
        need = batch_size * num_steps + num_steps
        raise TrainerError(
            f"{what} has {length} tokens, too few for batch-size {batch_size} x num-steps "
            f"{num_steps} (need about {need}); lower --num-steps/--batch-size or add text"
        )


def random_batches(
    ids: list[int], batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[Batch]:
    """Random sampling: non-overlapping windows from a random offset, shuffled."""
    offset = rng.randint(0, num_steps - 1)
    seq = ids[offset:]
    starts = list(range(0, ((len(seq) - 1) // num_steps) * num_steps, num_steps))
    rng.shuffle(starts)
    for b in range(len(starts) // batch_size):
        chunk = starts[b * batch_size : (b + 1) * batch_size]
        x = torch.tensor([seq[j : j + num_steps] for j in chunk])  # [batch, num_steps]
        y = torch.tensor([seq[j + 1 : j + 1 + num_steps] for j in chunk])
        yield x, y


def sequential_batches(
    ids: list[int], batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[Batch]:
    """Sequential partitioning: row r of batch i+1 continues row r of batch i."""
    offset = rng.randint(0, num_steps - 1)
    usable = ((len(ids) - offset - 1) // batch_size) * batch_size
    xs = torch.tensor(ids[offset : offset + usable]).reshape(batch_size, -1)  # [batch, L]
    ys = torch.tensor(ids[offset + 1 : offset + 1 + usable]).reshape(batch_size, -1)
    for i in range(0, (xs.shape[1] // num_steps) * num_steps, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def batches(
    ids: list[int], batch_size: int, num_steps: int, sampling: str, rng: random.Random
) -> Iterator[Batch]:
    if sampling == "random":
        return random_batches(ids, batch_size, num_steps, rng)
    if sampling == "sequential":
        return sequential_batches(ids, batch_size, num_steps, rng)
    raise TrainerError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def detach_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keeps the values, cuts the graph: gradients stop at the batch boundary (repackage_hidden)."""
    return tuple(s.detach() for s in state)
