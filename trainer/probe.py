"""Inputs for the export check: text (or values) of the kind the model will serve.

Why not random tokens: a trained LSTM fed uniformly random tokens is in a regime it never saw
and amplifies float rounding until torch and ONNX Runtime disagree although both are right.
The check reads windows of the validation split (or the corpus, or the series); with none at
hand it reads the model's own samples, which are in its distribution by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ROWS = 4  # windows per check (the batch)
LONG_TIME = 200  # tokens per window: long enough for drift to show, short enough to be fast
MIN_TIME = 8
# Entries of one [ROWS, time, V] logits tensor the export check compares: it holds about a
# dozen float64 copies of such tensors, so 4 windows of 200 at a word vocabulary of 140k took
# over 8 GB. Up to V = 5242 the windows keep LONG_TIME; above, they are shorter.
MAX_LOGITS = 2**22

StepFn = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


@dataclass
class Probe:
    """x: int64 [rows, time] tokens or float32 [rows, time, 1] values; source: where from."""

    x: np.ndarray
    source: str


def probe_time(vocab_size: int | None) -> int:
    """Tokens per window for a model with `vocab_size` logits a step: LONG_TIME, or fewer
    (never under MIN_TIME) so ROWS x time x V stays within MAX_LOGITS."""
    if not vocab_size:
        return LONG_TIME
    return max(MIN_TIME, min(LONG_TIME, MAX_LOGITS // (ROWS * vocab_size)))


def windows_of(
    sequence: Sequence[int] | Sequence[float] | np.ndarray,
    source: str,
    *,
    values: bool,
    time: int = LONG_TIME,
) -> Probe | None:
    """ROWS windows of up to `time` items, evenly spread over the sequence (None if short)."""
    seq = np.asarray(sequence, dtype=np.float32 if values else np.int64).reshape(-1)
    if seq.size < MIN_TIME:
        return None
    time = min(time, int(seq.size))
    starts = np.linspace(0, seq.size - time, ROWS).astype(np.int64)
    x = np.stack([seq[s : s + time] for s in starts])
    return Probe(x[..., None] if values else x, f"{source} ({ROWS} windows of {time})")


def sampled(
    step: StepFn, state0: list[np.ndarray], vocab_size: int, seed: int = 0, time: int = LONG_TIME
) -> Probe:
    """ROWS texts of `time` tokens drawn from the model itself (softmax at temperature 1),
    each starting from a random token; `step` is one call at time 1 with the state fed back."""
    rng = np.random.default_rng(seed)
    x = np.zeros((ROWS, time), dtype=np.int64)
    x[:, 0] = rng.integers(0, vocab_size, ROWS)
    state = list(state0)
    for t in range(time - 1):
        logits, state = step(x[:, t : t + 1], state)
        z = np.asarray(logits[:, -1], np.float64)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        u = rng.random((ROWS, 1))
        x[:, t + 1] = np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)
    return Probe(x, f"the model's own samples ({ROWS} texts of {time})")


def random_tokens(vocab_size: int, seed: int = 0, time: int = LONG_TIME) -> Probe:
    """Only for graphs that cannot sample (infill): the calibrated bound still holds."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab_size, (ROWS, time)).astype(np.int64)
    return Probe(x, f"random tokens ({ROWS} windows of {time})")


def random_values(seed: int = 0) -> Probe:
    """A forecaster's stand-in series when none is given: a random walk, normalised scale."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.standard_normal((ROWS, LONG_TIME)), axis=1) / np.sqrt(LONG_TIME)
    return Probe(walk.astype(np.float32)[..., None], f"random walks ({ROWS} of {LONG_TIME})")
