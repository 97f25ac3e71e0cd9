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


def test_too_many_tokens_names_the_field() -> None:
    codec = TextCodec(_manifest("char", list("ab")))
    with pytest.raises(BadRequest) as err:
        codec.encode("ababab", "texts[2]", 5)
    assert err.value.field == "texts[2]"
