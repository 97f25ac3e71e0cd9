"""Pure stop rules: max_tokens, eos, and stop strings split across tokens."""

from __future__ import annotations

import pytest

from server.errors import BadRequest
from server.stopping import EOS, LENGTH, STOP, StopChecker, validate_stop


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
