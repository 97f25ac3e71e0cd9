"""The official `openai` package against /v1 on a real server: plain and streaming
completions, models, and its error classes. Greedy text must equal rnnserve.v1 Generate's:
both ports run the same engine."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openai
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import http_server
from tests.integration.server.harness import ServerThread

PROMPT = "the time traveller"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def _native(server, prompt: str, max_tokens: int) -> str:
    request = pb.GenerateRequest(model="lstm", prompt=prompt, max_tokens=max_tokens)
    return "".join(r.text for r in server.stub.Generate(request, timeout=30))


def test_models_lists_the_lm_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"lstm", "gru", "rnn"} <= ids
    assert "bilstm" not in ids and "sine-gru" not in ids  # they cannot Generate
    assert client.models.retrieve("lstm").id == "lstm"
    # a Unix time, as OpenAI's: when the files were written (it was always 0)
    assert {m.created for m in client.models.list().data} != {0}
    assert abs(client.models.retrieve("lstm").created - time.time()) < 86400


@pytest.mark.parametrize(("model", "why"), [("sine-gru", "Forecast"), ("bilstm", "Infill")])
def test_retrieve_agrees_with_the_list(client: openai.OpenAI, model: str, why: str) -> None:
    """A model the list leaves out is not found (OpenAI's and vLLM's answer), with the reason,
    not a 400 FAILED_PRECONDITION."""
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve(model)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert why in err.value.body["message"]


def test_greedy_completion_matches_native_generate(client, server) -> None:
    done = client.completions.create(model="lstm", prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.model == "lstm"
    assert done.choices[0].text == _native(server, PROMPT, 12)
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(PROMPT)  # char-level tokenizer
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == len(PROMPT) + 12


def test_stream_gives_the_same_text_and_usage_last_when_asked(client) -> None:
    plain = client.completions.create(model="lstm", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="lstm", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert not chunks[-1].choices and all(c.usage is None for c in chunks[:-1])
    unasked = list(
        client.completions.create(
            model="lstm", prompt=PROMPT, max_tokens=20, temperature=0, stream=True
        )
    )
    assert all(c.choices and c.usage is None for c in unasked)  # chunk.choices[0] is safe


def test_seeded_sampling_is_reproducible(client) -> None:
    def run(seed: int) -> str:
        return (
            client.completions.create(
                model="lstm", prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.9, seed=seed
            )
            .choices[0]
            .text
        )

    assert run(7) == run(7)
    assert run(8) != run(7)  # the seed, temperature and top_p reach the sampler


def test_prompt_list_gives_one_choice_each(client) -> None:
    done = client.completions.create(
        model="lstm", prompt=["the", "a time"], max_tokens=5, temperature=0
    )
    assert [c.index for c in done.choices] == [0, 1]
    assert done.usage.prompt_tokens == 3 + 6 and done.usage.completion_tokens == 10
    streamed = list(
        client.completions.create(
            model="lstm", prompt=["the", "a time"], max_tokens=5, temperature=0, stream=True
        )
    )
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
        assert text == done.choices[i].text


def test_stop_echo_and_logprobs(client, server) -> None:
    full = client.completions.create(model="lstm", prompt=PROMPT, max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="lstm", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    echoed = client.completions.create(
        model="lstm", prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=0
    )
    choice = echoed.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None  # the first token conditions the rest
    # the text as Score tokenizes it (normalised: runs of spaces are one token)
    native = server.stub.Score(pb.ScoreRequest(model="lstm", texts=[choice.text]), timeout=30)
    assert lp.tokens[1:] == list(native.results[0].tokens)
    assert lp.tokens[0] == PROMPT[0]
    expected = list(native.results[0].token_logprobs)
    assert lp.token_logprobs[1:] == pytest.approx(expected, rel=1e-5)
    assert all(v <= 0 and math.isfinite(v) for v in lp.token_logprobs[1:])

    only = client.completions.create(
        model="lstm", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    ).choices[0]
    prompt_tokens = len(PROMPT) - 1  # Score reports tokens 2..n
    assert only.logprobs.token_logprobs == pytest.approx(expected[prompt_tokens:], rel=1e-5)
    assert only.logprobs.text_offset[0] == 0


def _reference_logprobs(package: Path, text: str) -> tuple[list[int], np.ndarray]:
    """Plain onnxruntime, independent of the server: the text's ids and the log-softmax
    [len - 1, vocab] of the next-token logits at each position but the last."""
    manifest = Manifest.load(package)
    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = manifest.build_vocab().encode(Tokenizer(manifest.tokenizer).tokenize(text))
    feeds = {manifest.input_name: np.asarray([ids[:-1]], dtype=np.int64)}
    for s in manifest.state:
        shape = [1 if d == -1 else d for d in s.shape]
        feeds[s.input] = np.broadcast_to(np.asarray(s.init, dtype=s.dtype), shape).copy()
    names = [o.name for o in sess.get_outputs()]
    logits = dict(zip(names, sess.run(None, feeds), strict=True))[manifest.output_name][0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    return ids, shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_prompt_scoring_with_top_logprobs_as_lm_eval_asks(client, model_repo: Path) -> None:
    """lm-evaluation-harness's loglikelihood: echo, max_tokens 0, logprobs N. Each token
    after the first gets its log-probability and the N likeliest tokens at its position (and
    itself), as plain onnxruntime computes them; nothing is generated."""
    got = client.completions.create(
        model="lstm", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    choice = got.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert got.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    package = next(p for p in sorted((model_repo / "lstm").iterdir()) if p.is_dir())
    ids, reference = _reference_logprobs(package, PROMPT)
    vocab = Manifest.load(package).build_vocab()
    assert len(lp.tokens) == len(ids)
    for t in range(1, len(ids)):
        top = lp.top_logprobs[t]
        likeliest = np.argsort(-reference[t - 1], kind="stable")[:3]
        expected = {vocab.idx_to_token[i]: float(reference[t - 1, i]) for i in likeliest}
        expected[lp.tokens[t]] = lp.token_logprobs[t]
        assert top.keys() == expected.keys()
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)
        assert lp.token_logprobs[t] == pytest.approx(reference[t - 1, ids[t]], abs=1e-4)
    # lm-eval's greedy check: the continuation is what greedy decoding would have made
    pairs = zip(lp.top_logprobs[1:], lp.tokens[1:], strict=True)
    greedy = [max(top, key=top.get) == tok for top, tok in pairs]
    assert greedy == [int(np.argmax(reference[t - 1])) == ids[t] for t in range(1, len(ids))]


def test_logprobs_when_prompt_and_completion_merge_into_one_token(client) -> None:
    """The tokenizer normalises: a one-token prompt " " and a completion of spaces read back as
    one token, which Score cannot score. That is no token to report, not a 400 after the
    completion was made."""
    got = client.completions.create(
        model="lstm", prompt=" ", max_tokens=4, temperature=0, echo=True, logprobs=0
    ).choices[0]
    assert got.text.startswith(" ")
    assert got.logprobs.tokens[0] == " " and got.logprobs.token_logprobs[0] is None
    assert len(got.logprobs.text_offset) == len(got.logprobs.tokens)


def test_logprobs_past_the_prompt_limit_name_logprobs(client) -> None:
    """prompt + completion must fit --max-prompt-tokens (4096) to be scored: the error names
    the OpenAI field, not Score's `texts`."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="lstm", prompt="a" * 4096, max_tokens=4, temperature=0, logprobs=0
        )
    assert err.value.body["param"] == "logprobs"
    assert "--max-prompt-tokens" in err.value.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"temperature": 3.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"logit_bias": {"7": 5}}, "logit_bias"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
        ({"n": True}, "n"),  # True == 1 in Python; a boolean is not a count
        ({"presence_penalty": False}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"user": 5}, "user"),
        ({"prompt": ["the", ""]}, "prompt"),
    ],
)
def test_fields_that_make_no_sense_are_refused(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "lstm", "prompt": PROMPT, **kwargs})
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_and_wrong_task(client) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt=PROMPT)
    assert err.value.body["code"] == "model_not_found"
    # a model GET /v1/models leaves out is not found here either (OpenAI: 404), with why
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="bilstm", prompt=PROMPT)
    assert "Infill" in err.value.body["message"] and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="sine-gru", prompt=PROMPT, stream=True)
    assert "Forecast" in err.value.body["message"]


