"""TextCodec: streamed pieces per tokenizer level, limits, unknown-token counting."""

from __future__ import annotations

import pytest

from rnnserve.artifact.manifest import Manifest, StateSpec
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED
from rnnserve.server.errors import BadRequest
from rnnserve.server.text import (
    BOUNDARY_TOKENS,
    PREFIX_CHARS_PER_TOKEN,
    TextCodec,
    _combining_run,
)


def _manifest(level: str, tokens: list[str]) -> Manifest:
    return Manifest(
        name="m", version="1", task="lm", architecture="gru", hyperparameters={},
        input_name="tokens", output_name="logits",
        state=[StateSpec("h", "h_in", "h_out", [1, -1, 4], 1)],
        tokenizer=TokenizerConfig(level=level), vocab=[*RESERVED, *tokens],
    )  # fmt: skip


class _Uniform:
    """A model with no state pairs (each text runs in one call) whose logits are all zero."""

    specs = ()

    def __init__(self, width: int) -> None:
        self.width = width

    def run(self, x, state):
        import numpy as np

        return np.zeros((*x.shape, self.width), np.float32), state

    def initial_state(self, batch):
        return []


class _Inline:
    """A runtime that runs each call at once, in the caller's thread."""

    async def call(self, fn, *args):
        return fn(*args)


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
    assert built and max(built) <= 5 + BOUNDARY_TOKENS + 1


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_huge_prompt_is_refused_after_normalising_only_a_prefix(level: str) -> None:
    """NFKC ran over the whole text before the limit applied: 4 MB of U+FDFA (18 characters
    each after NFKC) held the event loop for about 2 s only to be refused."""
    codec = TextCodec(_manifest(level, ["a"]))
    normalize, seen = codec.tokenizer.normalize, []

    def spy(text: str) -> str:
        seen.append(len(text))
        return normalize(text)

    codec.tokenizer.normalize = spy  # type: ignore[method-assign]
    text = "\ufdfa " * 500_000
    with pytest.raises(BadRequest, match="more than the limit of 4096 tokens"):
        codec.encode(text, "prompt", 4096)
    assert sum(seen) <= PREFIX_CHARS_PER_TOKEN * 4097 + BOUNDARY_TOKENS < len(text) // 50


def test_cutting_a_long_text_into_prefixes_decides_the_limit_as_the_whole_text_does() -> None:
    """Every prefix cut lands somewhere: inside a run of spaces, between a letter and its
    combining marks, inside a word, between Hangul jamo that compose, after a Greek capital
    sigma (lowercased by context). Whatever it cuts, the answer must be the whole text's."""
    import random

    pieces = [
        "a", "b", " ", "   \t\n ", "\ufdfa", "e\u0301", "\u0301" * 12, "\u1100\u1161",
        "\u11a8", "\u03a3", "x" * 40, "\u00bd", "\uff21", ".", "\u0130",
    ]  # fmt: skip
    rng = random.Random(0)
    for level in ("char", "word"):
        codec = TextCodec(_manifest(level, ["a", "b"]))
        for _ in range(60):
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(200, 3000)))
            if _combining_run().search(text):
                continue  # refused before any normalising (tested above)
            full = codec.tokenizer.tokenize(text)
            limit = max(1, len(full) + rng.randrange(-1100, 40))
            if len(full) > limit:
                with pytest.raises(BadRequest, match="more than the limit"):
                    codec.encode(text, "prompt", limit)
            else:
                assert codec.encode(text, "prompt", limit).tokens == full


