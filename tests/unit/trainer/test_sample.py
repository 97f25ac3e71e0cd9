"""`rnn-trainer sample`'s prefix handling, on a tiny untrained model (no checkpoint needed)."""

from __future__ import annotations

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
