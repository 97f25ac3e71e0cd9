"""Token selection: greedy, temperature, top-k, top-p, each stream with its own seeded RNG.

Pure numpy. A stream uses exactly one uniform number per non-greedy token, the next of its
own `numpy.random.Generator`'s sequence, so its text depends only on its seed and its logits,
never on which other streams share the batch or how its draws are blocked.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import BadRequest


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
        if self.top_k < 0:  # over the vocabulary keeps it all, as HF, vLLM and TGI take it
            raise BadRequest("sampling.top_k", f"must be 0 (off) or more, got {self.top_k}")
        p = self.top_p
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise BadRequest("sampling.top_p", f"must be in [0, 1], got {p}")
        return self


class Sampler:
    """Picks tokens for one stream from log-probabilities over the vocabulary."""

    def __init__(self, params: SamplingParams, seed: int | None = None, used: int = 0) -> None:
        """`seed` and `used` restore a stream from a checkpoint: its sequence restarts at
        uniform number `used` of `seed` (default: the request's seed, else a fresh one, at 0)."""
        self.params = params
        self._seed = seed if seed is not None else params.seed  # None: drawn on first use
        self.start = used  # uniforms of the sequence used before this request
        self._rng: np.random.Generator | None = None  # made on first use: greedy never draws
        self._ahead = np.empty(0)  # drawn from rng; used up to _next
        self._next = 0

    @property
    def seed(self) -> int:
        """The sequence's seed: a checkpoint names it so another replica continues the
        sequence. Drawn when first needed (a greedy stream without checkpoints never needs
        one, and the draw is a system call on the event loop)."""
        if self._seed is None:
            self._seed = secrets.randbits(64)
        return self._seed

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            bits = np.random.PCG64(self.seed)
            if self.start:
                bits.advance(self.start)  # one 64-bit draw per float64 uniform
            self._rng = np.random.Generator(bits)
        return self._rng

    def peek(self, n: int) -> np.ndarray:
        """The next n uniforms of this stream's sequence, without using them: a decode trip
        takes a block per stream at its start instead of one Python call per row per step.
        Draws ahead in blocks of at least 64 (the sequence is the generator's either way)."""
        if self._next + n > len(self._ahead):
            fresh = self.rng.random(max(n, 64))
            self._ahead = np.concatenate([self._ahead[self._next :], fresh])
            self._next = 0
        return self._ahead[self._next : self._next + n]

    def use(self, n: int) -> None:
        """Marks the first n peeked uniforms as used."""
        self._next += n

    def uniform(self) -> float:
        """The next uniform of the sequence."""
        u = float(self.peek(1)[0])
        self.use(1)
        return u

    def pick(self, logprobs: np.ndarray) -> int:
        """logprobs [vocab] (log-softmax of the model's logits) -> token id."""
        if self.params.greedy:
            return greedy_token(logprobs)
        return int(sample_rows(logprobs[None, :], [self])[0])


def greedy_token(logprobs: np.ndarray) -> int:
    """argmax; ties go to the lowest id (numpy's argmax does exactly that)."""
    return int(np.argmax(logprobs))


def filtered_probs(logprobs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from: tempered, then top-k, then top-p over what top-k kept;
    float64 [vocab]."""
    return filtered_rows(logprobs[None, :], [params])[0]


def filtered_rows(logprobs: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    """filtered_probs for a [rows, vocab] batch, one SamplingParams per row (temperature > 0).

    Vectorised so a decode step samples every stream of the batch in a few numpy calls
    instead of a Python loop of them per stream.
    """
    vocab = logprobs.shape[1]
    temperature = np.array([p.temperature for p in params], dtype=np.float64)[:, None]
    z = logprobs.astype(np.float64)
    # shifted before dividing: lp / t overflows to -inf for every token when t is tiny
    # (1e-310 is a valid JSON temperature), and -inf - -inf is nan; lp - max is 0 at the
    # argmax, so a tiny t tends to greedy instead
    with np.errstate(over="ignore"):  # to -inf: probability 0, as it should be
        z = (z - z.max(axis=1, keepdims=True)) / temperature
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    if any(p.top_k or 0.0 < p.top_p < 1.0 for p in params):
        order = np.argsort(-probs, axis=1, kind="stable")  # most likely first, ties by id
        ranked = np.take_along_axis(probs, order, axis=1)
        top_k = np.array([min(p.top_k or vocab, vocab) for p in params])[:, None]
        keep = np.arange(vocab)[None, :] < top_k  # [rows, vocab] in rank order
        top_p = np.array([p.top_p if 0.0 < p.top_p < 1.0 else 2.0 for p in params])[:, None]
        before = np.zeros_like(ranked)  # probability mass ranked strictly ahead
        np.cumsum(ranked[:, :-1], axis=1, out=before[:, 1:])
        # top-p applies to what top-k kept, renormalised (as HF, vLLM, llama.cpp): mass
        # ahead / top-k mass < top_p, compared as mass ahead < top_p x top-k mass
        top_k_mass = np.take_along_axis(before + ranked, top_k - 1, axis=1)
        keep &= (before < top_p * top_k_mass) | (np.arange(vocab)[None, :] == 0)  # top: kept
        mask = np.zeros_like(probs)
        np.put_along_axis(mask, order, keep.astype(np.float64), axis=1)
        probs *= mask
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def sample_rows(logprobs: np.ndarray, samplers: list[Sampler]) -> np.ndarray:
    """One token per row of [rows, vocab], each by inverse CDF with one uniform draw from
    that row's own sampler (temperature > 0 for every row)."""
    uniforms = np.array([s.uniform() for s in samplers])
    return draw_rows(logprobs, [s.params for s in samplers], uniforms)


def draw_rows(
    logprobs: np.ndarray, params: list[SamplingParams], uniforms: np.ndarray
) -> np.ndarray:
    """sample_rows with the uniforms given: [rows] in [0, 1), one per row, in row order."""
    probs = filtered_rows(logprobs, params)
    u = np.asarray(uniforms, dtype=np.float64)[:, None]
    cumulative = np.cumsum(probs, axis=1)
    idx = np.sum(cumulative <= u, axis=1)  # = searchsorted(side="right") per row
    # side="right" never lands on a zero-probability id; rounding can push u past the total
    for row in np.flatnonzero(idx >= probs.shape[1]):
        idx[row] = np.flatnonzero(probs[row])[-1]
    return idx


def choose_tokens(logprobs: np.ndarray, samplers: list[Sampler | None]) -> np.ndarray:
    """One token per row of [rows, vocab]: greedy rows (and None: rows whose token will be
    dropped) take the argmax, the rest one draw each from their own sampler."""
    tokens = np.argmax(logprobs, axis=-1)  # ties to the lowest id
    sampled = [i for i, s in enumerate(samplers) if s is not None and not s.params.greedy]
    if sampled:
        tokens[sampled] = sample_rows(logprobs[sampled], [samplers[i] for i in sampled])
    return tokens
