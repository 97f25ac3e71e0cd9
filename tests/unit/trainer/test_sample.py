"""`rnn-trainer sample`'s prefix handling, on a tiny untrained model (no checkpoint needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer import sample
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import RNNLM, ModelConfig

VOCAB = Vocab([*RESERVED, "a", "b", " "])


def loaded(config: TokenizerConfig):
    """What sample._load returns for a char LM with the given tokenizer."""
    return RNNLM(ModelConfig("gru", len(VOCAB), hidden=4, embed=2)), VOCAB, Tokenizer(config)


@pytest.mark.parametrize(
    ("config", "prefix", "message"),
    [
        (TokenizerConfig(level="word", letters_only=True), "日本 ...", r"no word-level.*a-z"),
        (TokenizerConfig(level="word"), "   ", r"'   ' has no word-level tokens"),
    ],
)
def test_a_prefix_the_tokenizer_erases_is_named(
    monkeypatch: pytest.MonkeyPatch, config: TokenizerConfig, prefix: str, message: str
) -> None:
    """Not "must contain at least one token": the user typed characters; say they vanish."""
    monkeypatch.setattr(sample, "_load", lambda _dir: loaded(config))
    for generate in (sample.greedy_tokens, sample.greedy_text):
        with pytest.raises(TrainerError, match=message):
            generate("unused", prefix, 3)


def test_empty_prefix_and_a_normal_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "_load", lambda _dir: loaded(TokenizerConfig()))
    with pytest.raises(TrainerError, match="at least one token"):
        sample.greedy_tokens("unused", "", 3)
    ids = sample.greedy_tokens("unused", "ab", 4)
    assert len(ids) == 4 and all(0 <= i < len(VOCAB) for i in ids)


def _package(folder: Path, task: str) -> Path:
    """A package dir as the server sees it, with no checkpoint.pt."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "manifest.json").write_text(json.dumps({"name": "m", "version": "1", "task": task}))
    return folder


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("forecast", r"forecast package.*only left-to-right \(lm\) models generate"),
        ("lm", r"no checkpoint\.pt beside model\.onnx.*rnn-trainer package.*rnn-client generate"),
    ],
)
def test_a_package_without_a_checkpoint_says_why(tmp_path: Path, task: str, message: str) -> None:
    """A forecast (zoo sine-mlp) or `rnn-trainer package` package said only "no checkpoint at
    .../checkpoint.pt (expected a checkpoint.pt or its dir)", though it is a package dir."""
    folder = _package(tmp_path / "m" / "1", task)
    for generate in (sample.greedy_tokens, sample.greedy_text):
        with pytest.raises(TrainerError, match=message):
            generate(folder, "ab", 3)


def test_a_model_name_dir_names_its_versions(tmp_path: Path) -> None:
    """`--model models/lstm` (the version left out) said "no checkpoint at
    models/lstm/checkpoint.pt": name the version dirs it holds instead."""
    for version in ("1", "2", "10"):
        _package(tmp_path / "lstm" / version, "lm")
    with pytest.raises(TrainerError, match=r"versions 1, 2, 10\b.*--model .*lstm/10\b"):
        sample.greedy_tokens(tmp_path / "lstm", "ab", 3)


def test_an_onnx_file_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    """`--model .../1/model.onnx` said the file "holds Python objects": point at its dir."""
    folder = _package(tmp_path / "m" / "1", "lm")
    with pytest.raises(TrainerError, match=r"model\.onnx is an ONNX graph.*--model .*m/1"):
        sample.greedy_tokens(folder / "model.onnx", "ab", 3)