def test_stream_refused_by_the_engine_gets_its_status(client) -> None:
    """Errors the engine raises before the first token come back as the HTTP status, not as
    an event inside a 200 stream."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lstm", prompt="x" * 5000, stream=True)
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lstm", prompt="the", max_tokens=10**6, stream=True)
    assert err.value.body["param"] == "max_tokens"


def test_chat_and_embeddings_say_what_to_use_instead(client) -> None:
    """Not served (these models have no chat template): chat is a 400 (as vLLM answers for a
    base model without one) and embeddings a 404, each naming /v1/completions."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="lstm", input="hi")
    assert "not served" in err.value.body["message"]


def test_one_request_is_served_by_one_version(client, server, monkeypatch) -> None:
    """The default version is resolved once per request: every prompt's stream asks for it by
    number and the logprobs are scored on its session, so a reload mid-request cannot split
    it."""
    from rnnserve.server import engine as engine_module

    engine = server.app.engine
    asked: list[tuple[str, object]] = []
    generate, score = engine.generate, engine_module.score

    def recording_generate(model, version, params, deadline):
        asked.append(("generate", version))
        return generate(model, version, params, deadline)

    async def recording_score(model, *args):  # scoring.score: the session scored on
        asked.append(("score", model))
        return await score(model, *args)

    monkeypatch.setattr(engine, "generate", recording_generate)
    monkeypatch.setattr(engine_module, "score", recording_score)
    client.completions.create(model="lstm", prompt=["the", "time"], max_tokens=4, logprobs=0)
    default = server.stub.GetModel(pb.GetModelRequest(model="lstm")).default_version
    session = engine.repository.get("lstm", default).model
    assert [v for kind, v in asked if kind == "generate"] == [default, default]
    assert [m for kind, m in asked if kind == "score"] == [session, session]


