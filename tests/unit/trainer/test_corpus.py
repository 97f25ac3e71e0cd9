"""Corpus loading, tokenization into ids, one-hot encoding and the split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.trainer.corpus import (
    build_corpus,
    default_corpus_text,
    one_hot,
    read_corpus,
    split_ids,
)
from rnnserve.trainer.errors import TrainerError


def test_builtin_corpus_is_the_time_machine() -> None:
    text = read_corpus(None)
    assert text == default_corpus_text()
    assert "time traveller" in text.lower() and len(text) > 100_000


def test_char_corpus_round_trip() -> None:
    c = build_corpus("The Time, the time!", TokenizerConfig(letters_only=True))
    assert "".join(c.vocab.decode(c.ids)) == "the time the time "
    assert c.vocab.to_list()[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
    counts = [c.tokens.count(t) for t in c.vocab.to_list()[4:]]
    assert counts == sorted(counts, reverse=True)  # most frequent first


def test_word_stop_words_and_min_freq() -> None:
    text = "the cat and the dog and the bird " * 3 + "zebra"
    c = build_corpus(text, TokenizerConfig(level="word"), min_freq=2, stop_words={"the"})
    assert "the" not in c.tokens and "the" not in c.vocab
    assert "zebra" not in c.vocab and c.ids[-1] == c.vocab.unk


def test_stop_words_need_word_level() -> None:
    with pytest.raises(TrainerError, match="word"):
        build_corpus("a b c " * 20, TokenizerConfig(), stop_words={"a"})


def test_one_hot() -> None:
    x = torch.tensor([[0, 2], [1, 1]])
    oh = one_hot(x, 3)
    assert oh.shape == (2, 2, 3) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(-1), x) and torch.equal(oh.sum(-1), torch.ones(2, 2))


def test_split_is_contiguous() -> None:
    train, val = split_ids(list(range(100)), 0.1)
    assert train == list(range(90)) and val == list(range(90, 100))


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty"), (b"\n \n", "empty"), (b"caf\xe9 " * 10, "not UTF-8"), (b"ab", "tokens")],
)
def test_bad_corpora_raise_trainer_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    with pytest.raises(TrainerError, match=message):
        build_corpus(read_corpus(path))


def test_missing_and_directory_corpus(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="does not exist"):
        read_corpus(tmp_path / "none.txt")
    with pytest.raises(TrainerError, match="directory"):
        read_corpus(tmp_path)


def test_a_byte_order_mark_is_not_a_token(tmp_path: Path) -> None:
    """Windows editors start UTF-8 files with U+FEFF; it must not enter the vocabulary."""
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"Hello world. " * 8)
    corpus = build_corpus(read_corpus(path), TokenizerConfig(level="word"))
    assert "\ufeff" not in corpus.vocab and corpus.tokens[0] == "hello"


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_below_one_is_refused(max_tokens: int) -> None:
    """tokens[:-5] would quietly train on all but the last 5 tokens."""
    with pytest.raises(TrainerError, match="--max-tokens must be >= 1"):
        build_corpus("the time machine " * 20, max_tokens=max_tokens)


def test_min_freq_that_leaves_only_reserved_tokens_is_refused() -> None:
    """Every id would be <unk>: a model that learns nothing, with a perplexity near 1."""
    with pytest.raises(TrainerError, match="lower --min-freq"):
        build_corpus("the cat sat " * 10, TokenizerConfig(level="word"), min_freq=1000)


def test_a_text_letters_only_erases_names_the_cause() -> None:
    """A Japanese text under the train default (letters-only) is one space: the error says
    why and how to keep its characters, not just that there are too few tokens."""
    text = "吾輩は猫である。名前はまだ無い。" * 20
    with pytest.raises(TrainerError, match=r"1 tokens.*letters-only.*--keep-punctuation"):
        build_corpus(text, TokenizerConfig(letters_only=True))
    assert len(build_corpus(text, TokenizerConfig()).tokens) == len(text)


def test_a_max_tokens_below_the_minimum_is_named_as_the_cause() -> None:
    """The built-in text has 170k tokens: the letters-only hint (use --keep-punctuation) was
    the wrong cause and the wrong fix for a --max-tokens 10."""
    with pytest.raises(TrainerError, match=r"--max-tokens 10 keeps 10 of") as info:
        build_corpus(read_corpus(None), TokenizerConfig(letters_only=True), max_tokens=10)
    assert "letters-only" not in str(info.value)


def test_a_merely_short_text_gets_no_letters_only_hint() -> None:
    """--keep-punctuation cannot make "hello" long enough: the hint would send the user to
    the wrong flag."""
    with pytest.raises(TrainerError, match=r"corpus has 6 tokens") as info:
        build_corpus("hello!", TokenizerConfig(letters_only=True))
    assert "letters-only" not in str(info.value)
