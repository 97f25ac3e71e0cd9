"""/v1/completions usage, logprobs and stream framing with a model that ends on <eos> (the
tiny zoo's never do): `completion_tokens` counts every token the model generated, the
end-of-sequence token included (vLLM's count), the same in plain and streamed responses; a
plain response's `logprobs` list that <eos> too (as vLLM); and with
`stream_options.include_usage` every chunk but the last says `"usage": null` (OpenAI's)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from tests.integration.http.conftest import http_server
from tests.integration.http.eos_model import NAME, build_repo
from tests.integration.server.harness import ServerThread


@pytest.fixture(scope="module")
def eos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = http_server(build_repo(tmp_path_factory.mktemp("eos") / "models"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(eos_server: ServerThread) -> openai.OpenAI:
    base = f"http://127.0.0.1:{eos_server.app.http.port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


def _stream(client: openai.OpenAI, prompt: str | list[str], max_tokens: int) -> list:
    return list(
        client.completions.create(
            model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "text", "finish", "tokens"),
    [
        ("a", 10, "bcde", "stop", 5),  # b c d e <eos>: the <eos> is generated, not shown
        ("e", 10, "", "stop", 1),  # <eos> first: nothing shown, one token generated
        ("a", 5, "bcde", "stop", 5),  # <eos> is the 5th token: it ends the stream
        ("a", 4, "bcde", "length", 4),  # cut before <eos>
    ],
)
def test_completion_tokens_count_the_eos_token(
    client: openai.OpenAI, prompt: str, max_tokens: int, text: str, finish: str, tokens: int
) -> None:
    """The <eos> that ended a completion was left out of usage.completion_tokens (4, then 0
    for a completion that is <eos> alone), plain and streamed alike."""
    done = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    (choice,) = done.choices
    assert (choice.text, choice.finish_reason) == (text, finish)
    assert done.usage.completion_tokens == tokens
    assert done.usage.prompt_tokens == 1 and done.usage.total_tokens == 1 + tokens
    chunks = _stream(client, prompt, max_tokens)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage == done.usage  # the same count streamed


def test_prompt_lists_and_sampling_count_it_once_per_choice(client: openai.OpenAI) -> None:
    """a: bcde<eos> (5), c: de<eos> (3), e: <eos> (1); sampling reaches <eos> as surely."""
    done = client.completions.create(model=NAME, prompt=["a", "c", "e"], max_tokens=10, seed=1)
    assert [c.finish_reason for c in done.choices] == ["stop"] * 3
    assert done.usage.completion_tokens == 9 and done.usage.prompt_tokens == 3
    assert _stream(client, ["a", "c", "e"], 10)[-1].usage == done.usage


def test_include_usage_chunks_say_usage_null_until_the_last(eos_server: ServerThread) -> None:
    """OpenAI's stream_options.include_usage: "All other chunks will also include a usage
    field, but with a null value", and one last chunk before [DONE] has empty choices and the
    usage. The ordinary chunks had no `usage` key at all (the SDK reads both as None, so the
    wire is read here); without include_usage they still have none."""
    url = f"http://127.0.0.1:{eos_server.app.http.port}/v1/completions"

    def events(**extra: object) -> list:
        body = {"model": NAME, "prompt": ["a", "c"], "max_tokens": 10, "echo": True,
                "stream": True, **extra}  # fmt: skip
        request = urllib.request.Request(
            url, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            frames = reply.read().decode().split("\n\n")
        assert frames[-2:] == ["data: [DONE]", ""]
        return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]

    asked = events(stream_options={"include_usage": True})
    *chunks, last = asked
    assert len(chunks) >= 4  # two echoes, and each prompt's completion
    assert all("usage" in c and c["usage"] is None and c["choices"] for c in chunks)
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    assert all("usage" not in c for c in events())


@pytest.mark.parametrize(
    ("prompt", "echo", "tokens", "offsets"),
    [
        ("a", False, ["b", "c", "d", "e", "<eos>"], [0, 1, 2, 3, 4]),
        ("a", True, ["a", "b", "c", "d", "e", "<eos>"], [0, 1, 2, 3, 4, 5]),
        ("e", False, ["<eos>"], [0]),  # <eos> first: the one token generated
        ("c", True, ["c", "d", "e", "<eos>"], [0, 1, 2, 3]),
    ],
)
def test_logprobs_list_the_eos_that_ended_the_completion(
    client: openai.OpenAI, prompt: str, echo: bool, tokens: list[str], offsets: list[int]
) -> None:
    """The <eos> counted in completion_tokens was missing from `logprobs` (re-scoring the
    text cannot read it back: it has no text). vLLM lists it last, under its vocabulary name
    and at the text's end; here it is scored in the same pass, after the text's tokens: its
    value is the model's log-probability of <eos> there (certain after "e"; after any other
    token it would be -40), and `top_logprobs` ranks it among the alternatives."""
    done = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=2, echo=echo
    )
    (choice,) = done.choices
    lp = choice.logprobs
    assert choice.finish_reason == "stop" and lp.tokens == tokens and lp.text_offset == offsets
    assert "<eos>" not in choice.text and offsets[-1] == len(choice.text)
    generated = lp.tokens[len(prompt) :] if echo else lp.tokens  # one character a token
    assert len(generated) == done.usage.completion_tokens  # vLLM's: one entry a token
    assert lp.token_logprobs[-1] == pytest.approx(0.0, abs=1e-6)
    assert lp.top_logprobs[-1]["<eos>"] == lp.token_logprobs[-1]
    assert sorted(lp.top_logprobs[-1].values())[0] == pytest.approx(-40.0, abs=1e-3)
    assert (lp.token_logprobs[0] is None) == echo


def test_no_eos_in_the_logprobs_of_a_completion_that_did_not_end_on_it(
    client: openai.OpenAI,
) -> None:
    """Cut by max_tokens (length) or by a stop string (stop, but no <eos> generated): the
    logprobs hold the generated tokens alone, the stop string's included (as vLLM)."""
    cut = client.completions.create(model=NAME, prompt="a", max_tokens=4, logprobs=0)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].logprobs.tokens == ["b", "c", "d", "e"]
    stopped = client.completions.create(
        model=NAME, prompt="a", max_tokens=10, logprobs=0, stop=["d"], temperature=0
    )
    (choice,) = stopped.choices
    assert (choice.text, choice.finish_reason) == ("bc", "stop")
    assert choice.logprobs.tokens == ["b", "c", "d"] and stopped.usage.completion_tokens == 3


def test_each_prompt_of_a_list_lists_its_own_eos(client: openai.OpenAI) -> None:
    done = client.completions.create(
        model=NAME, prompt=["a", "c", "e"], max_tokens=10, logprobs=0, seed=3
    )
    got = [c.logprobs.tokens for c in done.choices]
    assert got == [["b", "c", "d", "e", "<eos>"], ["d", "e", "<eos>"], ["<eos>"]]
    assert sum(len(t) for t in got) == done.usage.completion_tokens
