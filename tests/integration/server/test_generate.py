"""Generate through a real in-process gRPC server and ONNX Runtime (tiny zoo models)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.server.resume import StateSigner
from rnnserve.v1 import rnnserve_pb2 as pb

LM_MODELS = ["rnn", "gru", "lstm", "lstm-deep", "ngram", "hmm"]
PROMPT = "the time traveller "


def _generate(stub, **kw) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=60))


def _ids(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [i for m in msgs for i in m.token_ids]


def _ort_reference(package: Path, prompt: str):
    """Plain onnxruntime on a package, independent of the server: (manifest, session, the
    prompt's ids, the batch-1 initial state feeds)."""
    m = Manifest.load(package)
    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = m.build_vocab().encode(Tokenizer(m.tokenizer).tokenize(prompt))
    state = {}
    for s in m.state:
        shape = [1 if d == -1 else d for d in s.shape]
        init = np.asarray(s.init, dtype=s.dtype)
        elem = np.broadcast_to(init, [d for i, d in enumerate(shape) if i != s.batch_axis])
        state[s.input] = np.expand_dims(elem, s.batch_axis).astype(s.dtype)
    return m, sess, ids, state


def _ort_greedy(package: Path, prompt: str, k: int) -> list[int]:
    """Independent reference: plain onnxruntime, batch 1, one token at a time."""
    m, sess, ids, state = _ort_reference(package, prompt)
    x, out = np.asarray([ids], dtype=np.int64), []
    for _ in range(k):
        res = sess.run(None, {m.input_name: x, **state})
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, res, strict=True))
        state = {s.input: got[s.output] for s in m.state}
        nxt = int(np.argmax(got[m.output_name][0, -1]))
        out.append(nxt)
        x = np.asarray([[nxt]], dtype=np.int64)
    return out


def _until_eos(ids: list[int], eos: int = 3) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.mark.parametrize("name", LM_MODELS)
def test_greedy_equals_the_reference(stub, model_repo: Path, name: str) -> None:
    package = model_repo / name / "1"
    k = 24
    msgs = _generate(stub, model=name, prompt=PROMPT, max_tokens=k)
    if (package / "checkpoint.pt").exists():
        from rnnserve.trainer.sample import greedy_tokens  # the trainer's torch reference

        want = greedy_tokens(package, PROMPT, k)
    else:
        want = _ort_greedy(package, PROMPT, k)
    assert _ids(msgs) == _until_eos(want)
    assert msgs[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])


def test_text_matches_token_ids_and_logprobs_are_log_probabilities(stub, model_repo) -> None:
    msgs = _generate(stub, model="lstm", prompt=PROMPT, max_tokens=10)
    vocab = Manifest.load(model_repo / "lstm" / "1").vocab
    assert "".join(m.text for m in msgs) == "".join(vocab[i] for i in _ids(msgs))
    assert all(m.logprob <= 0.0 for m in msgs)


def test_seeded_sampling_is_reproducible_while_others_share_the_batch(stub, server) -> None:
    request = dict(
        model="lstm",
        prompt=PROMPT,
        max_tokens=40,
        sampling=pb.SamplingParams(temperature=1.5, seed=1234),
    )
    alone = _ids(_generate(stub, **request))
    before = _batch_sizes(server)
    with cf.ThreadPoolExecutor(12) as pool:
        noise = [
            pool.submit(
                _generate,
                stub,
                model="lstm",
                prompt=PROMPT,
                max_tokens=200,
                sampling=pb.SamplingParams(temperature=1.0, seed=s),
            )
            for s in range(10)
        ]
        shared = [pool.submit(lambda: _ids(_generate(stub, **request))) for _ in range(3)]
        results = [f.result() for f in shared]
        for f in noise:
            f.result()
    assert results == [alone] * 3
    other = _ids(
        _generate(stub, **{**request, "sampling": pb.SamplingParams(temperature=1.5, seed=99)})
    )
    assert other != alone
    after = _batch_sizes(server)
    assert after["steps_over_1"] > before["steps_over_1"]  # streams really shared steps


def _batch_sizes(server) -> dict[str, float]:
    reg = server.app.metrics.registry
    total = reg.get_sample_value("rnnserve_batch_size_count", {"model": "lstm"}) or 0.0
    ones = reg.get_sample_value("rnnserve_batch_size_bucket", {"model": "lstm", "le": "1.0"})
    return {"steps_over_1": total - (ones or 0.0)}


def _slots(server) -> tuple[int, float, int]:
    sched = server.app.engine.decoders()

    def read():
        s = next(x for x in server.app.engine.decoders() if x.name == "lstm")
        gauge = server.app.metrics.registry.get_sample_value(
            "rnnserve_live_streams", {"model": "lstm"}
        )
        return s.admitted, gauge, s.live

    assert sched
    return server.call(read)


def _settled_slots(server, want: tuple[int, float, int] = (0, 0.0, 0)) -> tuple[int, float, int]:
    """_slots once they read `want` (by default: the streams of earlier tests on this shared
    server have left), or as they stand after a bounded wait."""
    end = time.monotonic() + 20  # a bound on a busy machine, not a speed check
    while (slots := _slots(server)) != want and time.monotonic() < end:
        time.sleep(0.05)
    return slots


