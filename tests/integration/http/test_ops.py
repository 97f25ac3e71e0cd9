"""Bearer tokens, --auth-health, body limit, metrics, access logs and draining on the HTTP
port and KServe gRPC: the same guards and counters as rnnserve.v1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.kserve import grpc_predict_v2_pb2 as kpb
from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from rnnserve.server.auth import OpenServicesAuth, bearer_guard
from rnnserve.server.main import build_app
from tests.integration.http.conftest import TOKEN, free_port, http_server
from tests.integration.server.harness import ServerThread, make_settings
from tests.tools import need_module


class GuardedServer(ServerThread):
    """ServerThread whose app has the bearer guard (and, with --auth-health, the guard of
    grpc.health.v1), as `rnn-server --tokens-file` builds it."""

    def start(self) -> GuardedServer:
        self._thread.start()

        async def boot():
            guard = bearer_guard([TOKEN])
            extra = [OpenServicesAuth(guard)] if self.settings.auth_health else []
            app = build_app(self.settings, guards=[guard], extra_interceptors=extra)
            await app.start()
            return app

        self.app = self.run(boot())
        self.channel = grpc.insecure_channel(f"localhost:{self.app.port}")
        return self


@pytest.fixture(scope="module")
def guarded(model_repo: Path) -> Iterator[GuardedServer]:
    settings = make_settings(
        model_repo, http_port=free_port(), auth_health=1, max_message_bytes=2000
    )
    srv = GuardedServer(settings).start()
    yield srv
    srv.stop()


def request(url: str, body: object | None = None, token: str = "", raw: bytes = b""):
    """-> (status, parsed JSON body)."""
    data = raw or (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bearer_tokens_on_http(guarded: GuardedServer) -> None:
    base = f"http://127.0.0.1:{guarded.app.http.port}"
    body = {"model": "lstm", "prompt": "the", "max_tokens": 2}
    status, got = request(base + "/v1/completions", body)
    assert status == 401 and got["error"]["type"] == "authentication_error"
    status, got = request(base + "/v1/completions", body, token="wrong")
    assert status == 401 and "invalid bearer token" in got["error"]["message"]
    assert request(base + "/v1/completions", body, token=TOKEN)[0] == 200
    assert request(base + "/v2/models/lstm", token="")[0] == 401
    # --auth-health: probes need the token too
    assert request(base + "/v2/health/ready")[0] == 401
    assert request(base + "/v2/health/ready", token=TOKEN) == (200, {"ready": True})
    client = openai.OpenAI(base_url=base + "/v1", api_key=TOKEN, max_retries=0)
    assert client.completions.create(model="lstm", prompt="the", max_tokens=3).usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="no", max_retries=0).models.list()


def test_bearer_tokens_on_kserve_grpc(guarded: GuardedServer) -> None:
    stub = kpb_grpc.GRPCInferenceServiceStub(guarded.channel)
    request_ = kpb.ModelInferRequest(model_name="lstm")
    t = request_.inputs.add(name="text", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"the time")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.ServerReady(kpb.ServerReadyRequest(), timeout=30)  # --auth-health
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", f"Bearer {TOKEN}"),)
    got = stub.ModelInfer(request_, metadata=auth, timeout=30)
    assert [o.name for o in got.outputs] == ["perplexity", "log_likelihood", "num_tokens"]
    assert stub.ServerReady(kpb.ServerReadyRequest(), metadata=auth, timeout=30).ready


def test_body_over_the_message_limit_is_413(guarded: GuardedServer) -> None:
    base = f"http://127.0.0.1:{guarded.app.http.port}"
    body = {"model": "lstm", "prompt": "x" * 5000}
    status, got = request(base + "/v1/completions", body, token=TOKEN)
    assert status == 413 and got["error"]["code"] == "invalid_argument"
    # not a rate limit: a client that backs off and retries would send the same body again
    assert got["error"]["type"] == "invalid_request_error"
    # the caller's mistake: not among the codes the server-side error-rate alert counts
    registry = guarded.app.metrics.registry
    errors = {
        code: registry.get_sample_value(
            "rnnserve_errors_total", {"rpc": "openai.Completions", "code": code}
        )
        or 0
        for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    }
    assert errors["INVALID_ARGUMENT"] >= 1 and errors["RESOURCE_EXHAUSTED"] == 0
    assert "--max-message-bytes" in got["error"]["message"]


def test_metrics_and_access_log(server, base_url, caplog) -> None:
    registry = server.app.metrics.registry

    def count(rpc: str, code: str, model: str = "lstm") -> float:
        labels = {"rpc": rpc, "model": model, "code": code}
        return registry.get_sample_value("rnnserve_request_duration_seconds_count", labels) or 0

    ok, bad = count("openai.Completions", "OK"), count("openai.Completions", "INVALID_ARGUMENT")
    infer = count("kserve.ModelInfer", "OK")
    errors = (
        registry.get_sample_value(
            "rnnserve_errors_total", {"rpc": "openai.Completions", "code": "INVALID_ARGUMENT"}
        )
        or 0
    )
    with caplog.at_level(logging.INFO, logger="rnnserve.server.access"):
        assert request(base_url + "/v1/completions", {"model": "lstm", "prompt": "ab"})[0] == 200
        assert (
            request(base_url + "/v1/completions", {"model": "lstm", "prompt": "a", "n": 2})[0]
            == 400
        )
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}]}
        assert request(base_url + "/v2/models/lstm/infer", body)[0] == 200
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if hasattr(r, "rpc")]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert count("openai.Completions", "OK") == ok + 1
    assert count("openai.Completions", "INVALID_ARGUMENT") == bad + 1
    assert count("kserve.ModelInfer", "OK") == infer + 1
    after = registry.get_sample_value(
        "rnnserve_errors_total", {"rpc": "openai.Completions", "code": "INVALID_ARGUMENT"}
    )
    assert after == errors + 1
    lines = [(r.rpc, r.code) for r in caplog.records if hasattr(r, "rpc")]
    assert ("openai.Completions", "OK") in lines
    assert ("openai.Completions", "INVALID_ARGUMENT") in lines
    assert ("kserve.ModelInfer", "OK") in lines


def test_a_malformed_request_is_one_info_line_not_an_error_traceback(
    server, base_url, caplog
) -> None:
    """aiohttp answers a request it cannot parse 400 but logged an ERROR with a traceback:
    a port scanner would page an operator. A handler's own failure stays an ERROR."""
    port = server.app.http.port
    bad = [
        b"GET /v1/models/ x HTTP/1.1\r\nHost: x\r\n\r\n",  # a space in the path
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 7\r\nConnection: close\r\n\r\nnot it!",
    ]
    with caplog.at_level(logging.INFO, logger="aiohttp.server"):
        for data in bad:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(data)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            assert reply.split(b"\r\n", 1)[0].split()[1] == b"400", reply[:200]
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if r.name == "aiohttp.server"]) < len(bad):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    logged = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in logged), logged
    assert any("Can not decode content-encoding: gzip" in r.getMessage() for r in logged)


