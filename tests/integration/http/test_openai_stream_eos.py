"""A streamed completion the model ended lists its `<eos>` in the last chunk's logprobs, as a
plain response does (and vLLM's last chunk), with the log-probability the decode step gave it;
gRPC Generate's messages stay as they were (no field for it: `logprob` covers `token_ids`).

The model is eos_model.py's lookup table with one softer row: after "e" the end-of-sequence
token has logit 1 against "a"'s 0, so greedy still ends "a" -> "bcde" <eos>, and that <eos>
has a log-probability a test can tell from 0 (-log(1 + e^-1) = -0.3133)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from rnnserve.server.decode.stream import Stream
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.stopping import StopChecker
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import http_server
from tests.integration.http.eos_model import VOCAB, build_repo, lookup_table
from tests.integration.server.harness import ServerThread

NAME = "soft-eos"
EOS_LOGPROB = -math.log1p(math.exp(-1.0))  # <eos> after "e": logit 1 against "a"'s 0


def _table() -> np.ndarray:
    """eos_model's lookup with the softer row after "e"."""
    table = lookup_table()
    e = VOCAB.index("e")
    table[e, :] = -20.0
    table[e, VOCAB.index("<eos>")], table[e, VOCAB.index("a")] = 1.0, 0.0
    return table


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("soft-eos") / "models", NAME, _table())


@pytest.fixture(scope="module")
def eos_server(repo: Path) -> Iterator[ServerThread]:
    srv = http_server(repo)
    yield srv
    srv.stop()


def _client(srv: ServerThread) -> openai.OpenAI:
    base = f"http://127.0.0.1:{srv.app.http.port}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(eos_server: ServerThread) -> openai.OpenAI:
    return _client(eos_server)


def _streamed(client: openai.OpenAI, prompt: str | list[str], **extra: object) -> list:
    return list(
        client.completions.create(
            model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=0, stream=True,
            **extra,
        )
    )  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "echo", "spelled", "at"),
    [
        ("a", False, "bcde", 4),
        ("a", True, "abcde", 5),  # offsets count the echoed prompt, as in a plain response
        ("e", False, "", 0),  # <eos> first: one chunk, no text, the <eos> alone
    ],
)
def test_the_last_chunk_lists_the_eos_with_its_logprob(
    client: openai.OpenAI, prompt: str, echo: bool, spelled: str, at: int
) -> None:
    """The stream's logprobs ended at the text's last token: the <eos> the model generated
    (counted in completion_tokens) was missing, while a plain response lists it."""
    chunks = _streamed(client, prompt, echo=echo)
    *_, last = chunks
    lp = last.choices[0].logprobs
    assert last.choices[0].finish_reason == "stop"
    assert lp.tokens[-1] == "<eos>" and lp.text_offset[-1] == at
    assert lp.token_logprobs[-1] == pytest.approx(EOS_LOGPROB, abs=1e-4)
    listed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert "".join(listed[:-1]) == spelled and listed.count("<eos>") == 1
    plain = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=0, echo=echo
    ).choices[0]
    assert plain.logprobs.tokens[-1] == "<eos>"  # the same value by either road
    assert plain.logprobs.token_logprobs[-1] == pytest.approx(lp.token_logprobs[-1], abs=1e-4)
    assert plain.logprobs.text_offset[-1] == at


def test_each_prompt_of_a_streamed_list_lists_its_own_eos(client: openai.OpenAI) -> None:
    chunks = _streamed(client, ["a", "c", "e"])
    for i in range(3):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert [t for c in mine for t in c.logprobs.tokens].count("<eos>") == 1
        assert mine[-1].logprobs.tokens[-1] == "<eos>" and mine[-1].finish_reason == "stop"


def test_no_eos_when_the_stream_did_not_end_on_it(client: openai.OpenAI) -> None:
    """Cut by max_tokens, or by a stop string: no <eos> was generated, none is listed."""
    cut = list(
        client.completions.create(
            model=NAME, prompt="a", max_tokens=4, temperature=0, logprobs=0, stream=True
        )
    )
    assert cut[-1].choices[0].finish_reason == "length"
    assert all("<eos>" not in c.choices[0].logprobs.tokens for c in cut)
    stopped = _streamed(client, "a", stop=["d"])
    assert stopped[-1].choices[0].finish_reason == "stop"
    assert all("<eos>" not in c.choices[0].logprobs.tokens for c in stopped)


def test_grpc_generate_is_unchanged(eos_server: ServerThread) -> None:
    """GenerateResponse has no field for the <eos>: its messages' `logprob` still sum the
    tokens of `token_ids` alone (about 0 here), not the <eos>'s -0.31."""
    replies = list(
        eos_server.stub.Generate(
            pb.GenerateRequest(model=NAME, prompt="a", max_tokens=10, sampling={}), timeout=30
        )
    )
    assert replies[-1].finish_reason == pb.FINISH_REASON_EOS
    assert [i for r in replies for i in r.token_ids] == [VOCAB.index(t) for t in "bcde"]
    assert sum(r.logprob for r in replies) == pytest.approx(0.0, abs=1e-4)


def test_under_decode_process_too(repo: Path) -> None:
    """--decode-process 1 hands a child's tokens and logprobs to the same Stream."""
    srv = http_server(repo, decode_process=1)
    try:
        *_, last = _streamed(_client(srv), "a")
        lp = last.choices[0].logprobs
        assert lp.tokens[-1] == "<eos>"
        assert lp.token_logprobs[-1] == pytest.approx(EOS_LOGPROB, abs=1e-4)
    finally:
        srv.stop()


@pytest.mark.parametrize("every", [0, 2])
def test_the_stream_carries_the_eos_logprob_to_its_last_message(every: int) -> None:
    """Stream level: the <eos> stays out of the last message's token_ids and logprob (what
    gRPC sends) and comes as its `eos_logprob`, also when a checkpoint's sealed message is
    merged into the last one."""
    eos = VOCAB.index("<eos>")
    stream = Stream(
        model="m", sampler=Sampler(SamplingParams()), stopper=StopChecker(10, [], eos),
        decode=lambda t: VOCAB[t], signer=(lambda *a: b"s") if every else None, started=0.0,
        deadline=None, state_every=every, end_state=bool(every),
    )  # fmt: skip
    for count in range(1, 4):
        stream.snapshots.append((count, [np.zeros(1)]))
    ids = [VOCAB.index("b"), VOCAB.index("c"), eos]
    assert stream.accept_run(ids, [-0.5, -0.25, -0.125], [0.0, 0.0, 0.0]) == 3
    stream.close()

    async def drain() -> list:
        out = []
        while (chunk := await stream.buffer.next()) is not None:
            out.append(chunk)
        return out

    *_, last = chunks = asyncio.run(drain())
    assert last.finish_reason == "eos" and last.eos_logprob == -0.125
    assert [i for c in chunks for i in c.token_ids] == ids[:2]
    assert sum(c.logprob for c in chunks) == -0.75
    assert all(c.eos_logprob is None for c in chunks[:-1])
