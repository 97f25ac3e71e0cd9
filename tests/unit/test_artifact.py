"""The shared model-package format: tokenizer, vocabulary, manifest."""

from __future__ import annotations

import json

import pytest

from rnnserve.artifact.manifest import FORMAT_VERSION, Manifest, ManifestError, StateSpec
from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab


def test_char_tokenizer_normalises_and_round_trips() -> None:
    tok = Tokenizer(TokenizerConfig(level="char"))
    assert tok.tokenize("The  Time\nMachine") == list("the time machine")
    assert tok.detokenize(tok.tokenize("abc d")) == "abc d"


def test_letters_only_replaces_non_letters_with_one_space() -> None:
    tok = Tokenizer(TokenizerConfig(level="char", letters_only=True))
    assert "".join(tok.tokenize("It's 1895, sir!")) == "it s sir "


def test_word_tokenizer_splits_punctuation() -> None:
    tok = Tokenizer(TokenizerConfig(level="word"))
    assert tok.tokenize("Hello, World!") == ["hello", ",", "world", "!"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        TokenizerConfig(level="byte")


def test_vocab_orders_by_frequency_with_reserved_first() -> None:
    vocab = Vocab.build(list("aabbbc"))
    assert vocab.to_list()[: len(RESERVED)] == list(RESERVED)
    assert vocab.to_list()[len(RESERVED) :] == ["b", "a", "c"]


def test_vocab_min_freq_stop_words_and_unknowns() -> None:
    vocab = Vocab.build(["the", "the", "cat", "the", "sat", "sat"], min_freq=2, stop_words=["the"])
    assert vocab.to_list()[len(RESERVED) :] == ["sat"]
    assert vocab.encode(["sat", "dog"]) == [vocab.token_to_idx["sat"], vocab.unk]
    assert vocab.count_unknown(["sat", "dog", "cat"]) == 2


def test_vocab_encode_decode_round_trip() -> None:
    vocab = Vocab.build(list("hello world"))
    ids = vocab.encode(list("hello"))
    assert "".join(vocab.decode(ids)) == "hello"


def _manifest() -> Manifest:
    return Manifest(
        name="m",
        version="1",
        task="lm",
        architecture="lstm",
        hyperparameters={"layers": 1},
        input_name="tokens",
        output_name="logits",
        state=[StateSpec("h", "h_in", "h_out", [1, -1, 8], batch_axis=1)],
        tokenizer=TokenizerConfig(),
        vocab=[*RESERVED, "a"],
    )


def test_manifest_round_trips_through_json(tmp_path) -> None:
    _manifest().save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.to_dict() == _manifest().to_dict()
    assert loaded.vocab_size == 5


def test_manifest_refuses_unknown_format_version(tmp_path) -> None:
    data = _manifest().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version"):
        Manifest.load(tmp_path)


def test_manifest_names_missing_fields(tmp_path) -> None:
    data = _manifest().to_dict()
    del data["task"], data["state"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="task, state"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize(
    "vocab, why",
    [(["a", *RESERVED], "reserved tokens"), ([*RESERVED, "a", "a"], "unique")],
)
def test_manifest_refuses_a_vocab_the_codec_cannot_use(tmp_path, vocab, why) -> None:
    """Else the version loads as SERVING and every text call fails with INTERNAL."""
    data = {**_manifest().to_dict(), "vocab": vocab}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=f"vocab: .*{why}"):
        Manifest.load(tmp_path)


def test_state_batch_axis_must_be_symbolic() -> None:
    with pytest.raises(ManifestError, match="batch_axis"):
        StateSpec.from_dict(
            {"name": "h", "input": "a", "output": "b", "shape": [1, 2], "batch_axis": 1}
        )


def test_letters_only_keeps_capitals_when_case_is_kept() -> None:
    """`package --keep-case --letters-only`: capitals are letters, not spaces."""
    tok = Tokenizer(TokenizerConfig(level="word", lowercase=False, letters_only=True))
    assert tok.tokenize("Hello World, it's 1895") == ["Hello", "World", "it", "s"]
    lower = Tokenizer(TokenizerConfig(level="char", letters_only=True))
    assert "".join(lower.tokenize("Hello World")) == "hello world"


def test_tokenizer_flags_must_be_json_booleans() -> None:
    """bool("false") is True: a hand-edited manifest would tokenize unlike its training."""
    from rnnserve.artifact.tokenizer import TokenizerConfig

    assert TokenizerConfig.from_dict({"lowercase": False}).lowercase is False
    with pytest.raises(ValueError, match="lowercase must be true or false"):
        TokenizerConfig.from_dict({"lowercase": "false"})