def test_more_prompts_than_max_streams_is_a_400_not_a_429(model_repo: Path) -> None:
    """The prompts of one request run as streams together: past --max-streams they are never
    admitted, so "429 retry later" sent clients retrying forever."""
    srv = http_server(model_repo, max_streams=2)
    try:
        url = f"http://127.0.0.1:{srv.app.http.port}/v1/completions"
        for stream in (False, True):
            body = {"model": "lstm", "prompt": ["a", "b", "c"], "max_tokens": 2, "stream": stream}
            status, got = request(url, body)
            assert status == 400 and got["error"]["param"] == "prompt", got
            assert "--max-streams" in got["error"]["message"]
        assert request(url, {"model": "lstm", "prompt": ["a", "b"], "max_tokens": 2})[0] == 200
    finally:
        srv.stop()


def test_prompts_without_room_for_all_are_refused_before_any_starts(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request's prompts are admitted together or not at all: with one stream live and
    --max-streams 3, three prompts are a 429 with none of their streams started (they used to
    start two, prefill them and cancel them)."""
    from rnnserve.v1 import rnnserve_pb2 as pb

    srv = http_server(model_repo, max_streams=3, max_tokens=60_000)
    engine = srv.app.engine
    started: list[str] = []
    generate = engine.generate

    def recording(model, version, params, deadline):
        started.append(params.prompt)
        return generate(model, version, params, deadline)

    try:
        url = f"http://127.0.0.1:{srv.app.http.port}/v1/completions"
        live = srv.stub.Generate(
            pb.GenerateRequest(model="lstm", prompt="the", max_tokens=60_000), timeout=60
        )
        next(live)  # admitted: one stream holds a slot
        monkeypatch.setattr(engine, "generate", recording)
        for stream in (False, True):
            body = {"model": "lstm", "prompt": ["a", "b", "c"], "max_tokens": 2, "stream": stream}
            status, got = request(url, body)
            assert status == 429 and "--max-streams" in got["error"]["message"], got
        assert started == []
        body = {"model": "lstm", "prompt": ["a", "b"], "max_tokens": 2}
        assert request(url, body)[0] == 200  # room for two
        live.cancel()
    finally:
        srv.stop()


def test_ready_follows_grpc_health_through_a_drain(model_repo: Path) -> None:
    """SIGTERM's path (App.shutdown): /v2/health/ready, KServe ServerReady and grpc.health.v1
    turn not-ready together while calls are still taken (--drain-delay), then the port closes."""
    srv = http_server(model_repo)
    base = f"http://127.0.0.1:{srv.app.http.port}"
    health = health_pb2_grpc.HealthStub(srv.channel)
    kserve = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
    try:
        assert request(base + "/v2/health/ready") == (200, {"ready": True})
        assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        done = asyncio.run_coroutine_threadsafe(srv.app.shutdown(grace=1.0, delay=3.0), srv.loop)
        deadline = time.monotonic() + 3
        while request(base + "/v2/health/ready")[0] == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert request(base + "/v2/health/ready") == (503, {"ready": False})
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
        assert request(base + "/v2/models/lstm/ready")[0] == 400
        # still taking calls during the drain delay
        body = {"model": "lstm", "prompt": "ab", "max_tokens": 2}
        assert request(base + "/v1/completions", body)[0] == 200
        done.result(30)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(base + "/v2/health/live", timeout=5)
    finally:
        srv.app = None  # already shut down
        srv.stop()


def test_client_going_away_ends_its_stream(server, base_url) -> None:
    """A disconnected SSE client frees its decode slot (aiohttp cancels the handler)."""
    import http.client

    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    # greedy: a sampled stream may draw <eos> (p ~ 1e-3 a token on the tiny model) and end
    # on its own before the client leaves; the greedy path never reaches it
    body = {
        "model": "lstm",
        "prompt": "the",
        "max_tokens": 150_000,
        "stream": True,
        "temperature": 0,
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    limiter = server.app.engine.limiter
    assert server.call(lambda: limiter.active) >= 1
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 10
    while server.call(lambda: limiter.active) != 0:
        assert time.monotonic() < deadline, "the stream kept running after its client left"
        time.sleep(0.05)


def test_http_spans_are_named_after_the_route_not_the_clients_path(model_repo: Path) -> None:
    """A span name is an index in tracing backends: the model name a client puts in the path
    must not become one (the gRPC path names spans after the method the same way)."""
    sdk_trace = need_module("opentelemetry.sdk.trace", "pip install 'rnnserve[otel]'")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    class TracedServer(ServerThread):
        def start(self) -> TracedServer:
            self._thread.start()

            async def boot():
                app = build_app(self.settings, tracer_provider=provider)
                await app.start()
                return app

            self.app = self.run(boot())
            self.channel = grpc.insecure_channel(f"localhost:{self.app.port}")
            return self

    srv = TracedServer(make_settings(model_repo, http_port=free_port())).start()
    try:
        base = f"http://127.0.0.1:{srv.app.http.port}"
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ab"]}]}
        assert request(base + "/v2/models/client-chosen-1/infer", body)[0] == 404
        assert request(base + "/v2/models/lstm/versions/7/infer", body)[0] == 404
        assert request(base + "/v2/models/anything-2")[0] == 404
        assert request(base + "/v1/models/anything-3")[0] == 404
        assert request(base + "/v1/completions", {"model": "lstm", "prompt": "a"})[0] == 200
        spans = exporter.get_finished_spans()
        names = sorted(s.name for s in spans)
        assert names == [
            "/v1/completions",
            "/v1/models/{model}",
            "/v2/models/{name}",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer",
        ]
        by_name = {s.name: s for s in spans}
        infer = by_name["/v2/models/{name}/infer"]
        assert infer.attributes["http.route"] == "/v2/models/{name}/infer"
        assert infer.attributes["url.path"] == "/v2/models/client-chosen-1/infer"
    finally:
        srv.stop()


class _CannotOpen:
    """A decode process as health sees it (--decode-process 1) when no child can open the
    model: tests/integration/server/test_decode_process.py makes real ones fail."""

    def __init__(self, name: str, model: object) -> None:
        self.name, self.model, self.cannot_open = name, model, True


def test_a_version_no_decode_process_can_open_is_not_ready_on_any_protocol(
    model_repo: Path,
) -> None:
    """grpc.health.v1 says NOT_SERVING for it: KServe ModelReady (gRPC and REST), the native
    GetModel/ListModels status and /v1/models must not say it serves."""
    from rnnserve.v1 import rnnserve_pb2 as pb

    srv = http_server(model_repo)
    base = f"http://127.0.0.1:{srv.app.http.port}"
    kserve = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
    health = srv.app.health
    entry = srv.app.engine.repository.default_version("lstm")
    try:
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="lstm"), timeout=10).ready
        health.decoders = lambda: [_CannotOpen("lstm", entry.model)]
        srv.run(health.refresh())
        check = health_pb2.HealthCheckRequest(service="lstm")
        status = health_pb2_grpc.HealthStub(srv.channel).Check(check, timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        for version in ("", entry.version):
            ask = kpb.ModelReadyRequest(name="lstm", version=version)
            assert not kserve.ModelReady(ask, timeout=10).ready
        assert request(base + "/v2/models/lstm/ready")[0] == 400
        assert request(base + f"/v2/models/lstm/versions/{entry.version}/ready")[0] == 400
        assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready  # others serve
        info = srv.stub.GetModel(pb.GetModelRequest(model="lstm"), timeout=10)
        (version,) = [v for v in info.versions if v.version == entry.version]
        assert version.status == "NOT_SERVING" and "decode process" in version.status_reason
        listed = srv.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        (model,) = [m for m in listed.models if m.name == "lstm"]
        assert [v.status for v in model.versions if v.version == entry.version] == ["NOT_SERVING"]
        status_, got = request(base + "/v1/models")
        names = [m["id"] for m in got["data"]]
        assert status_ == 200 and "lstm" not in names and "gru" in names
        status_, got = request(base + "/v1/models/lstm")
        assert status_ == 503 and "decode process" in got["error"]["message"]
        health.decoders = lambda: []  # a child opened it: everything says so again
        srv.run(health.refresh())
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="lstm"), timeout=10).ready
        assert request(base + "/v2/models/lstm/ready")[0] == 200
        info = srv.stub.GetModel(pb.GetModelRequest(model="lstm"), timeout=10)
        assert {v.status for v in info.versions} == {"SERVING"}
        assert "lstm" in [m["id"] for m in request(base + "/v1/models")[1]["data"]]
    finally:
        srv.stop()


def _http_status(url: str, authorizations: list[str], body: object | None = None) -> int:
    """The status of a request that carries each of `authorizations` as its own header."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST" if body is not None else "GET", parts.path)
        data = json.dumps(body).encode() if body is not None else b""
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        for value in authorizations:
            conn.putheader("Authorization", value)
        conn.endheaders(data)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


