"""Word-level text as users write it: logprobs offsets of characters the tokenizer expands
("…" -> three "." tokens), and stop strings written as text ("isn't.", "Filby") in the
spaced, lower-case form a word-level model streams."""

from __future__ import annotations

import pytest

from rnnserve.artifact.manifest import Manifest, StateSpec
from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import RESERVED
from rnnserve.server.errors import BadRequest
from rnnserve.server.http.completions import token_logprobs
from rnnserve.server.stopping import MAX_STOP_CHARS, STOP, StopChecker
from rnnserve.server.text import TextCodec

WORDS = ["isn", "'", "t", "it", ".", "filby", "said", "time", "(", "for", "late", ","]


def _codec(level: str = "word", letters_only: bool = False) -> TextCodec:
    manifest = Manifest(
        name="m", version="1", task="lm", architecture="gru", hyperparameters={},
        input_name="tokens", output_name="logits",
        state=[StateSpec("h", "h_in", "h_out", [1, -1, 4], 1)],
        tokenizer=TokenizerConfig(level=level, letters_only=letters_only),
        vocab=[*RESERVED, *WORDS],
    )  # fmt: skip
    return TextCodec(manifest)


def _offsets(text: str, config: TokenizerConfig) -> list[tuple[str, str]]:
    """(token, the text at its offset) for each token of `text`."""
    tokenizer = Tokenizer(config)
    tokens = tokenizer.tokenize(text)
    found = token_logprobs(text, tokens, [None] * len(tokens), tokenizer.normalize)
    return [(t, text[o : o + 1]) for t, o in zip(tokens, found["text_offset"], strict=True)]


def test_offsets_of_an_ellipsis_stay_on_it_and_the_rest_follow() -> None:
    """NFKC reads "…" as "..."; the search kept "…" and ran on to the next "." in the text
    (10), and every later token ("what", "yes") was put at 16, past them."""
    text = "Wait… what. Yes."
    got = _offsets(text, TokenizerConfig(level="word"))
    assert got == [("wait", "W"), (".", "…"), (".", "…"), (".", "…"), ("what", "w"),
                   (".", "."), ("yes", "Y"), (".", ".")]  # fmt: skip
    found = token_logprobs(text, [t for t, _ in got], [None] * len(got), Tokenizer().normalize)
    assert found["text_offset"] == [0, 4, 4, 4, 6, 10, 12, 15]


@pytest.mark.parametrize("level", ["word", "char"])
def test_offsets_of_a_character_lowercased_to_two_are_its_own(level: str) -> None:
    """Lower-cased, "İ" is "i" + U+0307: its "i" was found in "is" (3), later in the text."""
    got = _offsets("İt is", TokenizerConfig(level=level))
    assert got[0] == ("i", "İ") and got[1] == ("\u0307", "İ")
    assert [o for _, o in got[2:]] == (["t", "i"] if level == "word" else ["t", " ", "i", "s"])


def test_a_token_not_found_stands_on_its_first_character_not_the_space_before() -> None:
    """A decomposed accent composes only in the whole text's NFKC, so "café" is not found
    character by character; it was put at the end of "the" (the space)."""
    got = _offsets("The cafe\u0301 time", TokenizerConfig(level="word"))
    assert got == [("the", "T"), ("café", "c"), ("time", "t")]


def test_offsets_of_plain_text_are_unchanged() -> None:
    text = "It's   LATE,\nisn't it?"
    tokenizer = Tokenizer(TokenizerConfig(level="word"))
    tokens = tokenizer.tokenize(text)
    found = token_logprobs(text, tokens, [None] * len(tokens), tokenizer.normalize)
    assert found["text_offset"] == [0, 2, 3, 7, 11, 13, 16, 17, 19, 21]


@pytest.mark.parametrize(
    ("stop", "form"),
    [
        ("isn't.", "isn ' t ."),  # the streamed text is " isn ' t ."
        ("Filby", "filby"),  # lower-cased, as the model's text is
        ("him)", "him )"),
        ("\nThe", " the"),  # a leading newline: a word boundary, as in the text
        ("late, ", "late , "),
        ("ler", "ler"),  # mid-word: unchanged
        (" (", " ("),
        ("\n", "\n"),  # no token: kept as sent (" " would stop at the first space)
        ("\n\n", "\n\n"),
    ],
)
def test_a_stop_string_takes_the_form_the_model_streams(stop: str, form: str) -> None:
    assert _codec().stop_form(stop, "stop[0]") == form


def test_a_stop_string_at_char_level_is_normalised_but_not_spaced() -> None:
    codec = _codec("char")
    assert codec.stop_form("The  Time", "stop[0]") == "the time"
    assert codec.stop_form("\n", "stop[0]") == "\n"  # never " ": it would stop at every space


def test_a_stop_string_letters_only_erases_is_kept_as_sent() -> None:
    codec = _codec(letters_only=True)
    assert codec.stop_form("!!!", "stop[0]") == "!!!"
    assert codec.stop_form("isn't.", "stop[0]") == "isn t "


def test_a_stop_string_normalised_past_the_bound_is_refused_by_its_field() -> None:
    """U+FDFA is 18 characters in NFKC: the held-back text may be as long as the stop."""
    with pytest.raises(BadRequest, match=r"stop\[2\]: is over"):
        _codec("char").stop_form("\ufdfa" * MAX_STOP_CHARS, "stop[2]")


def test_a_word_level_stream_stops_on_a_stop_string_written_as_text() -> None:
    """The streamed pieces of "isn't it." never held "isn't": as sent it never matched."""
    codec = _codec()
    ids = [codec.vocab.token_to_idx[t] for t in ["late", "isn", "'", "t", "it", "."]]
    pieces = [codec.piece(i) for i in ids]
    as_sent = StopChecker(max_tokens=10, stop=["isn't"])
    assert [as_sent.feed(i, p)[1] for i, p in zip(ids, pieces, strict=True)] == [None] * 6
    checker = StopChecker(max_tokens=10, stop=[codec.stop_form("isn't", "stop[0]")])
    out = [checker.feed(i, p) for i, p in list(zip(ids, pieces, strict=True))[:4]]
    assert "".join(text for text, _ in out) == " late " and out[-1][1] == STOP


def test_the_token_after_one_not_found_is_searched_for_after_it() -> None:
    """ "e" + U+0301 composes to "é" only in the whole text's normal form, so that token is not
    found; the search stayed where it was and put the next "e" on the same character."""
    text = "e\u0301e"
    found = token_logprobs(text, ["é", "e"], [None, None], Tokenizer().normalize)
    assert found["text_offset"] == [0, 2]