def test_cancelled_stream_frees_its_slot(stub, server) -> None:
    _generate(stub, model="lstm", prompt=PROMPT, max_tokens=1)  # its decode loop, run alone too
    # the counts below are absolute: a stream of an earlier test still leaving would add one
    assert _settled_slots(server) == (0, 0.0, 0)
    call = stub.Generate(pb.GenerateRequest(model="lstm", prompt=PROMPT, max_tokens=150_000))
    next(call)
    # the first token goes out from the prefill thread before the decode thread puts the row
    # in its batch: `live` may still read 0 for a moment after it arrived
    assert _settled_slots(server, want=(1, 1.0, 1)) == (1, 1.0, 1)
    call.cancel()
    assert _settled_slots(server) == (0, 0.0, 0)  # a bounded wait; no timing assertion


def test_resume_token_continues_exactly(stub) -> None:
    full = _ids(_generate(stub, model="gru", prompt=PROMPT, max_tokens=30))
    first = _generate(stub, model="gru", prompt=PROMPT, max_tokens=12, return_state=True)
    token = first[-1].state
    assert token
    rest = _generate(stub, model="gru", max_tokens=18, state=token)
    assert _ids(first) + _ids(rest) == full[: len(_ids(first)) + len(_ids(rest))]


def test_state_max_age_refuses_an_expired_token(model_repo: Path) -> None:
    """--state-max-age: a fresh token resumes; the same state signed two hours ago does not."""
    from tests.integration.server.harness import ServerThread, make_settings

    srv = ServerThread(make_settings(model_repo, state_max_age=3600)).start()
    try:
        first = _generate(srv.stub, model="gru", prompt=PROMPT, max_tokens=4, return_state=True)
        token = first[-1].state
        assert _ids(_generate(srv.stub, model="gru", max_tokens=4, state=token))
        specs = Manifest.load(model_repo / "gru" / "1").state
        resumed = StateSigner("k").verify(token, "gru", "1", specs, vocab_size=1 << 30)
        made = time.time() - 7200
        old = StateSigner("k", clock=lambda: made).sign("gru", "1", resumed.state, 0)
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="gru", max_tokens=4, state=old)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("state:")
        assert "expired at" in err.value.details()
    finally:
        srv.stop()


def test_stop_string_ends_the_stream_and_is_not_returned(stub) -> None:
    free = "".join(m.text for m in _generate(stub, model="lstm", prompt=PROMPT, max_tokens=30))
    stop = free[5:7]
    msgs = _generate(stub, model="lstm", prompt=PROMPT, max_tokens=30, stop=[stop])
    text = "".join(m.text for m in msgs)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP
    assert text == free[: free.index(stop)]


