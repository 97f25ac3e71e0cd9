"""OpenAI completions request validation (pure): defaults, mapping, refusals."""

from __future__ import annotations

import pytest

from rnnserve.server.errors import BadRequest
from rnnserve.server.http.calls import loads
from rnnserve.server.http.completions import (
    DEFAULT_MAX_TOKENS,
    message_logprobs,
    parse_completion,
    past_text,
    token_logprobs,
)


def test_defaults_follow_openai() -> None:
    req = parse_completion({"model": "lstm", "prompt": "hi"})
    assert req.prompts == ["hi"] and req.max_tokens == DEFAULT_MAX_TOKENS == 16
    assert req.sampling.temperature == 1.0 and req.sampling.top_p == 0.0  # 1 = engine's off
    assert not req.stream and not req.echo and not req.logprobs


def test_fields_map_onto_generate() -> None:
    req = parse_completion(
        {"model": "m", "prompt": ["a", "b"], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
         "seed": 3, "stop": "\n", "logprobs": 0, "echo": True, "stream": True, "top_k": 4,
         "n": 1, "best_of": None, "presence_penalty": 0, "user": "me",
         "stream_options": {"include_usage": True}}
    )  # fmt: skip
    assert req.prompts == ["a", "b"] and req.stop == ["\n"] and req.logprobs == 0 and req.echo
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.0, 0.5, 4, 3)
    assert req.params("a").prompt == "a" and req.params("a").max_tokens == 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": [[1, 2]]}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": "a", "n": 3}, "n"),
        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "a", "suffix": "z"}, "suffix"),
        ({"model": "m", "prompt": "a", "frequency_penalty": 0.1}, "frequency_penalty"),
        ({"model": "m", "prompt": "a", "logit_bias": {"1": 2}}, "logit_bias"),
        ({"model": "m", "prompt": "a", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "a", "logprobs": -1}, "logprobs"),
        # a streamed message's value sums its tokens: it has no alternatives to list
        ({"model": "m", "prompt": "a", "logprobs": 1, "stream": True}, "logprobs"),
        # 0 scores the prompt alone: only with echo, and not streamed
        ({"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens"),
        (
            {"model": "m", "prompt": "a", "max_tokens": 0, "echo": True, "stream": True},
            "max_tokens",
        ),
        ({"model": "m", "prompt": "a", "max_tokens": -1, "echo": True}, "max_tokens"),
        ({"model": "m", "prompt": "a", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "a", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "a", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "a", "stop": 3}, "stop"),
        ({"model": "m", "prompt": "a", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "a", "stream_options": {"x": 1}}, "stream_options"),
        ({"model": "m", "prompt": "a", "functions": []}, "functions"),
        # True == 1 and False == 0 in Python: a JSON boolean is not the neutral number
        ({"model": "m", "prompt": "a", "n": True}, "n"),
        ({"model": "m", "prompt": "a", "best_of": True}, "best_of"),
        ({"model": "m", "prompt": "a", "presence_penalty": False}, "presence_penalty"),
        ({"model": "m", "prompt": "a", "frequency_penalty": False}, "frequency_penalty"),
        ({"model": "m", "prompt": "a", "temperature": False}, "temperature"),
        ({"model": "m", "prompt": "a", "top_p": True}, "top_p"),
        ({"model": "m", "prompt": "a", "seed": False}, "seed"),
        ({"model": "m", "prompt": "a", "top_k": False}, "top_k"),
        ({"model": "m", "prompt": "a", "logprobs": False}, "logprobs"),
        # stream_options without stream is refused (OpenAI, vLLM), not silently dropped
        (
            {"model": "m", "prompt": "a", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "prompt": "a", "stream": False, "stream_options": {}}, "stream_options"),
        ({"model": "m", "prompt": "a", "user": 5}, "user"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", ""]}, "prompt[1]"),
    ],
)
def test_refusals_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_completion(body)
    assert err.value.field == field


