"""n-gram language model with Laplace (add-alpha) smoothing, exportable as one dense Gather.

p(w | c) = (count(c, w) + alpha) / (count(c) + alpha * V), where c is the last n-1 tokens and
the text is padded with n-1 `<bos>` ids at the start, so the first token is predicted from a
context of `<bos>` only. V counts the tokens that can follow: `<pad>`, `<bos>` and `<eos>`
never do in text (`excluded`: probability 0, no share of the smoothing), so a trained model
smooths over the text's tokens and `<unk>`, as a textbook Laplace model over the text's
vocabulary does.

Two implementations of the same numbers:
- `NgramCounts`: the pure reference (Python dicts), works for any n and V (used for held-out
  perplexity at large n, and as the oracle in tests);
- `NgramLM`: an `ExportableModel` holding the dense log-probability table [V^(n-1), V]; its
  graph is vectorised (no loop over time): the context index of every position is computed
  with slices and looked up with one Gather.

The graph's state `context` int64 [batch, max(n-1, 1)] holds the last n-1 tokens seen
(initially `<bos>` everywhere). For n = 1 the state is one ignored column, because zero-sized
tensors are poorly supported by runtimes and by batching code.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnserve.artifact.manifest import StateSpec
from rnnserve.artifact.vocab import BOS, NOT_TEXT_IDS, RESERVED
from rnnserve.trainer.errors import TrainerError

BOS_ID = RESERVED.index(BOS)
NEVER_LOGPROB = -1e4  # log-probability of an excluded token: exp() is exactly 0, yet finite
# Largest dense table exported: 2**24 float32 entries = 64 MiB of model.onnx.
MAX_TABLE_ENTRIES = 2**24


@dataclass(frozen=True)
class NgramConfig:
    """Hyper-parameters of an n-gram model; stored in the manifest."""

    vocab_size: int
    n: int = 3
    alpha: float = 1.0
    excluded: tuple[int, ...] = ()  # ids that never follow (probability 0, no smoothing mass)

    def __post_init__(self) -> None:
        object.__setattr__(self, "excluded", tuple(sorted(set(self.excluded))))  # JSON: a list

    @property
    def outcomes(self) -> int:
        """V of the formula: the tokens that can follow."""
        return self.vocab_size - len(self.excluded)

    def validate(self) -> None:
        if self.n < 1:
            raise TrainerError(f"n-gram order n must be >= 1, got {self.n}")
        if self.vocab_size < 1:
            raise TrainerError(f"vocabulary size must be >= 1, got {self.vocab_size}")
        if any(not 0 <= i < self.vocab_size for i in self.excluded) or self.outcomes < 1:
            raise TrainerError(f"excluded ids {self.excluded} must leave some of the vocabulary")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise TrainerError(
                f"Laplace alpha must be a positive finite number, got {self.alpha}"
                + (" (alpha = 0 gives unseen n-grams probability 0)" if self.alpha == 0 else "")
            )

    @property
    def table_entries(self) -> int:
        return self.vocab_size**self.n


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise TrainerError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def _perplexity(total_log_likelihood: float, count: int) -> float:
    """exp(-total / count), inf where that overflows: math.exp raises OverflowError past ~709,
    which a sequence of near-impossible tokens (tiny alpha) reaches."""
    try:
        return math.exp(-total_log_likelihood / count)
    except OverflowError:
        return math.inf


def _check_training_ids(ids: Sequence[int], config: NgramConfig) -> None:
    _check_ids(ids, config.vocab_size)
    excluded = set(config.excluded)
    seen = next((i for i in ids if i in excluded), None)
    if seen is not None:
        raise TrainerError(f"token id {seen} is excluded as a next token but the text has it")


class NgramCounts:
    """Reference n-gram counts in dicts: context tuple -> Counter of next ids."""

    def __init__(self, config: NgramConfig) -> None:
        config.validate()
        self.config = config
        self.counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        self.totals: dict[tuple[int, ...], int] = {}  # count(c), filled by fit

    @classmethod
    def fit(cls, ids: Sequence[int], config: NgramConfig) -> NgramCounts:
        model = cls(config)
        _check_training_ids(ids, config)
        k = config.n - 1
        padded = [BOS_ID] * k + list(ids)
        for i, w in enumerate(ids):
            model.counts[tuple(padded[i : i + k])][w] += 1
        # summed once: a row's sum per lookup made a word-level unigram's perplexity take
        # minutes (its one row holds every word type)
        model.totals = {ctx: sum(row.values()) for ctx, row in model.counts.items()}
        return model

    def _fraction(self, context: Sequence[int], w: int) -> tuple[float, float]:
        """(count(c, w) + alpha, count(c) + alpha * V) for the last n-1 ids of `context`,
        `<bos>`-padded on the left when it is shorter (the graph's initial state): sliced as
        is, a short context matched no count and got the uniform 1/V."""
        k, v, a = self.config.n - 1, self.config.outcomes, self.config.alpha
        ctx = tuple([BOS_ID] * (k - len(context)) + list(context[-k:])) if k else ()
        row = self.counts.get(ctx)
        return (row[w] if row else 0) + a, self.totals.get(ctx, 0) + a * v

    def prob(self, context: Sequence[int], w: int) -> float:
        """p(w | last n-1 ids of `context`); a shorter context is `<bos>`-padded."""
        if w in self.config.excluded:
            return 0.0
        numerator, denominator = self._fraction(context, w)
        return numerator / denominator

    def log_prob(self, context: Sequence[int], w: int) -> float:
        """log p(w | context) as a difference of logs: the ratio itself underflows to 0 for a
        tiny alpha (5e-324 / 3 == 0.0), its log (-745) does not."""
        if w in self.config.excluded:
            return -math.inf
        numerator, denominator = self._fraction(context, w)
        return math.log(numerator) - math.log(denominator)

    def log_likelihoods(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | previous ids, <bos>-padded), for every i."""
        _check_ids(ids, self.config.vocab_size)
        k = self.config.n - 1
        padded = [BOS_ID] * k + list(ids)
        return [self.log_prob(padded[i : i + k], w) for i, w in enumerate(ids)]

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean negative log-likelihood) over every id, starting from a `<bos>` context."""
        if not ids:
            raise TrainerError("cannot measure perplexity on an empty sequence")
        lls = self.log_likelihoods(ids)
        return _perplexity(sum(lls), len(lls))


def _how_to_fit(vocab_size: int, n: int) -> str:
    """The flags that bring V^n under the limit, with the numbers: "a smaller n" left the user
    to guess which n, and suggested char level to a char-level run."""
    largest_v = round(MAX_TABLE_ENTRIES ** (1 / n))  # the integer n-th root, float-corrected
    while largest_v**n > MAX_TABLE_ENTRIES:
        largest_v -= 1
    while (largest_v + 1) ** n <= MAX_TABLE_ENTRIES:
        largest_v += 1
    shrink = f"raise --min-freq until the vocabulary has at most {largest_v:,} tokens"
    largest_n = 0
    while vocab_size ** (largest_n + 1) <= MAX_TABLE_ENTRIES:
        largest_n += 1
    if largest_n == 0:
        return f"{shrink} (even --n 1 is too large at V = {vocab_size:,})"
    lower = "" if largest_n == 1 else " or lower"
    return f"use --n {largest_n}{lower}, or {shrink} for --n {n}"


def dense_log_probs(ids: Sequence[int], config: NgramConfig) -> np.ndarray:
    """The smoothed log-probability table, float32 [V^(n-1), V]; row = context in base V."""
    config.validate()
    if config.table_entries > MAX_TABLE_ENTRIES:
        raise TrainerError(
            f"n-gram table V^n = {config.vocab_size}^{config.n} = {config.table_entries:,} entries "
            f"exceeds the dense export limit of {MAX_TABLE_ENTRIES:,} (2**24); "
            f"{_how_to_fit(config.vocab_size, config.n)}"
        )
    _check_training_ids(ids, config)
    v, k = config.vocab_size, config.n - 1
    padded = np.concatenate([np.full(k, BOS_ID, dtype=np.int64), np.asarray(ids, dtype=np.int64)])
    num = len(ids)
    index = np.zeros(num, dtype=np.int64)  # context * V + next, for every position [num]
    for j in range(k + 1):
        index = index * v + padded[j : j + num]
    counts = np.bincount(index, minlength=v**config.n).reshape(v**k, v).astype(np.float64)
    denominator = counts.sum(axis=1, keepdims=True) + config.alpha * config.outcomes
    # a difference of logs: the ratio underflows to 0 (log -inf) for a tiny alpha
    log_probs = np.log(counts + config.alpha) - np.log(denominator)
    log_probs[:, list(config.excluded)] = NEVER_LOGPROB
    return log_probs.astype(np.float32)


class NgramLM(nn.Module):
    """Exportable n-gram LM: tokens int64 [batch, time], context int64 [batch, max(n-1, 1)]."""

    task = "lm"
    arch = "ngram"
    input_name = "tokens"
    output_name = "logits"

    def __init__(self, config: NgramConfig, log_probs: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        config.validate()
        self.config = config
        table = torch.as_tensor(np.asarray(log_probs), dtype=torch.float32)
        expected = (config.vocab_size ** (config.n - 1), config.vocab_size)
        if tuple(table.shape) != expected:
            raise TrainerError(f"n-gram table has shape {tuple(table.shape)}, expected {expected}")
        self.register_buffer("log_probs", table)  # [V^(n-1), V]

    @property
    def context_width(self) -> int:
        return max(self.config.n - 1, 1)

    def hyperparameters(self) -> dict[str, Any]:
        return {**asdict(self.config), "context_width": self.context_width, "bos_id": BOS_ID}

    def state_specs(self) -> list[StateSpec]:
        return [
            StateSpec(
                name="context",
                input="context",
                output="context_out",
                shape=[-1, self.context_width],
                batch_axis=0,
                dtype="int64",
                init=BOS_ID,
            )
        ]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.full((batch_size, self.context_width), BOS_ID, dtype=torch.int64),)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits[:, t] = log p(. | last n-1 tokens up to and including tokens[:, t])."""
        k, v = self.config.n - 1, self.config.vocab_size
        if k == 0:
            index = torch.zeros_like(tokens)  # [batch, time]: the single unigram row
            return self.log_probs[index], context
        full = torch.cat([context, tokens], dim=1)  # [batch, k + time]
        length = full.size(1)
        index = torch.zeros_like(tokens)  # [batch, time]
        for j in range(k):
            # column j of the window that ends at tokens[:, t] is full[:, t + 1 + j]
            index = index * v + full[:, 1 + j : length - (k - 1 - j)]
        logits = self.log_probs[index]  # Gather -> [batch, time, V]
        return logits, full[:, -k:]

    @torch.no_grad()
    def perplexity(self, ids: Sequence[int]) -> float:
        """Same number as NgramCounts.perplexity, by the graph's lookup of each position's
        context row, for the observed next id only.

        Why not the graph's forward: its logits are [len(ids), V] (a word-level validation
        split of 700k ids at V = 140k is 400 GB); the picked entries are [len(ids)].
        An excluded id has probability 0 (inf), not the table's finite NEVER_LOGPROB, whose
        exp(1e4 / len) would overflow or give an arbitrary huge number."""
        if len(ids) < 1:
            raise TrainerError("cannot measure perplexity on an empty sequence")
        _check_ids(ids, self.config.vocab_size)
        if not set(ids).isdisjoint(self.config.excluded):
            return math.inf
        k, v = self.config.n - 1, self.config.vocab_size
        tokens = torch.tensor(list(ids), dtype=torch.int64)  # [time]
        padded = torch.cat([torch.full((k,), BOS_ID, dtype=torch.int64), tokens])
        rows = torch.zeros_like(tokens)  # context of every position in base V, <bos>-padded
        for j in range(k):
            rows = rows * v + padded[j : j + len(tokens)]
        picked = self.log_probs[rows, tokens]  # [time]
        return _perplexity(float(picked.double().sum()), len(ids))

    def start_log_probs(self) -> list[float]:
        """log p(first token | <bos>...) [V], for the manifest: the graph never outputs this
        row before it is fed a token, yet Infill with an empty left needs it as the prior."""
        return [float(v) for v in self.log_probs[self._bos_row()]]

    def _bos_row(self) -> int:
        v, row = self.config.vocab_size, 0
        for _ in range(self.config.n - 1):
            row = row * v + BOS_ID
        return row


def train_ngram(
    ids: list[int],
    vocab_size: int,
    n: int = 3,
    alpha: float = 1.0,
    excluded: tuple[int, ...] = NOT_TEXT_IDS,
) -> NgramLM:
    """Counts n-grams of `ids` and returns the exportable model (refuses oversized tables)."""
    config = NgramConfig(vocab_size=vocab_size, n=n, alpha=alpha, excluded=excluded)
    if not ids:
        raise TrainerError("cannot train an n-gram model on an empty corpus")
    return NgramLM(config, dense_log_probs(ids, config))