@pytest.mark.parametrize(
    "request_kw, code, field",
    [
        (dict(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "nope"),
        (dict(model="lstm", version="9", prompt="x"), grpc.StatusCode.NOT_FOUND, "version"),
        (dict(model="bilstm", prompt="x"), grpc.StatusCode.FAILED_PRECONDITION, "bidirectional"),
        (dict(model="sine-gru", prompt="x"), grpc.StatusCode.FAILED_PRECONDITION, "Forecast"),
        (dict(model="", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (dict(model="lstm", prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (dict(model="lstm", prompt="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            dict(model="lstm", prompt="x", max_tokens=-3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            dict(model="lstm", prompt="x", max_tokens=10**9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            dict(model="lstm", prompt="x", sampling=pb.SamplingParams(temperature=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.temperature",
        ),
        (
            dict(model="lstm", prompt="x", sampling=pb.SamplingParams(temperature=1, top_k=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.top_k",
        ),
        (
            dict(model="lstm", prompt="x", sampling=pb.SamplingParams(top_p=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.top_p",
        ),
        (dict(model="lstm", prompt="x", stop=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (
            dict(model="lstm", prompt="x", state=b"garbage-token-bytes" * 3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "state",
        ),
    ],
)
def test_bad_generate_requests(stub, request_kw, code, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, **request_kw)
    assert err.value.code() == code
    assert field in err.value.details()


def test_resume_token_of_another_model_is_invalid(stub) -> None:
    msgs = _generate(stub, model="gru", prompt=PROMPT, max_tokens=2, return_state=True)
    with pytest.raises(grpc.RpcError) as err:
        _generate(stub, model="rnn", prompt="x", state=msgs[-1].state)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "state" in err.value.details()


def test_churn_keeps_greedy_and_resume_exact(stub, server) -> None:
    """24 streams of different lengths join and leave one batch; each is the lone stream's
    text, and resuming each from its state finishes it exactly."""
    full = _ids(_generate(stub, model="lstm", prompt=PROMPT, max_tokens=40))
    lengths = [5 + i for i in range(24)]
    with cf.ThreadPoolExecutor(24) as pool:
        firsts = list(pool.map(
            lambda n: _generate(stub, model="lstm", prompt=PROMPT, max_tokens=n,
                                return_state=True), lengths))  # fmt: skip
    for n, msgs in zip(lengths, firsts, strict=True):
        assert _ids(msgs) == full[:n]
    with cf.ThreadPoolExecutor(24) as pool:
        rests = list(pool.map(
            lambda m: _ids(_generate(stub, model="lstm", max_tokens=40 - len(_ids(m)),
                                     state=m[-1].state)), firsts))  # fmt: skip
    for msgs, rest in zip(firsts, rests, strict=True):
        assert _ids(msgs) + rest == full


@pytest.mark.parametrize("name", LM_MODELS)
def test_decode_head_and_numpy_sampler_give_the_same_text(stub, model_repo, name) -> None:
    """--decode-head 0 picks tokens in numpy: the same seeds give the same tokens either way
    (greedy, tempered, top-k/top-p), so the head changes where the work runs, not results."""
    from tests.integration.server.harness import ServerThread, make_settings

    requests = [
        pb.GenerateRequest(model=name, prompt=PROMPT, max_tokens=40),
        pb.GenerateRequest(model=name, prompt=PROMPT, max_tokens=40,
                           sampling=pb.SamplingParams(temperature=1.2, seed=11)),
        pb.GenerateRequest(model=name, prompt=PROMPT, max_tokens=40,
                           sampling=pb.SamplingParams(temperature=0.8, top_k=5, top_p=0.9,
                                                      seed=12)),
    ]  # fmt: skip
    numpy_server = ServerThread(make_settings(model_repo, decode_head=0)).start()
    try:
        for request in requests:
            with_head = list(stub.Generate(request, timeout=60))
            without = list(numpy_server.stub.Generate(request, timeout=60))
            assert _ids(with_head) == _ids(without)
            total = sum(m.logprob for m in with_head)  # messages may split the tokens apart
            assert total == pytest.approx(sum(m.logprob for m in without), abs=1e-3)
    finally:
        numpy_server.stop()


def test_unset_max_tokens_is_capped_by_a_low_server_limit(model_repo: Path) -> None:
    """Unset max_tokens means 64, or --max-tokens when lower (vLLM clamps its default too):
    a server run with --max-tokens 10 answers a request that leaves it out, and still
    refuses an explicit value over its limit."""
    from tests.integration.server.harness import ServerThread, make_settings

    low = ServerThread(make_settings(model_repo, max_tokens=10)).start()
    try:
        msgs = _generate(low.stub, model="lstm", prompt=PROMPT)
        assert 1 <= len(_ids(msgs)) <= 10
        assert msgs[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        with pytest.raises(grpc.RpcError) as err:
            _generate(low.stub, model="lstm", prompt=PROMPT, max_tokens=11)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens" in err.value.details() and "[1, 10]" in err.value.details()
    finally:
        low.stop()


def test_stop_strings_look_at_generated_text_only(stub) -> None:
    """A stop string in the prompt does not end the stream at once (as vLLM and TGI: only
    the generated text is searched), and one that never completes before max_tokens gives
    back the text it held (finish LENGTH)."""
    free = "".join(m.text for m in _generate(stub, model="lstm", prompt=PROMPT, max_tokens=30))
    in_prompt = "traveller"
    msgs = _generate(stub, model="lstm", prompt=PROMPT, max_tokens=30, stop=[in_prompt])
    text = "".join(m.text for m in msgs)
    if in_prompt in free:
        assert (text, msgs[-1].finish_reason) == (free[: free.index(in_prompt)],
                                                  pb.FINISH_REASON_STOP)  # fmt: skip
    else:
        assert (text, msgs[-1].finish_reason) == (free, pb.FINISH_REASON_LENGTH)
    short = _generate(stub, model="lstm", prompt=PROMPT, max_tokens=3, stop=[free[:20]])
    assert "".join(m.text for m in short) == "".join(
        m.text for m in _generate(stub, model="lstm", prompt=PROMPT, max_tokens=3)
    )
    assert short[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_sampled_logprobs_are_under_the_unmodified_model(stub, model_repo) -> None:
    """Temperature, top-k and top-p change which token is drawn, not the logprob reported
    for it (as vLLM's default): plain onnxruntime fed the prompt and the drawn tokens gives
    the same numbers (head and numpy agree: test_decode_head_and_numpy_sampler_give_...)."""
    sampling = pb.SamplingParams(temperature=1.7, top_k=4, top_p=0.8, seed=21)
    msgs = _generate(stub, model="lstm", prompt=PROMPT, max_tokens=16, sampling=sampling)
    ids = _ids(msgs)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(ids) == 16
    man, sess, prompt, state = _ort_reference(model_repo / "lstm" / "1", PROMPT)
    x = np.asarray([prompt + ids[:-1]], dtype=np.int64)
    logits = sess.run([man.output_name], {man.input_name: x, **state})[0][0, len(prompt) - 1 :]
    z = logits.astype(np.float64)
    lp = z - z.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    want = lp[np.arange(len(ids)), ids]
    assert sum(msg.logprob for msg in msgs) == pytest.approx(want.sum(), abs=1e-3)
