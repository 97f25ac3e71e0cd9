"""Token selection: greedy, temperature, top-k, top-p, each stream with its own seeded RNG.

Pure numpy. A stream draws exactly one uniform number per non-greedy token from its own
`numpy.random.Generator`, so its text depends only on its seed and its logits, never on
which other streams share the batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from server.errors import BadRequest


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; all defaults mean greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> SamplingParams:
        """Returns self, or raises BadRequest naming the field."""
        t = self.temperature
        if not math.isfinite(t) or not 0.0 <= t <= 100.0:
            raise BadRequest("sampling.temperature", f"must be in [0, 100], got {t}")
        if not 0 <= self.top_k <= vocab_size:
            raise BadRequest("sampling.top_k", f"must be in [0, {vocab_size}], got {self.top_k}")
        p = self.top_p
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise BadRequest("sampling.top_p", f"must be in [0, 1], got {p}")
        return self


class Sampler:
    """Picks tokens for one stream from log-probabilities over the vocabulary."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def pick(self, logprobs: np.ndarray) -> int:
        """logprobs [vocab] (log-softmax of the model's logits) -> token id."""
        return sample_token(logprobs, self.params, self.rng)


def greedy_token(logprobs: np.ndarray) -> int:
    """argmax; ties go to the lowest id (numpy's argmax does exactly that)."""
    return int(np.argmax(logprobs))


def filtered_probs(logprobs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from: tempered, then top-k, then top-p; float64 [vocab]."""
    z = logprobs.astype(np.float64) / params.temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")  # most likely first, ties by id
    keep = len(order)
    if params.top_k:
        keep = min(keep, params.top_k)
    if 0.0 < params.top_p < 1.0:
        cumulative = np.cumsum(probs[order])
        keep = min(keep, int(np.searchsorted(cumulative, params.top_p)) + 1)
    mask = np.zeros_like(probs)
    mask[order[:keep]] = 1.0
    probs = probs * mask
    return probs / probs.sum()


def sample_token(logprobs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token: greedy at temperature 0, else inverse-CDF with one uniform draw."""
    if params.greedy:
        return greedy_token(logprobs)
    probs = filtered_probs(logprobs, params)
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    # side="right" never lands on a zero-probability id; rounding can push u past the total
    if idx >= len(probs):
        idx = int(np.flatnonzero(probs)[-1])
    return idx