@pytest.mark.parametrize("letters_only", [False, True])
@pytest.mark.parametrize("level", ["char", "word"])
def test_a_prefix_cut_among_marks_jamo_and_sigma_never_refuses_a_text_within_the_limit(
    level: str, letters_only: bool
) -> None:
    """The test above never has a prefix decide (its texts are about one token per character,
    so every prefix is longer than the text): a dense head then a long sparse tail makes the
    prefixes, cut among the tail's marks, jamo and sigmas, hold the whole text's count. A
    text of exactly the limit must pass, one token more must not."""
    import random

    from rnnserve.artifact.tokenizer import Tokenizer

    codec = TextCodec(_manifest(level, ["a", "b"]))
    codec.tokenizer = Tokenizer(TokenizerConfig(level=level, letters_only=letters_only))
    dense = ["a", "b", " ", "e\u0301", "\u1100\u1161", "\u03a3", "\u0130", ".", "\u00bd"]
    sparse = ["e\u0301", "\u0301" * 12, "\u1100\u1161", "\u11a8", "\u03a3", "\u0130", "x", "."]
    prefixes = []
    real = codec.tokenizer.tokenize

    def spy(text: str, limit: int | None = None) -> list[str]:
        prefixes.append(len(text))
        return real(text, limit)

    codec.tokenizer.tokenize = spy  # type: ignore[method-assign]
    rng = random.Random(1)
    for _ in range(12):
        head = "".join(rng.choice(dense) for _ in range(rng.randrange(200, 1500)))
        tail = "".join(" " * 60 + rng.choice(sparse) for _ in range(rng.randrange(200, 600)))
        text = head + tail
        full = real(text)
        prefixes.clear()
        assert codec.encode(text, "prompt", len(full)).tokens == full
        assert min(prefixes) < len(text), "no prefix was tried: the cut is not under test"
        with pytest.raises(BadRequest, match="more than the limit"):
            codec.encode(text, "prompt", len(full) - 1)


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_prefix_cut_between_a_letter_and_its_accent_keeps_a_text_at_the_limit(level: str) -> None:
    """Letters-only: "e" + U+0301 is "é", not a letter, so a space. A prefix cut between the
    two ends in a token "e" the whole text has not: the prefix holds one token more than the
    text, which BOUNDARY_TOKENS must absorb, not refuse."""
    from rnnserve.artifact.tokenizer import Tokenizer

    codec = TextCodec(_manifest(level, ["a", "b"]))
    codec.tokenizer = Tokenizer(TokenizerConfig(level=level, letters_only=True))
    head = "ab " * 400
    limit = len(codec.tokenizer.tokenize(head + " e\u0301"))
    cut = PREFIX_CHARS_PER_TOKEN * (limit + 1) + BOUNDARY_TOKENS  # the first prefix's length
    text = head + " " * (cut - 1 - len(head)) + "e\u0301" + " " * cut
    assert text[cut - 1 : cut + 1] == "e\u0301"
    assert len(codec.tokenizer.tokenize(text[:cut])) == limit + 1  # "e" counts in the prefix
    assert len(codec.encode(text, "prompt", limit).tokens) == limit


def test_score_counts_only_the_unknown_tokens_it_scores() -> None:
    """The first token conditions the rest and is not scored: an unknown first character is
    not in unknown_tokens (it was, while `tokens` and `token_logprobs` left it out)."""
    import asyncio

    from rnnserve.server.scoring import encode_texts, score

    codec = TextCodec(_manifest("char", list("ab ")))
    encoded = encode_texts(codec, ["日ab", "a日b"], max_texts=4, max_tokens=16)
    first, middle = asyncio.run(score(_Uniform(len(codec)), _Inline(), codec, encoded))
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


@pytest.mark.parametrize(
    "run",
    [
        "\u0301\u0316" * 2000,  # combining acute (class 230) and grave below (220), alternating
        "\u0f73" * 4000,  # a starter that NFKC decomposes into two marks of classes 129, 130
        "\uff9e\u0301" * 2000,  # half-width voiced mark: a starter whose NFKC is a mark
    ],
)
def test_a_long_run_of_combining_marks_is_refused_before_normalising(run: str) -> None:
    """NFKC puts a run of combining marks in order with an insertion sort: 160 kB of marks
    alternating two classes held the event loop for seconds (4 MB: about an hour). A run over
    Unicode's stream-safe 30 (UAX #15) is INVALID_ARGUMENT, before NFKC sees it."""
    codec = TextCodec(_manifest("char", list("ab")))
    normalize, seen = codec.tokenizer.normalize, []

    def spy(text: str) -> str:
        seen.append(text)
        return normalize(text)

    codec.tokenizer.normalize = spy  # type: ignore[method-assign]
    with pytest.raises(BadRequest) as err:
        codec.encode("ab" + run + "ab", "texts[1]", 10**6)
    assert err.value.field == "texts[1]" and "combining marks" in str(err.value)
    assert seen == []


def test_combining_marks_up_to_the_stream_safe_limit_tokenize_as_before() -> None:
    codec = TextCodec(_manifest("char", list("ab")))
    text = "a" + "\u0316\u0301" * 15 + " b\u0f73\u0f73"  # 30 marks, then 4 after the b
    enc = codec.encode(text, "prompt", 100)
    assert enc.tokens == codec.tokenizer.tokenize(text)


