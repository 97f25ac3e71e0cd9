"""Greedy generation in torch: the reference the server's greedy decoding must equal.

Convention (docs/contracts.md): warm up on the whole prefix in one call, pick argmax of the last
logits (ties to the lowest id: torch.argmax returns the first maximum), feed it back one token
at a time. `model_dir` is a model package dir (models/<name>/<version>, which holds
checkpoint.pt beside model.onnx) or a training run dir / checkpoint file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.checkpoint import CHECKPOINT_FILE, load_checkpoint, restore
from rnnserve.trainer.errors import TrainerError


def _check_source(model_dir: Path | str) -> None:
    """Says what a --model that holds no checkpoint is instead (a forecast or `rnn-trainer
    package` package, a model's name dir, its model.onnx): the checkpoint loader's "no
    checkpoint at .../checkpoint.pt" or "holds Python objects" named none of them."""
    path = Path(model_dir)
    if path.is_file() and path.suffix == ".onnx":
        raise TrainerError(
            f"{path} is an ONNX graph; sample runs the torch checkpoint beside it: "
            f"--model {path.parent}"
        )
    if not path.is_dir() or (path / CHECKPOINT_FILE).exists():
        return
    if (path / "manifest.json").is_file():
        try:
            task = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("task")
        except (OSError, ValueError, AttributeError):
            task = None
        if task in ("forecast", "infill"):
            raise TrainerError(
                f"{path} is a{'n' if task == 'infill' else ''} {task} package; only "
                "left-to-right (lm) models generate"
            )
        raise TrainerError(
            f"{path} has no {CHECKPOINT_FILE} beside model.onnx (a package made by "
            "`rnn-trainer package` carries none), and sample runs that torch checkpoint; "
            "serve the package and use `rnn-client generate` instead"
        )
    versions = sorted(
        (v.name for v in path.iterdir() if v.name.isdigit() and (v / "manifest.json").is_file()),
        key=int,
    )
    if versions:
        raise TrainerError(
            f"{path} is a model's name dir holding versions {', '.join(versions)}; pass one "
            f"version dir, e.g. --model {path / versions[-1]}"
        )


def _load(model_dir: Path | str):
    _check_source(model_dir)
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
