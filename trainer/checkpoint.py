"""Checkpoints: state_dict + config dataclasses + vocabulary, never a pickled module.

Why: a pickled module breaks when the code moves and can run arbitrary code on load; a dict of
tensors and primitives loads with `torch.load(weights_only=True)` and rebuilds via ModelConfig.
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import ModelConfig, build_model

CHECKPOINT_FILE = "checkpoint.pt"


def make_checkpoint(
    model: torch.nn.Module,
    config: ModelConfig,
    vocab: Vocab,
    tokenizer: TokenizerConfig,
    train: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    history: list[dict] | None = None,
) -> dict[str, Any]:
    return {
        "format": 1,
        "model_config": asdict(config),
        "train_config": dict(train or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "history": list(history or []),
        "vocab": vocab.to_list(),
        "tokenizer": tokenizer.to_dict(),
    }


def make_count_checkpoint(model: torch.nn.Module, vocab: Vocab, tokenizer: TokenizerConfig):
    """n-gram / HMM: their config dataclass + buffers (tables, probabilities), no code."""
    return {
        "format": 1,
        "kind": model.arch,
        "count_config": asdict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_list(),
        "tokenizer": tokenizer.to_dict(),
    }


def _restore_count_model(data: dict[str, Any]) -> torch.nn.Module:
    kind, cfg, sd = data["kind"], data["count_config"], data["state_dict"]
    if kind == "ngram":
        from rnnserve.trainer.ngram import NgramConfig, NgramLM

        return NgramLM(NgramConfig(**cfg), sd["log_probs"])
    if kind == "hmm":
        from rnnserve.trainer.hmm import HmmConfig, HmmLM
        from rnnserve.trainer.hmm_fit import HmmParams

        params = HmmParams(sd["pi"].double(), sd["loop.a"].double(), sd["loop.b"].double())
        return HmmLM(params, HmmConfig(**cfg))
    raise TrainerError(f"checkpoint holds an unknown model kind {kind!r}")


def save_checkpoint(data: dict[str, Any], path: Path) -> Path:
    """Writes atomically (temp file + rename), so an interrupted save keeps the old one and
    leaves no half-written temp file beside it. The temp file is fsynced before the rename and
    the directory after it: without that a crash or power loss soon after the save can leave
    the renamed name pointing at an empty file (ext4, XFS, NFS), so neither checkpoint is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(data, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    """Flushes a file's (or a directory's entries') data to the disk; where a directory cannot
    be opened (Windows) the rename's durability is the filesystem's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems refuse fsync on a directory: nothing lost
            raise
    finally:
        os.close(fd)


def resolve(path: Path | str) -> Path:
    """Accepts a checkpoint file or a directory holding checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise TrainerError(f"no checkpoint at {path} (expected a {CHECKPOINT_FILE} or its dir)")
    return path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    file = resolve(path)
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one line, not a traceback
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        foreign = "it is not a file torch.save wrote (give checkpoint.pt or the run dir)"
        if "Weights only load failed" in str(exc):  # torch's long advice to unpickle anyway
            why = "it holds Python objects, not only tensors and plain data, so it is not loaded"
            if not _torch_file(file):  # log.jsonl, model.onnx: no pickle of torch's at all
                why = foreign
        elif not isinstance(exc, OSError) and not _torch_file(file, empty=True):
            why = foreign  # a text file: the unpickler's "pop from empty list" or "105"
        elif _damaged(exc):  # torch says "[Errno 22] Invalid argument" for a cut-off file
            why = f"it is truncated or damaged ({_first_sentence(why)[:200]})"
        raise TrainerError(f"{file} is not a readable rnnserve checkpoint: {why}") from exc
    if not isinstance(data, dict) or "state_dict" not in data or "vocab" not in data:
        raise TrainerError(f"{file} is not an rnnserve checkpoint (no state_dict/vocab)")
    if "model_config" not in data and "count_config" not in data:
        raise TrainerError(f"{file} is not an rnnserve checkpoint (no model config)")
    return data


def _torch_file(file: Path, empty: bool = False) -> bool:
    """Whether `file` starts as torch.save output does: a zip archive (PyTorch 1.6 on) or a
    pickle (the legacy format); an empty file counts when `empty` (a cut-off checkpoint)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # unreadable: the error torch gave says why
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or (empty and not head)


def _first_sentence(text: str) -> str:
    """torch's zip reader follows its reason with advice that a 200-character cut ends
    mid-sentence ("... your checkpoint file is"): keep the reason alone."""
    return text.split(". ", 1)[0]


def _damaged(exc: BaseException) -> bool:
    """Whether torch.load failed on the bytes themselves (a cut-off or overwritten file), as
    opposed to the file's permissions or its content's types."""
    if isinstance(exc, EOFError) or "PytorchStreamReader" in str(exc):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL


def restore(data: dict[str, Any]) -> tuple[torch.nn.Module, Any, Vocab, TokenizerConfig]:
    """Rebuilds the model (and returns its config) from config + state_dict; a checkpoint
    that does not fit this code's models (damaged, edited, from another version) is a
    TrainerError that says so, not a traceback."""
    try:
        if "count_config" in data:
            model = _restore_count_model(data)
            config: Any = model.config
        else:
            config = ModelConfig(**data["model_config"])
            model = build_model(config)
            model.load_state_dict(data["state_dict"])
        model.eval()
        return model, config, Vocab(data["vocab"]), TokenizerConfig.from_dict(data["tokenizer"])
    except TrainerError:
        raise
    except (TypeError, KeyError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainerError(
            f"the checkpoint does not match this version's models ({type(exc).__name__}: {first})"
        ) from exc