def _stopped_sample(client: openai.OpenAI) -> tuple[dict, str, str]:
    """A seeded request and a two-letter stop string its text meets after a few characters,
    with no run of spaces before it (a run reads back as one token when scored). Greedy
    text of the tiny model is all spaces."""
    for seed in range(20):
        asked = {"model": "lstm", "prompt": PROMPT, "max_tokens": 30, "seed": seed}
        text = client.completions.create(**asked).choices[0].text
        for k in range(3, len(text) - 1):
            stop = text[k : k + 2]
            if stop.isalpha() and "  " not in text[:k]:
                return asked | {"stop": [stop], "logprobs": 0}, text[: text.index(stop)], stop
    raise AssertionError("no seed gave a text with a stop string to cut")


def test_a_stop_strings_tokens_are_in_the_logprobs_streamed_or_not(client) -> None:
    """As vLLM: the text stops before the stop string, the logprobs go on to the token that
    completed it (its text is cut, its tokens are not). A stream's last message carried that
    token as `""`, while the plain answer left the stop string's tokens out."""
    asked, cut, stop = _stopped_sample(client)
    plain = client.completions.create(**asked).choices[0]
    events = [c.choices[0] for c in client.completions.create(**asked, stream=True)]
    assert plain.text == "".join(e.text for e in events) == cut
    assert plain.finish_reason == events[-1].finish_reason == "stop"
    assert events[-1].logprobs.tokens[-1].endswith(stop[-1])

    tokens = [t for e in events for t in e.logprobs.tokens]
    values = [v for e in events for v in e.logprobs.token_logprobs]
    offsets = [o for e in events for o in e.logprobs.text_offset]
    assert "".join(plain.logprobs.tokens) == "".join(tokens) == cut + stop  # char-level
    assert plain.logprobs.text_offset == list(range(len(cut + stop)))
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    # a message's value sums its tokens': the same log-likelihood either way
    assert sum(plain.logprobs.token_logprobs) == pytest.approx(sum(values), rel=1e-4)


def _reload_server(model_repo: Path, tmp_path: Path) -> tuple[ServerThread, Path]:
    """A server over lstm versions 1 and 2 (the same weights); 2 is the default."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(model_repo / "lstm" / "1", repo / "lstm" / version)
    return http_server(repo), repo


def test_logprobs_are_scored_after_a_reload_removed_the_version(model_repo, tmp_path) -> None:
    """A reload that removes the version between its stream and the scoring: the version the
    text came from is still scored (it was looked up again by number: 404 model_not_found).
    Its decode loop is retired as usual, and the engine keeps nothing of it."""
    srv, repo = _reload_server(model_repo, tmp_path)
    engine, admin = srv.app.engine, srv.app.admin
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{srv.app.http.port}/v1", api_key="unused", max_retries=0
    )
    asked = {"model": "lstm", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    generate, reports = engine.generate, []

    def generate_then_reload(model, version, params, deadline):
        served, chunks = generate(model, version, params, deadline)

        async def then_reload():
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
            shutil.rmtree(repo / "lstm" / "2")
            report, retiring = await admin.rescan()
            await retiring  # its decode loop drained and closed before the scoring
            reports.append(report)

        return served, then_reload()

    try:
        engine.generate = generate_then_reload
        got = client.completions.create(**asked).choices[0]
        engine.generate = generate
        assert [r.unloaded for r in reports] == [["lstm/2"]]
        again = client.completions.create(**asked).choices[0]  # version 1 now: same weights
        assert got.text == again.text
        assert got.logprobs.tokens == again.logprobs.tokens
        assert got.logprobs.token_logprobs == pytest.approx(again.logprobs.token_logprobs)
        assert srv.call(lambda: ("lstm", "2") not in {**engine._decoders, **engine._codecs})
    finally:
        srv.stop()


def test_a_stream_asked_of_a_version_a_reload_removed_is_retryable(model_repo, tmp_path) -> None:
    """A reload that lands between resolving the default version and starting its stream:
    503 (retry, the next try gets the new default), not a 404 saying the model is unknown.
    The stream is not started on the removed version: its decode loop is being retired."""
    srv, _repo = _reload_server(model_repo, tmp_path)
    engine = srv.app.engine
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{srv.app.http.port}/v1", api_key="unused", max_retries=0
    )
    generate = engine.generate

    def reload_then_generate(model, version, params, deadline):
        engine.repository.remove(model, version)  # what a rescan does first, on the loop
        engine.pop_decoder(model, version)
        return generate(model, version, params, deadline)

    try:
        engine.generate = reload_then_generate
        for stream, version in ((False, "2"), (True, "1")):  # each removes the default
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model="lstm", prompt=PROMPT, stream=stream)
            assert err.value.status_code == 503
            assert f"lstm/{version} was unloaded by a reload" in err.value.body["message"]
        assert not srv.call(lambda: dict(engine._decoders))
    finally:
        engine.generate = generate
        srv.stop()
