"""Infill: rank candidates for one blank token between a left and a right context.

Task `infill` (bidirectional) models answer in one pass, with the blank fed as `<unk>`.
Task `lm` models answer exactly by Bayes' rule over every candidate v:
    p(v | left, right) ∝ p(v | left) · p(right | left, v)
computed as batches of the |V| continuations [v, right...] from the state after `left` (the
HMM's backward recursion, done by the forward graph), in time windows when a context's
logits would pass the per-call budget. An empty left takes the prior from
the manifest's `start_log_probs` (the n-gram's and HMM's first-token distribution, which the
graph cannot output), else (RNNs) a uniform one.
Reserved tokens (<unk>, <pad>, <bos>, <eos>) are never candidates; probabilities are
normalised over the real tokens.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np

from rnnserve.artifact.vocab import RESERVED
from rnnserve.server.errors import BadRequest, UnsupportedTask
from rnnserve.server.repository import ModelVersion
from rnnserve.server.runtime import OnnxModel, Runtime, State, log_softmax
from rnnserve.server.scoring import time_window
from rnnserve.server.settings import Settings
from rnnserve.server.text import TextCodec

DEFAULT_TOP_K = 5
MAX_LOGIT_ELEMENTS = 32_000_000  # per ORT call, as in scoring (time-windowed alike)


def infill_refusal(entry: ModelVersion, max_infill_vocab: int) -> str:
    """Why a language model cannot Infill ("" when it can): a vocabulary over
    --max-infill-vocab, every token of which would be scored as a candidate. One rule for the
    call, GetModel's `rpcs` and Triton's model config."""
    m = entry.manifest
    if m is None or m.task != "lm" or m.vocab_size <= max_infill_vocab:
        return ""
    return (
        f"model {entry.name} has {m.vocab_size} tokens, more than --max-infill-vocab "
        f"{max_infill_vocab}: scoring every candidate would be too costly"
    )


@dataclass
class Candidate:
    text: str
    token_id: int
    probability: float


async def infill(
    entry: ModelVersion,
    codec: TextCodec,
    runtime: Runtime,
    settings: Settings,
    left: str,
    right: str,
    top_k: int,
) -> list[Candidate]:
    vocab = len(codec)
    first = len(RESERVED)
    if not left and not right:
        raise BadRequest("left", "left and right are both empty: give at least one context")
    # unset: 5, or every real token when there are fewer (a DNA model has 4)
    top_k = top_k or min(DEFAULT_TOP_K, vocab - first)
    if not 1 <= top_k <= vocab - first:
        most = vocab - first
        raise BadRequest("top_k", f"must be 0 (the default) or in [1, {most}], got {top_k}")
    limit = settings.max_prompt_tokens
    lids = codec.encode(left, "left", limit).ids if left else []
    rids = codec.encode(right, "right", limit).ids if right else []
    if not lids and not rids:  # e.g. only spaces for a word-level tokenizer
        raise BadRequest("left", "left and right have no token: give at least one context")
    model = entry.model
    assert model is not None and entry.manifest is not None
    if entry.manifest.task == "infill":
        # one pass over the whole context (a bidirectional graph cannot run in windows), whose
        # logits at every position must fit the per-call budget
        most = MAX_LOGIT_ELEMENTS // vocab - 1
        if len(lids) + len(rids) > most:
            raise BadRequest(
                "right" if rids else "left",
                f"left and right hold {len(lids) + len(rids)} tokens; this model's "
                f"{vocab}-token vocabulary allows at most {most} in one pass",
            )
        scores = await runtime.call(_bidirectional_sync, model, lids, rids, codec.vocab.unk)
    else:
        why = infill_refusal(entry, settings.max_infill_vocab)
        if why:
            raise UnsupportedTask(why)
        start = entry.manifest.start_log_probs
        stop = threading.Event()
        try:
            scores = await runtime.call(_bayes_sync, model, lids, rids, vocab, start, stop)
        except asyncio.CancelledError:  # the caller left (cancel, deadline): stop the batches
            stop.set()
            raise
    post = scores[first:].astype(np.float64)  # [vocab - reserved]
    post = np.exp(post - post.max())
    post /= post.sum()
    order = np.argsort(-post, kind="stable")[:top_k]
    return [
        Candidate(codec.vocab.idx_to_token[first + i], first + int(i), float(post[i]))
        for i in order
    ]


def _bidirectional_sync(model: OnnxModel, lids: list[int], rids: list[int], unk: int) -> np.ndarray:
    x = np.asarray([[*lids, unk, *rids]], dtype=np.int64)  # [1, time]
    logits, _ = model.run(x, model.initial_state(1))  # [1, time, vocab]
    return log_softmax(logits[0, len(lids)])  # [vocab]


def _repeat(model: OnnxModel, state: State, n: int) -> State:
    return [np.repeat(t, n, axis=s.batch_axis) for t, s in zip(state, model.specs, strict=True)]


def _bayes_sync(
    model: OnnxModel,
    lids: list[int],
    rids: list[int],
    vocab: int,
    start: list[float] | None = None,
    stop: threading.Event | None = None,
) -> np.ndarray:
    """log p(v | left) + log p(right | left, v) for every v: [vocab]. `start`: log p(first
    token), the prior without a left context (None: uniform, for models that have none).
    `stop` set (the caller is gone) ends the candidate batches early: with a large vocabulary
    and a long right context they hold this worker thread for minutes. Contexts whose logits
    exceed MAX_LOGIT_ELEMENTS run in time windows carrying the state, as Score's texts do: a
    raised --max-prompt-tokens could otherwise ask ORT for gigabytes of logits in one call."""
    state = model.initial_state(1)
    carries = bool(model.specs)
    if start is not None:
        prior = log_softmax(np.asarray(start, dtype=np.float32))
    else:
        prior = np.full(vocab, -np.log(vocab), dtype=np.float32)
    if lids:  # in time windows, as Score runs a long text: only the last logits are kept
        x = np.asarray([lids], dtype=np.int64)
        window = time_window(1, vocab, len(lids), carries, MAX_LOGIT_ELEMENTS)
        for lo in range(0, len(lids), window):
            logits, state = model.run(np.ascontiguousarray(x[:, lo : lo + window]), state)
        prior = log_softmax(logits[0, -1])
    if not rids:
        return prior
    # each candidate row feeds [v, right[:-1]]: position t predicts right[t]
    steps = len(rids)
    target = np.asarray(rids, dtype=np.int64)
    likelihood = np.empty(vocab, dtype=np.float32)
    rows = max(1, MAX_LOGIT_ELEMENTS // (steps * vocab))
    for lo in range(0, vocab, rows):
        if stop is not None and stop.is_set():
            break  # nobody reads the result
        hi = min(vocab, lo + rows)
        x = np.empty((hi - lo, steps), dtype=np.int64)  # [candidates, right]
        x[:, 0] = np.arange(lo, hi)
        x[:, 1:] = target[:-1]
        row_state = _repeat(model, state, hi - lo)
        total = np.zeros(hi - lo, dtype=np.float64)
        window = time_window(hi - lo, vocab, steps, carries, MAX_LOGIT_ELEMENTS)
        for t0 in range(0, steps, window):
            t1 = min(steps, t0 + window)
            logits, row_state = model.run(np.ascontiguousarray(x[:, t0:t1]), row_state)
            lp = log_softmax(logits)  # [candidates, t1 - t0, vocab]
            total += lp[:, np.arange(t1 - t0), target[t0:t1]].sum(axis=-1)
        likelihood[lo:hi] = total
    return prior + likelihood