def test_bool_for_a_number_names_the_type() -> None:
    with pytest.raises(BadRequest, match="must be an integer, got True"):
        parse_completion({"model": "m", "prompt": "a", "n": True})


def test_stream_options_null_without_stream_is_fine() -> None:
    req = parse_completion({"model": "m", "prompt": "a", "stream_options": None})
    assert not req.stream and not req.include_usage


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m", "prompt": "ab\ud800cd"}, "prompt"),
        ({"model": "m", "prompt": ["ab", "\udcff"]}, "prompt[1]"),
        ({"model": "m", "prompt": "ab", "stop": "\ud83d"}, "stop"),
    ],
)
def test_a_lone_surrogate_is_not_text(body: dict, field: str) -> None:
    """JSON can spell one (`"\\ud800"`); KServe REST refused it while completions ran it."""
    with pytest.raises(BadRequest) as info:
        parse_completion(body)
    assert info.value.field == field and "surrogate" in info.value.why


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [10**400, -(10**400), float("nan"), float("inf")])
def test_a_number_past_float_range_is_refused_not_a_500(name: str, value: float) -> None:
    """A JSON integer too large for a float made math.isfinite raise OverflowError."""
    with pytest.raises(BadRequest) as info:
        parse_completion({"model": "m", "prompt": "a", name: value})
    assert info.value.field == name and "must be in" in info.value.why


def test_not_an_object() -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        parse_completion(["model"])


def test_logprobs_offsets_follow_the_text() -> None:
    lp = token_logprobs("ab c", ["a", "b", " ", "c"], [None, -1.0, -2.0, -0.5])
    assert lp["text_offset"] == [0, 1, 2, 3] and lp["top_logprobs"] is None


