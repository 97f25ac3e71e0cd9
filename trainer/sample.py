"""Greedy generation in torch: the reference the server's greedy decoding must equal.

Convention (docs/contracts.md): warm up on the whole prefix in one call, pick argmax of the last
logits (ties to the lowest id: torch.argmax returns the first maximum), feed it back one token
at a time. `model_dir` is a model package dir (models/<name>/<version>, which holds
checkpoint.pt beside model.onnx) or a training run dir / checkpoint file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.checkpoint import load_checkpoint, restore
from rnnserve.trainer.errors import TrainerError


def _load(model_dir: Path | str):
    model, _config, vocab, tok = restore(load_checkpoint(model_dir))
    if model.task != "lm":
        raise TrainerError(
            f"{model_dir} holds a model whose task is {model.task}; only left-to-right (lm) "
            "models generate"
        )
    return model, vocab, Tokenizer(tok)


@torch.no_grad()
def greedy_ids(model, prefix_ids: list[int], k: int) -> list[int]:
    """k greedy continuation ids after warming up on prefix_ids."""
    if not prefix_ids:
        raise TrainerError("the prefix must contain at least one token")
    if k < 0:
        raise TrainerError("--num-tokens must be >= 0")
    model.eval()
    state = tuple(model.initial_state(1))
    x = torch.tensor([prefix_ids])  # [1, time]
    out: list[int] = []
    for _ in range(k):
        logits, *rest = model(x, *state)  # logits: [1, time, vocab]
        state = tuple(rest)
        nxt = int(torch.argmax(logits[0, -1]).item())
        out.append(nxt)
        x = torch.tensor([[nxt]])  # [1, 1]
    return out


def _prefix_ids(vocab: Vocab, tokenizer: Tokenizer, prefix: str) -> list[int]:
    """The prefix's ids; a prefix the tokenizer erases (punctuation or non-Latin letters under
    letters-only, blanks at word level) is named as such, not as "at least one token"."""
    tokens = tokenizer.tokenize(prefix)
    if prefix and not tokens:
        config = tokenizer.config
        hint = (
            " (the model's tokenizer keeps only the letters a-z, A-Z)"
            if config.letters_only
            else ""
        )
        shown = prefix if len(prefix) <= 40 else prefix[:40] + "..."
        raise TrainerError(
            f"the prefix {shown!r} has no {config.level}-level tokens after tokenization{hint}"
        )
    return vocab.encode(tokens)


def greedy_tokens(model_dir: Path | str, prefix: str, k: int) -> list[int]:
    """Token ids the server must produce for (prefix, max_tokens=k) under greedy decoding."""
    model, vocab, tokenizer = _load(model_dir)
    return greedy_ids(model, _prefix_ids(vocab, tokenizer, prefix), k)


def greedy_text(model_dir: Path | str, prefix: str, k: int) -> str:
    """The continuation as the server streams it, so `prefix + greedy_text(...)` is the
    server's text: each token after its separator (word level: a space, also before the
    first), reserved tokens (`<unk>`, ...) as no text (server/text.py, TextCodec.piece)."""
    model, vocab, tokenizer = _load(model_dir)
    ids = greedy_ids(model, _prefix_ids(vocab, tokenizer, prefix), k)
    sep = tokenizer.separator
    return "".join("" if t in RESERVED else sep + t for t in vocab.decode(ids))
