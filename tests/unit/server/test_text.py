"""TextCodec: streamed pieces per tokenizer level, limits, unknown-token counting."""

from __future__ import annotations

import pytest

from rnnserve.artifact.manifest import Manifest, StateSpec
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED
from rnnserve.server.errors import BadRequest
from rnnserve.server.text import TextCodec


def _manifest(level: str, tokens: list[str]) -> Manifest:
    return Manifest(
        name="m", version="1", task="lm", architecture="gru", hyperparameters={},
        input_name="tokens", output_name="logits",
        state=[StateSpec("h", "h_in", "h_out", [1, -1, 4], 1)],
        tokenizer=TokenizerConfig(level=level), vocab=[*RESERVED, *tokens],
    )  # fmt: skip


def test_word_level_pieces_carry_a_leading_space() -> None:
    codec = TextCodec(_manifest("word", ["the", "time"]))
    enc = codec.encode("The time machine", "prompt", 10)
    assert enc.ids == [4, 5, 0] and enc.unknown == 1
    assert codec.piece(5) == " time"


def test_char_level_pieces_are_the_characters() -> None:
    codec = TextCodec(_manifest("char", list("ab ")))
    assert codec.encode("ab c", "prompt", 10).ids == [4, 5, 6, 0]
    assert codec.piece(4) == "a"


@pytest.mark.parametrize("level", ["char", "word"])
def test_reserved_tokens_stream_as_no_text(level: str) -> None:
    """A generated <unk>/<pad>/<bos>/<eos> never puts "<pad>" into the user's text."""
    codec = TextCodec(_manifest(level, ["a"]))
    assert [codec.piece(i) for i in range(len(RESERVED))] == [""] * len(RESERVED)
    assert codec.piece(len(RESERVED)).strip() == "a"


def test_too_many_tokens_names_the_field() -> None:
    codec = TextCodec(_manifest("char", list("ab")))
    with pytest.raises(BadRequest) as err:
        codec.encode("ababab", "texts[2]", 5)
    assert err.value.field == "texts[2]"


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_huge_prompt_is_refused_without_building_all_its_tokens(level: str) -> None:
    """NFKC expands U+FDFA to 18 characters: a 4 MB prompt became 25 million token strings
    (about 2 GB, seconds of the event loop) before the limit was checked."""
    codec = TextCodec(_manifest(level, ["a"]))
    tokenize, built = codec.tokenizer.tokenize, []

    def spy(text: str, **kwargs: int) -> list[str]:
        tokens = tokenize(text, **kwargs)
        built.append(len(tokens))
        return tokens

    codec.tokenizer.tokenize = spy  # type: ignore[method-assign]
    with pytest.raises(BadRequest) as err:
        codec.encode("\ufdfa " * 2000, "prompt", 5)
    assert err.value.field == "prompt" and "more than the limit of 5 tokens" in str(err.value)
    assert built == [6]


def test_score_counts_only_the_unknown_tokens_it_scores() -> None:
    """The first token conditions the rest and is not scored: an unknown first character is
    not in unknown_tokens (it was, while `tokens` and `token_logprobs` left it out)."""
    import asyncio

    import numpy as np

    from rnnserve.server.scoring import encode_texts, score

    codec = TextCodec(_manifest("char", list("ab ")))

    class Uniform:
        specs = ()  # no state pairs: each text runs in one call

        def run(self, x, state):
            return np.zeros((*x.shape, len(codec)), np.float32), state

        def initial_state(self, batch):
            return []

    class Inline:
        async def call(self, fn, *args):
            return fn(*args)

    encoded = encode_texts(codec, ["日ab", "a日b"], max_texts=4, max_tokens=16)
    first, middle = asyncio.run(score(Uniform(), Inline(), codec, encoded))
    assert first.unknown_tokens == 0 and first.tokens == ["a", "b"]
    assert middle.unknown_tokens == 1 and middle.tokens == ["日", "b"]


@pytest.mark.parametrize("left, right", [("  ", ""), ("", " \n "), (" ", "\t")])
def test_infill_contexts_with_no_tokens_are_invalid(left: str, right: str) -> None:
    """A word-level context of only spaces has no token: with both sides like that the blank
    has no context at all, INVALID_ARGUMENT as for empty strings (it answered a uniform prior
    dressed up as candidates)."""
    import asyncio
    from types import SimpleNamespace

    from rnnserve.server.infill import infill
    from rnnserve.server.settings import Settings

    manifest = _manifest("word", ["the", "time", "machine", "by", "wells"])
    codec = TextCodec(manifest)
    entry = SimpleNamespace(name="m", manifest=manifest, model=object())
    with pytest.raises(BadRequest) as err:
        asyncio.run(infill(entry, codec, None, Settings(), left, right, 0))
    assert err.value.field == "left" and "no token" in str(err.value)
