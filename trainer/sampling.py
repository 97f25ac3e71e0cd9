"""Cutting one long id sequence into minibatches of windows (d2l §9.3 / word_language_model).

random:     a random offset per epoch, windows of num_steps in random order; windows in one
            batch are unrelated, so the state is re-initialised for every minibatch.
sequential: the sequence is cut into batch_size contiguous rows; batch i+1 continues batch i
            row by row, so the state is initialised once per epoch and carried across
            batches with its gradient detached (`detach_state`).
Labels are always the inputs shifted by one token.

Data-parallel ranks (rank, world): every rank draws the same offset and shuffle, then takes
its equal slice of each global batch: random windows are partitioned, and sequential rows
r*b..(r+1)*b-1 (b = batch_size / world) form one contiguous shard of the corpus per rank, so
the carried state stays right. Together the ranks see exactly the one-process batches.
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


def rank_rows(batch_size: int, rank: int = 0, world: int = 1) -> slice:
    """The rows of a global batch that one rank trains on; the world must divide the batch."""
    if world < 1 or not 0 <= rank < world:
        raise TrainerError(f"rank {rank} is outside a world of size {world}")
    if batch_size % world:
        raise TrainerError(
            f"--batch-size {batch_size} (the global batch) is not divisible by the world size "
            f"{world}; use a multiple of {world}"
        )
    local = batch_size // world
    return slice(rank * local, (rank + 1) * local)


def random_batches(
    ids: list[int], batch_size: int, num_steps: int, rng: random.Random,
    rank: int = 0, world: int = 1,
) -> Iterator[Batch]:  # fmt: skip
    """Random sampling: non-overlapping windows from a random offset, shuffled."""
    mine = rank_rows(batch_size, rank, world)
    offset = rng.randint(0, num_steps - 1)
    seq = ids[offset:]
    starts = list(range(0, ((len(seq) - 1) // num_steps) * num_steps, num_steps))
    rng.shuffle(starts)
    for b in range(len(starts) // batch_size):
        chunk = starts[b * batch_size : (b + 1) * batch_size][mine]
        x = torch.tensor([seq[j : j + num_steps] for j in chunk])  # [batch, num_steps]
        y = torch.tensor([seq[j + 1 : j + 1 + num_steps] for j in chunk])
        yield x, y


def sequential_batches(
    ids: list[int], batch_size: int, num_steps: int, rng: random.Random,
    rank: int = 0, world: int = 1,
) -> Iterator[Batch]:  # fmt: skip
    """Sequential partitioning: row r of batch i+1 continues row r of batch i."""
    mine = rank_rows(batch_size, rank, world)
    offset = rng.randint(0, num_steps - 1)
    row = (len(ids) - offset - 1) // batch_size  # L: tokens per row
    start, stop = offset + mine.start * row, offset + mine.stop * row  # this rank's shard
    rows = mine.stop - mine.start
    xs = torch.tensor(ids[start:stop]).reshape(rows, row)  # [local batch, L]
    ys = torch.tensor(ids[start + 1 : stop + 1]).reshape(rows, row)
    for i in range(0, (xs.shape[1] // num_steps) * num_steps, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def batches(
    ids: list[int], batch_size: int, num_steps: int, sampling: str, rng: random.Random,
    rank: int = 0, world: int = 1,
) -> Iterator[Batch]:  # fmt: skip
    """One epoch's minibatches (this rank's slice of each global batch of `batch_size`)."""
    if sampling == "random":
        return random_batches(ids, batch_size, num_steps, rng, rank, world)
    if sampling == "sequential":
        return sequential_batches(ids, batch_size, num_steps, rng, rank, world)
    raise TrainerError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")


def detach_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Keeps the values, cuts the graph: gradients stop at the batch boundary (repackage_hidden)."""
    return tuple(s.detach() for s in state)