def test_prompt_scoring_as_evaluation_harnesses_ask_it() -> None:
    """lm-evaluation-harness and the legacy API score a prompt with echo, max_tokens 0 (or 1)
    and logprobs N: each token's log-probability and its N likeliest alternatives."""
    req = parse_completion(
        {"model": "m", "prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 5}
    )
    assert (req.max_tokens, req.echo, req.logprobs) == (0, True, 5)
    lp = token_logprobs("ab", ["a", "b"], [None, -0.1], top=[None, {"b": -0.1, "a": -2.5}])
    assert lp["top_logprobs"] == [None, {"b": -0.1, "a": -2.5}]


def test_unset_max_tokens_is_capped_by_a_low_server_limit() -> None:
    """A server run with --max-tokens 10 still answers a body that leaves max_tokens out."""
    body = {"model": "m", "prompt": "a"}
    assert parse_completion(body, max_tokens_limit=10).max_tokens == 10
    assert parse_completion(body, max_tokens_limit=4096).max_tokens == DEFAULT_MAX_TOKENS
    assert parse_completion({**body, "max_tokens": 12}, max_tokens_limit=10).max_tokens == 12


def test_a_body_nested_too_deep_is_a_bad_request_not_a_500() -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels."""
    with pytest.raises(BadRequest, match="request: the body nests arrays or objects too deep"):
        loads(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BadRequest, match="request: the body is not valid JSON"):
        loads(b"{")
    assert loads(b'{"a": [[1]]}') == {"a": [[1]]}


def test_logprobs_offsets_find_normalised_tokens_in_the_text_as_sent() -> None:
    """Tokens are lowercased and punctuation blanked (letters_only); the echoed prompt is as
    sent. Offsets were searched for case-sensitively: "t" of "The" was found in "it" (11)."""
    from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig

    tokenizer = Tokenizer(TokenizerConfig(lowercase=True, letters_only=True))
    text = "The TIME, it is!"
    tokens = tokenizer.tokenize(text)
    lp = token_logprobs(text, tokens, [None] * len(tokens), tokenizer.normalize)
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15]


def test_each_top_logprobs_entry_holds_its_token_under_the_name_tokens_gives_it() -> None:
    """A token outside the vocabulary is scored as <unk> but listed in `tokens` as its own
    text; its top_logprobs entry was keyed "<unk>", so top_logprobs[i][tokens[i]] (always
    there in vLLM's answers) found nothing."""
    import asyncio

    import numpy as np

    from rnnserve.artifact.manifest import Manifest, StateSpec
    from rnnserve.artifact.tokenizer import TokenizerConfig
    from rnnserve.artifact.vocab import RESERVED
    from rnnserve.server.scoring import encode_texts, score
    from rnnserve.server.text import TextCodec

    class Uniform:  # no state pairs; every logit 0, so "<unk>" (id 0) ranks first
        specs = ()

        def run(self, x, state):
            return np.zeros((*x.shape, len(codec)), np.float32), state

        def initial_state(self, batch):
            return []

    class Inline:  # runs each call at once, in the caller's thread
        async def call(self, fn, *args):
            return fn(*args)

    manifest = Manifest(
        name="m", version="1", task="lm", architecture="gru", hyperparameters={},
        input_name="tokens", output_name="logits",
        state=[StateSpec("h", "h_in", "h_out", [1, -1, 4], 1)],
        tokenizer=TokenizerConfig(level="char"), vocab=[*RESERVED, *"ab "],
    )  # fmt: skip
    codec = TextCodec(manifest)
    encoded = encode_texts(codec, ["a日b"], max_texts=1, max_tokens=16)
    (scored,) = asyncio.run(score(Uniform(), Inline(), codec, encoded, top=1))
    assert scored.tokens == ["日", "b"] and scored.unknown_tokens == 1
    entries = zip(scored.tokens, scored.token_logprobs, scored.top_logprobs, strict=True)
    assert all(top[token] == value for token, value, top in entries)


def test_a_stop_strings_tokens_spell_past_the_text() -> None:
    """The text is cut before the stop string; the tokens that made it (and whatever the last
    one held after it) are what past_text gives back, to be scored too."""
    assert past_text("ab", ["a", "b", "c", "de"]) == "cde"  # stop "cd": "e" rode along
    assert past_text("ab", ["a", "b"]) == ""  # length, eos: nothing cut
    assert past_text("", [" x"]) == " x"  # the first token completed the stop string
    assert past_text("ax", ["a", "b"]) == ""  # not its tokens: nothing to add


def test_a_streamed_message_reports_the_text_its_tokens_spell() -> None:
    """A stop string's last message has tokens but no text: its entry is the tokens' text
    (was ""); held-back text let go in a message without tokens has no entry."""
    lp = message_logprobs(["c", "d"], -1.5, 7)
    assert lp == {"tokens": ["cd"], "token_logprobs": [-1.5], "top_logprobs": None,
                  "text_offset": [7]}  # fmt: skip
    assert message_logprobs([], 0.0, 7)["tokens"] == []


VLLM_DEFAULTS = {
    "repetition_penalty": 1.0, "length_penalty": 1, "use_beam_search": False, "min_tokens": 0,
    "min_p": 0.0, "ignore_eos": False, "stop_token_ids": [],
    "include_stop_str_in_output": False, "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
}  # fmt: skip


def test_vllms_sampling_extensions_at_their_defaults_are_accepted() -> None:
    """Clients written for vLLM send these at their defaults; each was an "unknown field"."""
    req = parse_completion({"model": "m", "prompt": "a", **VLLM_DEFAULTS})
    assert req.prompts == ["a"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("repetition_penalty", 1.2), ("min_tokens", 5), ("min_p", 0.1), ("ignore_eos", True),
     ("stop_token_ids", [3]), ("skip_special_tokens", False), ("use_beam_search", True),
     ("ignore_eos", 0), ("skip_special_tokens", 1), ("min_tokens", False)],
)  # fmt: skip
def test_vllms_sampling_extensions_otherwise_are_refused_by_name(name: str, value) -> None:
    """A value other than the default, or a number for a flag (0 == False would pass as it)."""
    with pytest.raises(BadRequest) as err:
        parse_completion({"model": "m", "prompt": "a", name: value})
    assert err.value.field == name
