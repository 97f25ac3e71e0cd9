"""Score: log-likelihood, perplexity and per-token log-probs of texts under an lm model.

The first token conditions the rest (docs/contracts.md): a text of n tokens scores tokens
2..n. Texts are right-padded into one [texts, time] call — safe because every lm graph is
causal, so padding after a text never changes the outputs for its own positions — split
into several calls when the batch's logits would be large. A text too long for the budget on
its own runs in time windows, the recurrent state of one window feeding the next (as
Generate prefills a long prompt in chunks), so no call's logits exceed the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    # with top > 0, per scored token: the `top` likeliest tokens and the scored one (named as
    # in `tokens`), each with its log-probability (OpenAI's legacy `top_logprobs`, as vLLM)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)


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


def time_window(
    rows: int, vocab: int, steps: int, carries_state: bool, budget: int | None = None
) -> int:
    """Time steps per ORT call: as many as keep rows * window * vocab logits in the budget
    (default MAX_LOGIT_ELEMENTS). A graph without state outputs cannot continue where a call
    ended: all steps at once."""
    if not carries_state:
        return steps
    budget = MAX_LOGIT_ELEMENTS if budget is None else budget
    return max(1, min(steps, budget // (rows * vocab)))


def _score_sync(
    model: OnnxModel, rows: list[list[int]], pad: int, vocab: int, top: int = 0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Worker thread: for each row of ids, its token log-probs [n - 1] and, with top > 0,
    the ids [n - 1, top] of the likeliest next tokens at each position (likeliest first) and
    their log-probs [n - 1, top]."""
    steps = max(len(r) for r in rows) - 1  # the last token predicts nothing: not fed
    x = np.full((len(rows), steps), pad, dtype=np.int64)  # [texts, time]
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = r[:-1]
    top = min(top, vocab)
    out = [np.empty(len(r) - 1, dtype=np.float32) for r in rows]
    best = [np.empty((len(r) - 1, top), dtype=np.int64) for r in rows]
    best_lp = [np.empty((len(r) - 1, top), dtype=np.float32) for r in rows]
    window = time_window(len(rows), vocab, steps, bool(model.specs))
    state = model.initial_state(len(rows))
    for start in range(0, steps, window):
        end = min(start + window, steps)
        # a row ended in an earlier window is padding here: its state is never read again
        logits, state = model.run(np.ascontiguousarray(x[:, start:end]), state)
        for i, r in enumerate(rows):  # logits [texts, window, vocab]
            stop = min(end, len(r) - 1)
            if stop > start:
                lp = log_softmax(logits[i, : stop - start])  # [stop - start, vocab]
                out[i][start:stop] = lp[np.arange(stop - start), r[start + 1 : stop + 1]]
                if top:
                    # the `top` largest unordered (linear in the vocabulary), then ordered
                    part = np.argpartition(-lp, top - 1, axis=1)[:, :top]
                    order = np.argsort(-np.take_along_axis(lp, part, axis=1), axis=1)
                    ids = np.take_along_axis(part, order, axis=1)
                    best[i][start:stop] = ids
                    best_lp[i][start:stop] = np.take_along_axis(lp, ids, axis=1)
    return list(zip(out, best, best_lp, strict=True))


async def score(
    model: OnnxModel, runtime: Runtime, codec: TextCodec, encoded: list[Encoded], top: int = 0
) -> list[ScoreResult]:
    """`top` > 0 also gives each scored token the `top` likeliest tokens at its position."""
    results: list[ScoreResult | None] = [None] * len(encoded)
    unk = codec.vocab.token_to_idx[UNK]
    names = codec.vocab.idx_to_token
    for group in _chunks(encoded, len(codec)):
        rows = [encoded[i].ids for i in group]
        scored = await runtime.call(_score_sync, model, rows, codec.vocab.pad, len(codec), top)
        for i, (lp, best, best_lp) in zip(group, scored, strict=True):
            ll = float(np.sum(lp, dtype=np.float64))
            n = len(lp)
            ids, tokens = encoded[i].ids, encoded[i].tokens[1:]
            results[i] = ScoreResult(
                perplexity=_safe_exp(-ll / n),
                log_likelihood=ll,
                num_tokens=n,
                token_logprobs=lp.tolist(),
                unknown_tokens=sum(1 for t in ids[1:] if t == unk),  # scored
                tokens=tokens,
                # the scored token under its text, not its vocabulary name: an unknown word
                # is "<unk>" there, and top_logprobs[i][tokens[i]] must find it
                top_logprobs=[
                    {**{names[b]: float(v) for b, v in zip(best[t], best_lp[t], strict=True)},
                     tokens[t]: float(lp[t])}
                    for t in range(n)
                ] if top else [],
            )  # fmt: skip
    return [r for r in results if r is not None]


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
