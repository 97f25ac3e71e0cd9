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
    [
        (["a", *RESERVED], "reserved tokens"),
        ([*RESERVED, "a", "a"], "unique"),
        ([*RESERVED, "a", 1], "non-empty string, got 1"),  # a digit written unquoted
        ([*RESERVED, None], "non-empty string, got None"),
        ([*RESERVED, ""], "non-empty string"),  # no tokenizer yields it
    ],
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


@pytest.mark.parametrize(
    "tokenizer, why",
    [
        ("word", "JSON object"),  # the level alone, as GetModel shows it
        (["char"], "JSON object"),
        ({"levle": "word"}, "unknown settings 'levle'"),  # silently char level before
        ({"level": "word", "letters_onyl": True}, "unknown settings 'letters_onyl'"),
    ],
)
def test_manifest_refuses_a_malformed_tokenizer(tmp_path, tokenizer, why) -> None:
    """A misspelt key fell back to its default (a word model served at char level), and a
    string raised AttributeError instead of saying what is wrong."""
    data = {**_manifest().to_dict(), "tokenizer": tokenizer}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=why):
        Manifest.load(tmp_path)


def test_tokenizer_keys_left_out_take_the_defaults() -> None:
    """docs/contracts.md: an empty object is the default tokenizer, not a missing one."""
    data = {**_manifest().to_dict(), "tokenizer": {}}
    assert Manifest.from_dict(data).tokenizer == TokenizerConfig()


@pytest.mark.parametrize("level", ["char", "word"])
def test_tokenize_with_a_limit_stops_after_limit_plus_one(level: str) -> None:
    """NFKC expands U+FDFA to 18 characters: a 4 MB prompt was 25 million token strings
    (about 2 GB) before the server's --max-prompt-tokens check looked at it."""
    tok = Tokenizer(TokenizerConfig(level=level))
    text = "\ufdfa " * 1000
    assert len(tok.tokenize(text, limit=10)) == 11
    assert tok.tokenize(text, limit=10) == tok.tokenize(text)[:11]
    assert tok.tokenize("a b", limit=10) == tok.tokenize("a b")


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize(
    "text",
    [
        "Caf\u00e9 cafe\u0301",  # NFC vs NFD
        "\uff21\uff22\uff23\u3000\uff44",  # full-width letters and space
        "a\r\nb\tc\u00a0d\u2028e",  # CRLF, tab, no-break space, line separator
        "\u0130stanbul STRASSE stra\u00dfe \u1e9e",  # Turkish dotted I, German sharp s
        "\U0001f468\u200d\U0001f469 a\u200bb",  # ZWJ emoji, zero-width space
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u039f\u0394\u039f\u03a3",  # marks, final sigma
        "don't... \ufb01ne x\u00b2 " + "w" * 5000,  # ligature, superscript, a long word
    ],
)
def test_decoded_tokens_re_encode_to_the_same_tokens(level: str, text: str) -> None:
    """What the server streams (tokens joined by the level's separator) tokenizes back to the
    same tokens, so a generated text sent back as a prompt means what the model produced."""
    for lowercase in (True, False):
        tok = Tokenizer(TokenizerConfig(level=level, lowercase=lowercase))
        tokens = tok.tokenize(text)
        assert tok.tokenize(tok.separator.join(tokens)) == tokens
        assert tok.normalize(tok.normalize(text)) == tok.normalize(text)
    nfd = Tokenizer(TokenizerConfig(level=level))
    assert nfd.tokenize("cafe\u0301") == nfd.tokenize("caf\u00e9")


def test_a_manifest_is_strict_json_whatever_numbers_it_holds(tmp_path) -> None:
    """inf and NaN were written as Infinity and NaN (a precision check's overflowing
    perplexity), which JSON parsers outside Python refuse; they are null now."""
    m = _manifest()
    m.metrics = {"val_perplexity": 3.5, "diverged": float("nan")}
    m.parity = {"precision": {"perplexity": float("inf"), "rows": [1.0, float("-inf")]}}
    path = m.save(tmp_path)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["parity"]["precision"] == {"perplexity": None, "rows": [1.0, None]}
    loaded = Manifest.load(tmp_path)
    assert loaded.metrics == {"val_perplexity": 3.5}
