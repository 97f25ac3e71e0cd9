"""Score: log-likelihood, perplexity and per-token log-probs of texts under an lm model.

The first token conditions the rest (docs/contracts.md): a text of n tokens scores tokens
2..n. Texts are right-padded into one [texts, time] call — safe because every lm graph is
causal, so padding after a text never changes the outputs for its own positions — split
into several calls when the batch's logits would be large.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rnnserve.artifact.vocab import UNK
from rnnserve.server.errors import BadRequest
from rnnserve.server.runtime import OnnxModel, Runtime, log_softmax
from rnnserve.server.text import Encoded, TextCodec

MAX_LOGIT_ELEMENTS = 32_000_000  # ~128 MB of float32 logits per ORT call


@dataclass
class ScoreResult:
    perplexity: float
    log_likelihood: float
    num_tokens: int
    token_logprobs: list[float]
    unknown_tokens: int
    tokens: list[str]


def encode_texts(
    codec: TextCodec, texts: list[str], max_texts: int, max_tokens: int
) -> list[Encoded]:
    """Validates and tokenizes Score texts; BadRequest names the offending field."""
    if not texts:
        raise BadRequest("texts", "at least one text is required")
    if len(texts) > max_texts:
        raise BadRequest("texts", f"{len(texts)} texts, more than the limit {max_texts}")
    encoded = []
    for i, text in enumerate(texts):
        enc = codec.encode(text, f"texts[{i}]", max_tokens)
        if len(enc.ids) < 2:
            raise BadRequest(
                f"texts[{i}]", "needs at least two tokens (the first conditions the rest)"
            )
        encoded.append(enc)
    return encoded


def _chunks(encoded: list[Encoded], vocab: int) -> list[list[int]]:
    """Indices of texts to run together, keeping time * texts * vocab under the budget."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(encoded[i].ids)  # sorted: the newest is the longest
        if current and (len(current) + 1) * longest * vocab > MAX_LOGIT_ELEMENTS:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _score_sync(model: OnnxModel, rows: list[list[int]], pad: int) -> list[np.ndarray]:
    """Worker thread: token log-probs [n - 1] for each row of ids."""
    width = max(len(r) for r in rows)
    x = np.full((len(rows), width), pad, dtype=np.int64)  # [texts, time]
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    logits, _ = model.run(x, model.initial_state(len(rows)))  # [texts, time, vocab]
    out = []
    for i, r in enumerate(rows):
        lp = log_softmax(logits[i, : len(r) - 1])  # [n - 1, vocab]
        out.append(lp[np.arange(len(r) - 1), r[1:]])
    return out


async def score(
    model: OnnxModel, runtime: Runtime, codec: TextCodec, encoded: list[Encoded]
) -> list[ScoreResult]:
    results: list[ScoreResult | None] = [None] * len(encoded)
    unk = codec.vocab.token_to_idx[UNK]
    for group in _chunks(encoded, len(codec)):
        rows = [encoded[i].ids for i in group]
        logprobs = await runtime.call(_score_sync, model, rows, codec.vocab.pad)
        for i, lp in zip(group, logprobs, strict=True):
            ll = float(np.sum(lp, dtype=np.float64))
            n = len(lp)
            results[i] = ScoreResult(
                perplexity=_safe_exp(-ll / n),
                log_likelihood=ll,
                num_tokens=n,
                token_logprobs=lp.tolist(),
                unknown_tokens=sum(1 for t in encoded[i].ids[1:] if t == unk),  # scored
                tokens=encoded[i].tokens[1:],
            )
    return [r for r in results if r is not None]


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
