"""Pure stop rules: max_tokens, eos, and stop strings split across tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.server.errors import BadRequest
from rnnserve.server.stopping import EOS, LENGTH, STOP, StopChecker, validate_stop


def _run(checker: StopChecker, pieces: list[str]) -> tuple[str, str | None]:
    out, reason = "", None
    for i, piece in enumerate(pieces):
        text, reason = checker.feed(i + 10, piece)
        out += text
        if reason:
            break
    return out, reason


def test_max_tokens_ends_with_length() -> None:
    assert _run(StopChecker(3), list("abcdef")) == ("abc", LENGTH)


def test_stop_string_across_token_boundaries_is_not_emitted() -> None:
    assert _run(StopChecker(100, ["lo w"]), list("hello world")) == ("hel", STOP)


def test_partial_stop_prefix_is_released_when_it_does_not_match() -> None:
    assert _run(StopChecker(6, ["xyz"]), list("abxyab")) == ("abxyab", LENGTH)


def test_held_text_is_not_shown_early() -> None:
    checker = StopChecker(100, ["ab"])
    assert checker.feed(1, "xa") == ("x", None)  # "a" might start "ab"
    assert checker.feed(2, "c") == ("ac", None)


def test_eos_flushes_held_text() -> None:
    checker = StopChecker(100, ["ab"], eos_id=3)
    checker.feed(1, "xa")
    assert checker.feed(3, "") == ("a", EOS)


def test_stop_inside_a_single_token() -> None:
    assert _run(StopChecker(10, [" the"]), [" on", " the", " hill"]) == (" on", STOP)


def test_validate_stop_limits() -> None:
    with pytest.raises(BadRequest) as err:
        validate_stop(["a"] * 9)
    assert err.value.field == "stop"
    with pytest.raises(BadRequest) as err:
        validate_stop(["ok", ""])
    assert err.value.field == "stop[1]"


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 5), min_size=1, max_size=30),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=30),
    stop=st.sampled_from([[], ["cd"], ["b", "dca"]]),
    max_tokens=st.integers(1, 40),
)
def test_feed_run_equals_feeding_token_by_token(ids, cuts, stop, max_tokens) -> None:
    """Whatever runs the tokens come in, feed_run emits what feed emits, and stops at the
    same token for the same reason (token 0 is the end of sequence)."""
    piece = "abcd?"

    one = StopChecker(max_tokens, stop, eos_id=0)
    want, want_reason, want_n = "", None, 0
    for t in ids:
        text, want_reason = one.feed(t, piece[t - 1] if t else "")
        want, want_n = want + text, want_n + 1
        if want_reason:
            break

    runs = StopChecker(max_tokens, stop, eos_id=0)
    got, reason, n, rest, cuts = "", None, 0, list(ids), list(cuts)
    while rest and reason is None:
        k = cuts.pop(0) if cuts else len(rest)
        run, rest = rest[:k], rest[k:]
        used, text, reason = runs.feed_run(run, [piece[t - 1] if t else "" for t in run])
        got, n = got + text, n + used
        assert used == len(run) or reason is not None
    assert (got, reason, n) == (want, want_reason, want_n)


def _reference(pieces: list[str], stop: list[str], max_tokens: int) -> tuple[str, str | None]:
    """vLLM's rule, on the whole text: after each token, if any stop string occurs in the
    generated text, it ends before the earliest occurrence; else at max_tokens."""
    text = ""
    for i, piece in enumerate(pieces):
        text += piece
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], STOP
        if i + 1 >= max_tokens:
            return text, LENGTH
    return text, None


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text("abé\n", max_size=3), min_size=1, max_size=12),
    stop=st.lists(st.text("abé\n", min_size=1, max_size=4), min_size=1, max_size=3),
    max_tokens=st.integers(1, 14),
)
def test_stop_strings_match_the_whole_text_rule(pieces, stop, max_tokens) -> None:
    """Overlapping stop strings, ones spanning several tokens or inside one, empty tokens,
    non-ASCII: what is emitted equals the rule applied to the whole text, and no message
    shows a stop string, or a part of one that the next tokens complete."""
    checker = StopChecker(max_tokens, stop)
    out, reason = "", None
    for i, piece in enumerate(pieces):
        text, reason = checker.feed(i + 10, piece)
        out += text
        if reason:
            break
        assert not any(s in out for s in stop)
    if reason is None:
        out += checker.flush()
    assert (out, reason) == _reference(pieces, stop, max_tokens)


def test_a_stop_string_longer_than_max_tokens_releases_its_prefix_at_the_end() -> None:
    assert _run(StopChecker(3, ["abcdef"]), list("abcdef")) == ("abc", LENGTH)


def test_eos_wins_over_a_stop_string_completed_by_its_text() -> None:
    """The end-of-sequence token adds no text, so it cannot complete a stop string."""
    checker = StopChecker(10, ["a<eos>"], eos_id=3)
    assert checker.feed(1, "a") == ("", None)
    assert checker.feed(3, "<eos>") == ("a", EOS)
