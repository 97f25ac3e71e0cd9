"""Score, Infill, Forecast and model metadata for every zoo model, plus their bad inputs."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.v1 import rnnserve_pb2 as pb

ZOO = {
    "rnn": "lm", "gru": "lm", "lstm": "lm", "lstm-deep": "lm", "ngram": "lm", "hmm": "lm",
    "bilstm": "infill", "sine-mlp": "forecast", "sine-gru": "forecast",
}  # fmt: skip
LM = [n for n, t in ZOO.items() if t == "lm"]
SINE = [math.sin(0.3 * i) for i in range(40)]


def test_list_models_describes_every_version(stub, model_repo: Path) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(ZOO) <= set(models)
    for name, task in ZOO.items():
        info = models[name]
        assert info.default_version == "1"
        (v,) = info.versions
        manifest = Manifest.load(model_repo / name / "1")
        assert (v.task, v.status, v.architecture) == (task, "SERVING", manifest.architecture)
        assert v.vocab_size == manifest.vocab_size
        assert [s.name for s in v.state] == [s.name for s in manifest.state]
        assert v.execution_provider == "CPUExecutionProvider"
        assert dict(v.metrics) == pytest.approx(manifest.metrics)


def test_get_model_and_unknown_version(stub) -> None:
    info = stub.GetModel(pb.GetModelRequest(model="lstm", version="1"))
    assert info.versions[0].rpcs == ["Generate", "Score", "Infill"]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(model="lstm", version="7"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", LM)
def test_score_every_lm_model(stub, name: str) -> None:
    texts = ["the time traveller", "zzqx", "the time traveller"]
    res = stub.Score(pb.ScoreRequest(model=name, texts=texts)).results
    assert len(res) == 3
    for text, r in zip(texts, res, strict=True):
        assert r.num_tokens == len(text) - 1 == len(r.token_logprobs) == len(r.tokens)
        assert r.log_likelihood == pytest.approx(sum(r.token_logprobs), rel=1e-4)
        assert r.perplexity == pytest.approx(math.exp(-r.log_likelihood / r.num_tokens), rel=1e-5)
    # padding in a shared batch must not change a text's score
    alone = stub.Score(pb.ScoreRequest(model=name, texts=[texts[1]])).results[0]
    assert alone.log_likelihood == pytest.approx(res[1].log_likelihood, rel=1e-4, abs=1e-4)


class _Recorded:
    """An OnnxModel that notes the shape of every input it runs."""

    def __init__(self, model) -> None:
        self.model, self.shapes = model, []

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def run(self, x, state):
        self.shapes.append(x.shape)
        return self.model.run(x, state)


@pytest.mark.parametrize("name", LM)
def test_a_text_over_the_logits_budget_runs_in_windows_with_the_same_scores(
    server, monkeypatch, name: str
) -> None:
    """A text whose logits alone exceed the budget runs in time windows carrying the state:
    no call's logits exceed it, and the scores are those of one call."""
    import asyncio

    from rnnserve.server import scoring
    from rnnserve.server.runtime import Runtime
    from rnnserve.server.scoring import encode_texts, score

    engine = server.app.engine
    entry = engine.repository.get(name)
    codec = engine.codec(entry)
    texts = ["the time traveller for so it will be convenient to speak of him", "the time"]
    encoded = encode_texts(codec, texts, 64, 4096)
    runtime = Runtime(1)
    try:
        whole = asyncio.run(score(entry.model, runtime, codec, encoded))
        budget = 7 * len(codec)  # 7 steps of one text's logits
        monkeypatch.setattr(scoring, "MAX_LOGIT_ELEMENTS", budget)
        model = _Recorded(entry.model)
        windowed = asyncio.run(score(model, runtime, codec, encoded))
    finally:
        runtime.close()
    assert len(model.shapes) > len(texts), "the long text took several calls"
    assert all(rows * steps * len(codec) <= budget for rows, steps in model.shapes)
    for a, b in zip(whole, windowed, strict=True):
        assert b.num_tokens == a.num_tokens and b.tokens == a.tokens
        assert b.token_logprobs == pytest.approx(a.token_logprobs, rel=1e-4, abs=1e-4)
        assert b.log_likelihood == pytest.approx(a.log_likelihood, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", LM)
def test_infill_contexts_over_the_logits_budget_run_in_windows_with_the_same_answer(
    server, monkeypatch, name: str
) -> None:
    """Infill ran each context in one call: with --max-prompt-tokens raised, a long left or
    right context asked ORT for contexts x vocabulary logits at once (gigabytes for a word
    model). Now no call exceeds the budget, and the candidates are those of one call."""
    import asyncio

    from rnnserve.server import infill as infill_module
    from rnnserve.server.runtime import Runtime
    from rnnserve.server.settings import Settings

    engine = server.app.engine
    entry = engine.repository.get(name)
    codec = engine.codec(entry)
    left, right = "the time traveller for so it", " will be convenient to speak"

    def ask(model):
        routed = SimpleNamespace(name=entry.name, manifest=entry.manifest, model=model)
        return asyncio.run(infill_module.infill(routed, codec, runtime, Settings(), left, right, 8))

    runtime = Runtime(1)
    try:
        whole = ask(entry.model)
        budget = 7 * len(codec)  # 7 steps of one row's logits
        monkeypatch.setattr(infill_module, "MAX_LOGIT_ELEMENTS", budget)
        model = _Recorded(entry.model)
        windowed = ask(model)
    finally:
        runtime.close()
    assert max(steps for _, steps in model.shapes) < len(right), "the contexts were cut"
    assert all(rows * steps * len(codec) <= budget for rows, steps in model.shapes)
    assert [c.token_id for c in windowed] == [c.token_id for c in whole]
    assert [c.probability for c in windowed] == pytest.approx(
        [c.probability for c in whole], rel=1e-4, abs=1e-6
    )


def test_score_counts_unknown_tokens(stub) -> None:
    r = stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"])).results[0]
    assert r.unknown_tokens == 0
    word = stub.Score(pb.ScoreRequest(model="lstm", texts=["a\u4e2db"])).results[0]
    # the zoo's tokenizer keeps letters only: the CJK char becomes a space, not an <unk>
    # (counting <unk>s is tested on a tokenizer that keeps it: unit/server/test_text.py)
    assert word.unknown_tokens == 0 and word.tokens == [" ", "b"]


@pytest.mark.parametrize("name", [*LM, "bilstm"])
def test_infill_ranks_candidates(stub, name: str) -> None:
    res = stub.Infill(pb.InfillRequest(model=name, left="the tim", right=" traveller", top_k=5))
    probs = [c.probability for c in res.candidates]
    assert len(probs) == 5
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-6
    assert all(c.token_id >= 4 for c in res.candidates)  # reserved tokens are never candidates


def test_a_history_no_float32_graph_can_take_is_invalid_not_nan(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:  # finite in float64, inf in float32
        stub.Forecast(pb.ForecastRequest(model="sine-gru", history=[1e308] * 20, horizon=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "history[" in err.value.details()


@pytest.mark.parametrize("name", ["sine-mlp", "sine-gru"])
def test_forecast_every_forecast_model(stub, model_repo: Path, name: str) -> None:
    tau = int(Manifest.load(model_repo / name / "1").series["tau"])
    res = stub.Forecast(pb.ForecastRequest(model=name, history=SINE, horizon=7, return_fitted=True))
    assert len(res.forecast) == 7 and all(math.isfinite(v) for v in res.forecast)
    assert res.fitted_offset == tau
    assert len(res.fitted) == len(SINE) - tau
    want_fit, want_forecast = _ort_forecast(model_repo / name / "1", SINE, 7)
    np.testing.assert_allclose(res.fitted, want_fit, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.forecast, want_forecast, rtol=1e-4, atol=1e-5)
    # the manifest's 90% residual interval around each step, in series units
    intervals = Manifest.load(model_repo / name / "1").series["intervals"]
    assert len(res.lower) == len(res.upper) == 7
    np.testing.assert_allclose(
        np.asarray(res.lower) - res.forecast, intervals["lower"][:7], rtol=1e-6, atol=1e-9
    )
    assert all(lo <= f <= hi for lo, f, hi in zip(res.lower, res.forecast, res.upper, strict=True))


def _ort_forecast(package: Path, history: list[float], horizon: int):
    """Independent reference: normalise, feed one value at a time, feed predictions back."""
    import onnxruntime as ort

    m = Manifest.load(package)
    mean, std, tau = m.series["mean"], m.series["std"], int(m.series["tau"])
    sess = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    state = {}
    for s in m.state:
        shape = [1 if d == -1 else d for d in s.shape]
        state[s.input] = np.full(shape, s.init if np.isscalar(s.init) else 0.0, dtype=s.dtype)
        if not np.isscalar(s.init):
            state[s.input] = np.expand_dims(np.asarray(s.init, dtype=s.dtype), s.batch_axis)
    names = [o.name for o in sess.get_outputs()]

    def step(v: float) -> float:
        nonlocal state
        x = np.asarray([[[v]]], dtype=np.float32)
        got = dict(zip(names, sess.run(None, {m.input_name: x, **state}), strict=True))
        state = {s.input: got[s.output] for s in m.state}
        return float(got[m.output_name][0, -1, 0])

    preds = [step((v - mean) / std) for v in history]
    out = [preds[-1]]
    for _ in range(horizon - 1):
        out.append(step(out[-1]))
    fitted = [p * std + mean for p in preds[tau - 1 : -1]]
    return fitted, [p * std + mean for p in out]


@pytest.mark.parametrize(
    "rpc, req, code, field",
    [
        ("Score", pb.ScoreRequest(model="lstm"), "INVALID_ARGUMENT", "texts"),
        ("Score", pb.ScoreRequest(model="lstm", texts=["a"]), "INVALID_ARGUMENT", "texts[0]"),
        ("Score", pb.ScoreRequest(model="lstm", texts=["ab"] * 65), "INVALID_ARGUMENT", "texts"),
        ("Score", pb.ScoreRequest(model="bilstm", texts=["ab"]), "FAILED_PRECONDITION", "Infill"),
        ("Score", pb.ScoreRequest(model="nope", texts=["ab"]), "NOT_FOUND", "nope"),
        ("Infill", pb.InfillRequest(model="lstm"), "INVALID_ARGUMENT", "left"),
        ("Infill", pb.InfillRequest(model="lstm", left="a", top_k=-1), "INVALID_ARGUMENT", "top_k"),
        ("Infill", pb.InfillRequest(model="sine-mlp", left="a"), "FAILED_PRECONDITION", "Forecast"),
        (  # a run of marks NFKC would sort in quadratic time (tests/unit/server/test_text.py)
            "Infill",
            pb.InfillRequest(model="lstm", left="a", right="b" + "\u0301\u0316" * 16),
            "INVALID_ARGUMENT",
            "right",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="sine-gru", horizon=3),
            "INVALID_ARGUMENT",
            "history",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="sine-mlp", history=[1.0], horizon=3),
            "INVALID_ARGUMENT",
            "history",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="sine-gru", history=[1.0, float("nan")], horizon=3),
            "INVALID_ARGUMENT",
            "history[1]",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="sine-gru", history=SINE, horizon=0),
            "INVALID_ARGUMENT",
            "horizon",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="sine-gru", history=SINE, horizon=10**6),
            "INVALID_ARGUMENT",
            "horizon",
        ),
        (
            "Forecast",
            pb.ForecastRequest(model="lstm", history=SINE, horizon=2),
            "FAILED_PRECONDITION",
            "Forecast",
        ),
    ],
)
def test_bad_requests_name_the_field(stub, rpc, req, code, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(req)
    assert err.value.code().name == code
    assert field in err.value.details()


def test_calls_past_max_calls_are_refused_not_queued(model_repo: Path) -> None:
    """Score, Infill and Forecast work waits for a few executor threads: without --max-calls
    a flood of them queued without end. Past it, RESOURCE_EXHAUSTED at once; a slot frees
    when its call ends."""
    import threading

    from tests.integration.server.harness import ServerThread, make_settings

    srv = ServerThread(make_settings(model_repo, max_calls=1)).start()
    try:
        runtime = srv.app.engine.runtime
        original, entered, release = runtime.call, threading.Event(), threading.Event()

        async def held(fn, *args):
            entered.set()
            await asyncio.to_thread(release.wait, 30)
            return await original(fn, *args)

        runtime.call = held
        request = pb.ScoreRequest(model="lstm", texts=["the time machine"])
        first = srv.stub.Score.future(request, timeout=30)
        assert entered.wait(30)
        with pytest.raises(grpc.RpcError) as refused:
            srv.stub.Score(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-calls 1" in refused.value.details()
        release.set()
        assert first.result(timeout=30).results[0].num_tokens > 0
        runtime.call = original
        assert srv.stub.Score(request, timeout=30).results[0].num_tokens > 0  # freed
    finally:
        srv.stop()


def test_rpcs_leave_out_infill_past_max_infill_vocab(stub, model_repo: Path) -> None:
    """GetModel listed Infill for a language model whose vocabulary is over
    --max-infill-vocab, and every Infill call to it was refused (FAILED_PRECONDITION)."""
    from tests.integration.server.harness import ServerThread, make_settings

    assert "Infill" in stub.GetModel(pb.GetModelRequest(model="lstm")).versions[0].rpcs
    srv = ServerThread(make_settings(model_repo, max_infill_vocab=8)).start()
    try:
        (version,) = srv.stub.GetModel(pb.GetModelRequest(model="lstm")).versions
        assert version.vocab_size > 8 and list(version.rpcs) == ["Generate", "Score"]
        request = pb.InfillRequest(model="lstm", left="the ", right="ime machine")
        with pytest.raises(grpc.RpcError) as refused:
            srv.stub.Infill(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()
