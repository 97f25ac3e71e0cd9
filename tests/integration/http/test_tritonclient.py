"""The real tritonclient (its own venv) over KServe v2 gRPC and REST: health, metadata and
ModelInfer for every task, compared with the native rnnserve.v1 answers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.triton import run_triton


@pytest.fixture(scope="module")
def native(server) -> dict:
    stub = server.stub
    score = stub.Score(pb.ScoreRequest(model="lstm", texts=["the time traveller", "it was"]))
    history = np.sin(np.arange(12, dtype=np.float32) / 2).astype(np.float32)
    forecast = stub.Forecast(
        pb.ForecastRequest(model="sine-gru", history=history.tolist(), horizon=5)
    )
    infill = stub.Infill(pb.InfillRequest(model="bilstm", left="the ti", right="e machine"))
    return {"score": score, "forecast": forecast, "infill": infill}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_tritonclient_matches_native(server, native, transport) -> None:
    app = server.app
    port = app.port if transport == "grpc" else app.http.port
    got = run_triton(transport, f"127.0.0.1:{port}")
    assert got["live"] and got["ready"] and got["lstm_ready"]
    assert got["lstm_inputs"] == ["text"]
    results = native["score"].results
    assert got["score"]["perplexity"] == pytest.approx([r.perplexity for r in results])
    assert got["score"]["log_likelihood"] == pytest.approx([r.log_likelihood for r in results])
    assert got["score"]["num_tokens"] == [r.num_tokens for r in results]
    assert got["forecast"] == pytest.approx(list(native["forecast"].forecast), rel=1e-5)
    assert got["infill"] == [c.text for c in native["infill"].candidates]
    assert "nope" in got["unknown_model_error"]


@pytest.fixture(scope="module")
def refusals(server) -> Callable[[str], dict]:
    """triton_calls.py --refusals' answers over one transport, run once per transport."""
    found: dict[str, dict] = {}

    def over(transport: str) -> dict:
        if transport not in found:
            port = server.app.port if transport == "grpc" else server.app.http.port
            found[transport] = run_triton(transport, f"127.0.0.1:{port}", refusals=True)
        return found[transport]

    return over


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_unserved_triton_extensions_are_refused_by_name(refusals, transport) -> None:
    """Shared memory and classification parameters were ignored: the outputs came inline
    (not in the region) and raw (not the top classes), or the input was refused as having
    no data. Now each is a 400 / INVALID_ARGUMENT naming the extension; the Triton-only
    endpoints are REST 404 / gRPC UNIMPLEMENTED."""
    got = refusals(transport)
    bad = "StatusCode.INVALID_ARGUMENT" if transport == "grpc" else "400"
    for call, words in [
        ("shm_input", "inputs[text].parameters.shared_memory_region"),
        ("shm_output", "outputs[num_tokens].parameters.shared_memory_region"),
        ("classification", "outputs[perplexity].parameters.classification"),
        ("sequence", "parameters.sequence_id"),  # stateless: a sequence would lose its state
    ]:
        status, message = got[call]
        assert status == bad and words in message and "not supported" in message, (call, message)
    missing = "StatusCode.UNIMPLEMENTED" if transport == "grpc" else "404"
    # config and the repository index are served over REST (test_aux_endpoints.py); the
    # KServe gRPC proto has neither
    unserved = ("register_shm", "statistics") + (("config", "index") if transport == "grpc" else ())
    for call in unserved:
        assert got[call][0] == missing, call


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_the_request_timeout_is_the_deadline(refusals, transport) -> None:
    """tritonclient's `timeout=` (Triton's parameters.timeout, microseconds) was ignored: a
    call past it was answered. Now it is DEADLINE_EXCEEDED / 504 as a gRPC deadline is, and a
    call within it (with a `priority`, accepted and ignored) is answered."""
    got = refusals(transport)
    late = "StatusCode.DEADLINE_EXCEEDED" if transport == "grpc" else "504"
    assert got["timeout"] == [late, "the call's deadline passed"]
    assert got["time_enough"] == ["", ""]
