"""Metrics across a model's and the server's lifecycle: series of unloaded models, and the
status of the streams a shutdown cuts when --grace runs out."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from rnnserve.server.metrics import serve_http
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings


def _scrape(srv: ServerThread) -> str:
    """/metrics as Prometheus reads it (endpoints_app on an ephemeral port)."""
    http = serve_http(srv.app.metrics.registry, 0, ready=lambda: True, addr="127.0.0.1")
    try:
        port = http.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.read().decode()
    finally:
        http.shutdown()
        http.server_close()


def _models(text: str) -> set[str]:
    return set(re.findall(r'model="([^"]*)"', text))


def test_an_unloaded_models_series_go_and_those_of_a_version_still_loaded_stay(
    model_repo: Path, tmp_path: Path
) -> None:
    """Series are labelled by model name (all versions share them) and, for
    rnnserve_model_serving, by version: removing gru/2 removes only gru/2's serving gauge
    (gru/1 still serves under that name); removing lstm, its only version, removes every
    series of lstm. They stayed for good: a repository whose models come and go (hot reload,
    a URL repository's sync) grew its /metrics page without end."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / version)
    shutil.copytree(model_repo / "lstm" / "1", repo / "lstm" / "1")
    srv = ServerThread(make_settings(repo)).start()
    try:
        for model, version in (("gru", "1"), ("gru", "2"), ("lstm", "1")):
            request = pb.GenerateRequest(model=model, version=version, prompt="ab", max_tokens=3)
            assert list(srv.stub.Generate(request))
        before = _scrape(srv)
        assert {"gru", "lstm"} <= _models(before)
        assert 'rnnserve_model_serving{model="gru",version="2"} 1.0' in before
        shutil.rmtree(repo / "gru" / "2")
        shutil.rmtree(repo / "lstm")
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert sorted(report.unloaded) == ["gru/2", "lstm/1"]
        after = _scrape(srv)
        assert "lstm" not in _models(after), [x for x in after.splitlines() if "lstm" in x]
        assert 'version="2"' not in after
        assert 'rnnserve_model_serving{model="gru",version="1"} 1.0' in after
        for name in ("rnnserve_generated_tokens_total", "rnnserve_live_streams"):
            assert f'{name}{{model="gru"}}' in after, name  # gru/1 still serves
        assert (
            'rnnserve_request_duration_seconds_count{code="OK",model="gru",rpc="Generate"}' in after
        )
        assert 'rnnserve_model_load_seconds_count{model="gru"}' in after
    finally:
        srv.stop()


def test_a_stream_cut_when_the_grace_runs_out_counts_as_what_its_client_sees(
    model_repo: Path,
) -> None:
    """grpc's stop cancels the calls still running at the end of --grace; their clients get
    UNAVAILABLE "Cancelling all calls" (and fail over), but the metrics and the access line
    said CANCELLED, which the error-rate alert leaves out as a client's own doing."""
    srv = ServerThread(make_settings(model_repo, max_tokens=1_000_000)).start()
    request = pb.GenerateRequest(model="lstm", prompt="the", max_tokens=1_000_000)  # minutes
    stream = srv.stub.Generate(request, timeout=60)
    next(stream)
    app = srv.app
    srv.run(app.shutdown(grace=0.5, delay=0.0), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    reg = app.metrics.registry

    def errors(code: str) -> float | None:
        return reg.get_sample_value("rnnserve_errors_total", {"rpc": "Generate", "code": code})

    end = time.monotonic() + 10  # the handler records its end as its cancellation unwinds
    while errors("UNAVAILABLE") is None and errors("CANCELLED") is None:
        assert time.monotonic() < end, "the cut stream was never recorded"
        srv.run(asyncio.sleep(0.05))
    assert errors("CANCELLED") is None
    assert errors("UNAVAILABLE") == 1
    count = "rnnserve_request_duration_seconds_count"
    labels = {"rpc": "Generate", "model": "lstm", "code": "UNAVAILABLE"}
    assert reg.get_sample_value(count, labels) == 1
    srv.app = None  # shut down already
    srv.stop()


def test_an_http_stream_cut_when_the_grace_runs_out_counts_as_unavailable(
    model_repo: Path,
) -> None:
    """The HTTP port's twin of the test above: at the end of --grace the server closes the
    connections still streaming; their clients see the connection drop, the server's doing,
    but the metrics and the access line said CANCELLED, a client's own."""
    from tests.integration.http.conftest import http_server

    srv = http_server(model_repo, max_tokens=1_000_000)
    app = srv.app
    # greedy, as the gRPC test's: OpenAI's default temperature 1 samples, and a sampled
    # stream of the tiny model reaches <eos> before the shutdown
    body = json.dumps({"model": "lstm", "prompt": "the", "max_tokens": 1_000_000,
                       "temperature": 0, "stream": True}).encode()  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{app.http.port}/v1/completions", body,
        {"Content-Type": "application/json"},
    )  # fmt: skip
    reply = urllib.request.urlopen(request, timeout=60)
    assert reply.readline().startswith(b"data: ")  # the stream runs (minutes of tokens)
    srv.run(app.shutdown(grace=0.5, delay=0.0), timeout=30)
    with contextlib.suppress(OSError, http.client.HTTPException):
        while reply.read(65536):
            pass
    reply.close()
    reg = app.metrics.registry

    def errors(code: str) -> float | None:
        return reg.get_sample_value(
            "rnnserve_errors_total", {"rpc": "openai.Completions", "code": code}
        )

    end = time.monotonic() + 10  # the handler records its end as its cancellation unwinds
    while errors("UNAVAILABLE") is None and errors("CANCELLED") is None:
        assert time.monotonic() < end, [
            (m.name, s.labels, s.value)
            for m in reg.collect()
            for s in m.samples
            if "errors" in s.name or "request_duration_seconds_count" in s.name
        ]
        srv.run(asyncio.sleep(0.05))
    assert errors("CANCELLED") is None
    assert errors("UNAVAILABLE") == 1
    srv.app = None  # shut down already
    srv.stop()
