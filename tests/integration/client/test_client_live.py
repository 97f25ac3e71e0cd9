"""The Python client against the real server (ONNX Runtime, tiny zoo): every RPC end to end."""

from __future__ import annotations

import asyncio
import math

import pytest

from rnnserve.client import (
    AsyncRnnClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    RnnClient,
    Unauthenticated,
    Unavailable,
)
from tests.integration.client.conftest import TOKEN, LiveServer

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
ZOO = {"rnn", "gru", "lstm", "lstm-deep", "bilstm", "ngram", "hmm", "sine-mlp", "sine-gru"}


@pytest.fixture
def client(server: LiveServer):
    with RnnClient(server.address, timeout=60, retry=FAST_RETRY) as c:
        yield c


def test_models_are_listed_and_described(client: RnnClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) >= ZOO
    lstm = client.get_model("lstm").version()
    assert lstm is not None and lstm.task == "lm" and lstm.architecture == "lstm"
    assert {s.name for s in lstm.state} == {"h", "c"}
    assert "Generate" in lstm.rpcs
    assert client.get_model("sine-mlp").version().task == "forecast"


def test_generate_streams_and_resumes_exactly(client: RnnClient) -> None:
    whole = client.generate("lstm", "the time", max_tokens=8)
    events = list(whole)
    # the zoo's corpus has no <eos> and the call no stop strings: it runs to max_tokens
    assert events and events[-1].finish_reason == "length" == whole.finish_reason
    assert whole.text == "".join(e.text for e in events)
    first = client.generate("lstm", "the time", max_tokens=4, return_state=True)
    list(first)
    assert first.state
    rest = client.generate("lstm", state=first.state, max_tokens=4)
    list(rest)
    assert first.text + rest.text == whole.text  # greedy: resuming == never stopping


def test_score_is_consistent(client: RnnClient) -> None:
    text = "the time traveller"
    [result] = client.score("lstm", [text])
    assert result.num_tokens == len(text) - 1  # char model: the first char conditions
    assert len(result.token_logprobs) == result.num_tokens
    assert result.perplexity == pytest.approx(
        math.exp(-result.log_likelihood / result.num_tokens), rel=1e-4
    )
    assert sum(result.token_logprobs) == pytest.approx(result.log_likelihood, rel=1e-3)


def test_infill_ranks_candidates(client: RnnClient) -> None:
    cands = client.infill("bilstm", "the t", "me", top_k=3)
    assert len(cands) == 3
    probs = [c.probability for c in cands]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_forecast_with_fitted_values(client: RnnClient) -> None:
    history = [math.sin(0.1 * t) for t in range(40)]
    result = client.forecast("sine-mlp", history, 5, return_fitted=True)
    assert len(result.forecast) == 5 and all(math.isfinite(v) for v in result.forecast)
    assert result.fitted and result.fitted_offset + len(result.fitted) <= len(history)


def test_server_errors_become_typed_exceptions(client: RnnClient) -> None:
    with pytest.raises(NotFound):
        client.get_model("no-such-model")
    with pytest.raises(FailedPrecondition):
        list(client.generate("bilstm", "the"))
    with pytest.raises(FailedPrecondition):
        client.forecast("lstm", [1.0, 2.0], 3)
    with pytest.raises(InvalidArgument) as info:
        client.forecast("sine-mlp", [1.0] * 10, 10**7)
    assert "horizon" in info.value.details


def test_unavailable_is_retried_for_unary_calls_and_generate_fails_over(
    client: RnnClient, server
) -> None:
    server.script.unavailable["Score"] = 2
    assert client.score("lstm", ["ab"])[0].num_tokens == 1
    assert [rpc for rpc, _ in server.script.seen].count("Score") == 3
    server.script.unavailable["Generate"] = 1
    with pytest.raises(Unavailable):
        list(client.generate("lstm", "ab", max_tokens=2, failover=False))
    assert [rpc for rpc, _ in server.script.seen].count("Generate") == 1
    server.script.unavailable["Generate"] = 1  # failover (the default) starts it again
    assert len([t for e in client.generate("lstm", "ab", max_tokens=2) for t in e.token_ids]) == 2
    assert [rpc for rpc, _ in server.script.seen].count("Generate") == 3


def test_bearer_token_reaches_the_server(server) -> None:
    server.script.require_token = True
    with RnnClient(server.address, timeout=60) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_models()
    with RnnClient(server.address, timeout=60, token=TOKEN) as c:
        assert c.list_models()
        assert c.reload_models().failed == ()


def test_async_client_streams_concurrently(server) -> None:
    async def scenario():
        async with AsyncRnnClient(server.address, timeout=60) as c:
            streams = [c.generate(m, "the", max_tokens=5) for m in ("rnn", "gru", "lstm")]

            async def drain(stream):
                return [e async for e in stream]

            results = await asyncio.gather(*(drain(s) for s in streams))
            score = await c.score("ngram", ["the time"])
            return streams, results, score

    streams, results, score = asyncio.run(scenario())
    assert all(r and r[-1].finish_reason for r in results)
    assert all(s.text for s in streams)
    assert score[0].num_tokens >= 1