@pytest.mark.parametrize(
    "values,ok",
    [
        ([f"Bearer {TOKEN}", "Bearer wrong"], False),
        (["Bearer wrong", f"Bearer {TOKEN}"], False),  # order must not decide
        ([f"Bearer {TOKEN}", "Basic abc"], False),
        ([f"Bearer {TOKEN}", f"Bearer {TOKEN}"], True),  # the same token twice: one token
    ],
)
def test_several_authorization_values_are_judged_the_same_on_every_path(
    guarded: GuardedServer, values: list[str], ok: bool
) -> None:
    """Refused unless they are all the same valid token: gRPC, KServe gRPC (a call and a
    probe under --auth-health) and HTTP (OpenAI, KServe REST, a probe) alike."""
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    metadata = tuple(("authorization", v) for v in values)
    native = pb_grpc.InferenceStub(guarded.channel)
    kserve = kpb_grpc.GRPCInferenceServiceStub(guarded.channel)
    health = health_pb2_grpc.HealthStub(guarded.channel)
    calls = [
        lambda: native.Score(
            pb.ScoreRequest(model="lstm", texts=["ab"]), metadata=metadata, timeout=30
        ),
        lambda: kserve.ServerMetadata(kpb.ServerMetadataRequest(), metadata=metadata, timeout=30),
        lambda: kserve.ServerReady(kpb.ServerReadyRequest(), metadata=metadata, timeout=30),
        lambda: health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30),
    ]
    for call in calls:
        if ok:
            call()
        else:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    base = f"http://127.0.0.1:{guarded.app.http.port}"
    body = {"model": "lstm", "prompt": "the", "max_tokens": 2}
    expected = 200 if ok else 401
    assert _http_status(base + "/v1/completions", values, body) == expected
    assert _http_status(base + "/v2", values) == expected
    assert _http_status(base + "/v2/health/ready", values) == expected


def test_a_stalled_body_is_a_408_and_an_idle_connection_is_closed(
    model_repo: Path, monkeypatch
) -> None:
    """A client that sent 1 of a promised 100 body bytes held its connection and handler for
    good, and one that never sent a request stayed an hour (aiohttp's keep-alive default):
    slowloris connections piled up towards the file limit the gRPC port shares."""
    from rnnserve.server.http import app as app_module
    from rnnserve.server.http import calls

    monkeypatch.setattr(calls, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(app_module, "IDLE_TIMEOUT_S", 1.0)
    srv = http_server(model_repo)
    try:
        port = srv.app.http.port
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            reply = b""
            while b"did not arrive" not in reply and (chunk := sock.recv(65536)):
                reply += chunk  # (the server then lingers a while for the rest before closing)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split()[1] == b"408", reply[:300]
        assert b"did not arrive within 0.5 s" in body
        assert b'"code": "cancelled"' in body  # not DEADLINE_EXCEEDED: the server was not slow
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            assert idle.recv(1) == b""  # closed by the server, before the socket's own timeout
    finally:
        srv.stop()
