"""Checkpoints (state_every) continue a stream exactly, and resume tokens stay trustworthy.

Real parts: a real in-process rnn-server (gRPC on localhost, ONNX Runtime, the tiny zoo) for
the stream tests; the signer and sampler directly for the token format and the random
sequence. Each checkpoint of a reference stream is resumed, and the continuation must be
exactly the reference's remaining tokens and text: greedy, seeded, server-seeded, with stop
strings whose beginnings are held back across a checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.artifact.manifest import Manifest, StateSpec
from rnnserve.server.decode.loop import DecodeLoop
from rnnserve.server.decode.stream import Stream
from rnnserve.server.errors import BadRequest
from rnnserve.server.metrics import Metrics
from rnnserve.server.resume import Progress, StateSigner
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.stopping import StopChecker
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.unit.server.test_decode_loop import FakeModel

PROMPT = "the time traveller "
SPECS = [StateSpec("h", "h_in", "h_out", [1, -1, 3], 1)]
PROGRESS = Progress(5, 20, 123, 5, "ab", 0.8, 3, 0.0, ("abc",))


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_settings(model_repo, state_key="new", state_key_previous="old"))
    srv.start()
    yield srv
    srv.stop()


def _generate(stub, **kw) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=60))


def _ids(msgs) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def _text(msgs) -> str:
    return "".join(m.text for m in msgs)


def _state(seed: int = 0) -> list[np.ndarray]:
    return [np.random.default_rng(seed).standard_normal((1, 1, 3)).astype(np.float32)]


# -- the random sequence -----------------------------------------------------------------
def test_sampler_restored_from_seed_and_count_continues_the_sequence() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    whole = Sampler(params).peek(200).copy()
    for used in (0, 1, 63, 64, 65, 150):
        restored = Sampler(params, seed=7, used=used)
        np.testing.assert_array_equal(restored.peek(50), whole[used:][:50])


def test_unseeded_sampler_keeps_the_seed_it_chose() -> None:
    a = Sampler(SamplingParams(temperature=1.0))
    b = Sampler(SamplingParams(temperature=1.0), seed=a.seed)
    np.testing.assert_array_equal(a.peek(10), b.peek(10))


# -- the token format ----------------------------------------------------------------------
def test_checkpoint_token_round_trips_its_progress() -> None:
    signer = StateSigner("k")
    token = signer.sign("lstm", "1", _state(), 4, PROGRESS)
    resumed = signer.verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert resumed.progress == PROGRESS and resumed.last_token == 4


def _v1_token(key: bytes, last_token: int) -> bytes:
    """A token as the previous rnn-server made it: version 1, no key id, no progress."""
    state = _state()
    header = {"model": "lstm", "version": "1", "last_token": last_token,
              "tensors": [{"dtype": "float32", "shape": [1, 1, 3]}]}  # fmt: skip
    head = json.dumps(header).encode()
    body = struct.pack(">2sBI", b"RS", 1, len(head)) + head + state[0].tobytes()
    return body + hmac.new(key, body, hashlib.sha256).digest()


def test_version_1_tokens_still_resume_the_state() -> None:
    resumed = StateSigner("k").verify(_v1_token(b"k", 3), "lstm", "1", SPECS, vocab_size=10)
    assert resumed.last_token == 3 and resumed.progress is None
    np.testing.assert_array_equal(resumed.state[0], _state()[0])
    with pytest.raises(BadRequest, match="signature is invalid"):
        StateSigner("other").verify(_v1_token(b"k", 3), "lstm", "1", SPECS, vocab_size=10)


def test_newer_token_versions_are_refused_clearly() -> None:
    token = bytearray(StateSigner("k").sign("lstm", "1", _state(), 4))
    token[2] = 3
    with pytest.raises(BadRequest, match="unsupported resume token version 3"):
        StateSigner("k").verify(bytes(token), "lstm", "1", SPECS, vocab_size=10)


def test_key_rotation_signs_with_the_new_key_and_accepts_the_old() -> None:
    old_token = StateSigner("old").sign("lstm", "1", _state(), 4, PROGRESS)
    rotated = StateSigner("new", ["old"])
    assert rotated.verify(old_token, "lstm", "1", SPECS, 10).progress == PROGRESS
    new_token = rotated.sign("lstm", "1", _state(), 4, PROGRESS)
    assert StateSigner("new").verify(new_token, "lstm", "1", SPECS, 10).last_token == 4
    with pytest.raises(BadRequest, match="different --state-key") as err:
        StateSigner("old").verify(new_token, "lstm", "1", SPECS, 10)
    assert err.value.field == "state"


def test_forged_progress_is_refused() -> None:
    signer = StateSigner("k")
    token = signer.sign("lstm", "1", _state(), 4, PROGRESS)
    forged = token.replace(b'"tokens":5', b'"tokens":1')
    assert forged != token
    with pytest.raises(BadRequest, match="signature is invalid"):
        signer.verify(forged, "lstm", "1", SPECS, 10)


# -- the decode thread copies state only where needed ----------------------------------------
class CountingModel(FakeModel):
    """Counts per-row state copies; a step takes 2 ms so the reader keeps up with it."""

    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    def run(self, x, state):
        time.sleep(0.002)
        return super().run(x, state)

    def take(self, state, rows):
        if isinstance(rows, int):
            self.takes += 1
        return super().take(state, rows)


@pytest.mark.parametrize("every, end_state, copies", [(0, False, 0), (8, False, 5),
                                                      (8, True, 39)])  # fmt: skip
def test_state_is_copied_only_for_checkpoints_and_the_end(every, end_state, copies) -> None:
    import asyncio

    def signer(state, last, progress):
        return b"S" if progress is not None else b"E"

    async def main():
        model = CountingModel()
        loop = DecodeLoop("fake", model, Metrics(), 64, 0.0, 256)
        stream = Stream(model="fake", sampler=Sampler(SamplingParams()),
                        stopper=StopChecker(40), decode=str,
                        signer=signer if every or end_state else None, started=0.0,
                        deadline=None, state_every=every, end_state=end_state)  # fmt: skip
        loop.admit()
        loop.submit(stream, [0], None)
        chunks = []
        while (chunk := await stream.buffer.next()) is not None:
            chunks.append(chunk)
        await loop.close()
        return model, chunks

    model, chunks = asyncio.run(main())
    # prefill splits its one row (one take); decode steps copy only what is needed: the
    # checkpoints 8..40, or (return_state) every token after the first
    assert model.takes == 1 + copies
    sealed = [c for c in chunks if c.state == b"S"]
    assert bool(sealed) == bool(every)  # a slow reader gets checkpoints merged, never none
    assert [t for c in chunks for t in c.token_ids] == [k % 10 for k in range(1, 41)]
    counts = np.cumsum([len(c.token_ids) for c in chunks])
    assert all(n % every == 0 for c, n in zip(chunks, counts, strict=True) if c.state == b"S")
    assert chunks[-1].state == (b"E" if every or end_state else b"")


# -- real streams through a real server ------------------------------------------------------
CASES = {
    "greedy": dict(model="gru", max_tokens=200),
    "seeded": dict(model="lstm", max_tokens=200,
                   sampling=pb.SamplingParams(temperature=0.9, top_k=8, seed=11)),
    "server-seeded": dict(model="lstm", max_tokens=200,
                          sampling=pb.SamplingParams(temperature=1.0, top_p=0.9)),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_checkpoint_continues_the_stream_exactly(server, case) -> None:
    kw = dict(CASES[case], prompt=PROMPT, state_every=7)
    for _ in range(20):  # a reader slower than the model gets fewer, merged checkpoints: on a
        ref = _generate(server.stub, **kw)  # busy machine all of them, into the last message
        assert ref[-1].finish_reason == pb.FINISH_REASON_LENGTH
        marks = [i for i, m in enumerate(ref) if m.state and not m.finish_reason]
        if marks:
            break
    assert marks
    for i in marks[:: max(1, len(marks) // 6)]:  # at most ~6 resumes per case
        before = len(_ids(ref[: i + 1]))
        assert before % 7 == 0  # the message ends exactly at its checkpoint
        rest = _generate(server.stub, **dict(CASES[case], state=ref[i].state, state_every=7))
        assert _ids(rest) == _ids(ref[i + 1 :]), f"checkpoint after {before} tokens"
        assert _text(rest) == _text(ref[i + 1 :])
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    if case == "greedy":
        plain = _generate(server.stub, **dict(CASES[case], prompt=PROMPT))
        assert _ids(plain) == _ids(ref) and not any(m.state for m in plain)


def test_stop_string_text_held_back_at_a_checkpoint_is_carried_over(server, model_repo) -> None:
    vocab = Manifest.load(model_repo / "lstm" / "1").vocab  # a character model
    kw = dict(model="lstm", max_tokens=200, sampling=pb.SamplingParams(temperature=0.8, seed=3))
    free = _text(_generate(server.stub, prompt=PROMPT, **kw))
    common = max(set(free), key=free.count)
    # the first never completes: its start is held (not common + "\x01": a letters-only
    # model's text spells an erased character as a space, so that would stop at "x ")
    stops = [common + "qqq", free[150:153]]
    ref = _generate(server.stub, prompt=PROMPT, **kw, stop=stops, state_every=1)
    assert ref[-1].finish_reason == pb.FINISH_REASON_STOP
    assert _text(ref) == free[: free.index(stops[1])]
    held = 0
    for i, m in enumerate(ref[:-1]):
        if not m.state:
            continue
        made = "".join(vocab[t] for t in _ids(ref[: i + 1]))
        if len(made) == len(_text(ref[: i + 1])) and held:
            continue  # one checkpoint without held text is enough; test every held one
        held += len(made) > len(_text(ref[: i + 1]))
        rest = _generate(server.stub, **kw, stop=stops, state_every=1, state=m.state)
        assert _text(ref[: i + 1]) + _text(rest) == _text(ref)
        assert _ids(rest) == _ids(ref[i + 1 :])
    assert held  # some checkpoints fell while text was held back


def test_a_continuation_must_repeat_the_original_request(server) -> None:
    kw = dict(model="lstm", prompt=PROMPT, max_tokens=200, state_every=4,
              sampling=pb.SamplingParams(temperature=0.9, seed=5))  # fmt: skip
    msgs = _generate(server.stub, **kw)
    token = next(m.state for m in msgs if m.state and not m.finish_reason)
    changes = {
        "max_tokens": dict(max_tokens=201),
        "sampling.temperature": dict(sampling=pb.SamplingParams(temperature=0.5, seed=5)),
        "sampling.seed": dict(sampling=pb.SamplingParams(temperature=0.9, seed=6)),
        "stop": dict(stop=["zz"]),
    }
    for field, change in changes.items():
        bad = {**kw, "prompt": "", "state": token, **change}
        with pytest.raises(grpc.RpcError) as err:
            _generate(server.stub, **bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field + ":"), err.value.details()
    # with a prompt it is a new stream from that state: any parameters
    assert _ids(_generate(server.stub, **{**kw, "state": token, "max_tokens": 3})) != []


def test_tokens_from_another_model_or_key_are_refused(server, model_repo: Path) -> None:
    kw = dict(prompt=PROMPT, max_tokens=12, state_every=4)
    token = next(m.state for m in _generate(server.stub, model="lstm", **kw) if m.state)
    with pytest.raises(grpc.RpcError) as err:
        _generate(server.stub, model="gru", max_tokens=12, state=token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "belongs to lstm/1, not gru/1" in err.value.details()
    stranger = ServerThread(make_settings(model_repo, state_key="someone-else")).start()
    old_only = ServerThread(make_settings(model_repo, state_key="old")).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(stranger.stub, model="lstm", max_tokens=12, state=token, state_every=4)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "signed with a different --state-key" in err.value.details()
        # rotation: a replica still on the old key makes tokens the rotated server accepts
        old = next(m.state for m in _generate(old_only.stub, model="lstm", **kw) if m.state)
        rest = _generate(server.stub, model="lstm", max_tokens=12, state=old, state_every=4)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        stranger.stop()
        old_only.stop()


def test_a_checkpoint_whose_stop_strings_were_kept_as_sent_still_continues(
    server, model_repo: Path
) -> None:
    """Replicas before stop strings were matched in the model's text form (lower case here)
    signed checkpoints with the stop strings as sent: continuing one with the same request
    on a newer replica was refused ("stop is ('the',) but ... had ('The',)")."""
    kw = dict(model="lstm", max_tokens=60, state_every=4, stop=["The Time", "Zq"],
              sampling=pb.SamplingParams(temperature=0.9, seed=5))  # fmt: skip
    msgs = _generate(server.stub, prompt=PROMPT, **kw)
    at = next(i for i, m in enumerate(msgs) if m.state and not m.finish_reason)
    signer = server.app.engine.signer
    manifest = Manifest.load(model_repo / "lstm" / "1")
    resumed = signer.verify(msgs[at].state, "lstm", "1", manifest.state, len(manifest.vocab),
                            weights=manifest.onnx_sha256)  # fmt: skip
    assert resumed.progress.stop == ("the time", "zq")  # this release keeps the matched form
    as_sent = replace(resumed.progress, stop=("The Time", "Zq"))  # an earlier release's token
    old = signer.sign("lstm", "1", resumed.state, resumed.last_token, as_sent,
                      weights=manifest.onnx_sha256)  # fmt: skip
    rest = _generate(server.stub, **kw, state=old)
    assert _ids(rest) == _ids(msgs[at + 1 :])