def test_infill_without_top_k_on_a_vocabulary_under_five_tokens_returns_them_all() -> None:
    """top_k 0 means 5; a model of 4 real tokens (DNA) refused every request that left it
    unset ("top_k: must be in [1, 4], got 5"), a field the caller never sent."""
    import asyncio
    from dataclasses import replace
    from types import SimpleNamespace

    from rnnserve.server.infill import infill
    from rnnserve.server.settings import Settings

    manifest = replace(_manifest("char", list("acgt")), task="infill", state=[])
    codec = TextCodec(manifest)
    entry = SimpleNamespace(name="dna", manifest=manifest, model=_Uniform(len(codec)))
    found = asyncio.run(infill(entry, codec, _Inline(), Settings(), "ac", "t", 0))
    assert sorted(c.text for c in found) == list("acgt")
    assert sum(c.probability for c in found) == pytest.approx(1.0)


def test_a_cancelled_lm_infill_stops_scoring_candidates(monkeypatch) -> None:
    """An lm Infill scores |V| continuations in many ORT calls (a 4096-word model with a long
    right context: minutes of a worker thread). A caller that cancels or passes its deadline
    stops them after the call in flight; they ran on, holding one of --executor-threads."""
    import asyncio
    import threading
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from rnnserve.server import infill as infill_module
    from rnnserve.server.runtime import Runtime
    from rnnserve.server.settings import Settings

    manifest = replace(_manifest("char", list("abcdefgh")), state=[])
    codec = TextCodec(manifest)
    entered, release = threading.Event(), threading.Event()

    class Blocking:
        specs = ()
        calls = 0

        def run(self, x, state):
            Blocking.calls += 1
            if Blocking.calls == 2:  # the first candidate batch: hold it until cancelled
                entered.set()
                release.wait(30)
            return np.zeros((*x.shape, len(codec)), np.float32), state

        def initial_state(self, batch):
            return []

    monkeypatch.setattr(infill_module, "MAX_LOGIT_ELEMENTS", 3 * len(codec))  # 1 candidate
    entry = SimpleNamespace(name="m", manifest=manifest, model=Blocking())
    runtime = Runtime(1)

    async def main() -> None:
        task = asyncio.ensure_future(
            infill_module.infill(entry, codec, runtime, Settings(), "ab", "cd", 0)
        )
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await runtime.call(lambda: None)  # one worker: runs once the infill job has ended

    try:
        asyncio.run(main())
    finally:
        release.set()
        runtime.close()
    assert Blocking.calls == 2, "no candidate batch ran after the cancellation"


@pytest.mark.parametrize("prompt, why", [("   ", "no token after tokenization"), ("", "is empty")])
def test_a_prompt_the_tokenizer_erases_is_not_called_empty(prompt: str, why: str) -> None:
    """A word-level prompt of only spaces was refused as "is empty" though text was sent."""
    from types import SimpleNamespace

    from rnnserve.server.generation import GenerateParams, Generator
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.settings import Settings

    entry = SimpleNamespace(name="m", version="1", manifest=_manifest("word", ["the", "time"]))
    generator = Generator(entry, None, None, None, Settings(), Metrics())
    with pytest.raises(BadRequest) as err:
        generator._validate(GenerateParams(prompt=prompt, max_tokens=4))
    assert err.value.field == "prompt" and why in str(err.value)


def test_a_bidirectional_infill_past_the_logits_budget_is_refused_before_running(
    monkeypatch,
) -> None:
    """A bidirectional graph runs the whole context in one call and outputs logits at every
    position: with a large vocabulary and --max-prompt-tokens raised that asked ORT for
    gigabytes at once (lm models run in windows instead)."""
    import asyncio
    from dataclasses import replace
    from types import SimpleNamespace

    from rnnserve.server import infill as infill_module
    from rnnserve.server.settings import Settings

    manifest = replace(_manifest("char", list("abcd")), task="infill", state=[])
    codec = TextCodec(manifest)
    monkeypatch.setattr(infill_module, "MAX_LOGIT_ELEMENTS", 10 * len(codec))  # 9 tokens
    entry = SimpleNamespace(name="m", manifest=manifest, model=_Uniform(len(codec)))
    found = asyncio.run(
        infill_module.infill(entry, codec, _Inline(), Settings(), "abab", "cdcd", 0)
    )
    assert len(found) == 4
    with pytest.raises(BadRequest) as err:
        asyncio.run(infill_module.infill(entry, codec, _Inline(), Settings(), "ababa", "cdcdc", 0))
    assert err.value.field == "right" and "at most 9 in one pass" in str(err.value)
