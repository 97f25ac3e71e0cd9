"""A span per RPC, continuing the caller's W3C traceparent, with the stream's events, and the
trace id in the access log line: a real in-process server traced into the SDK's in-memory
exporter. (tests/e2e/test_tracing_otlp.py does the same through a real OTLP receiver.)"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path

import grpc
import pytest

from rnnserve.server import logs, tracing
from rnnserve.server.main import build_app
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.tools import need_module

sdk_trace = need_module("opentelemetry.sdk.trace", "pip install 'rnnserve[otel]'")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class TracedServer(ServerThread):
    """ServerThread whose app traces into `exporter`."""

    def __init__(self, settings, exporter: InMemorySpanExporter) -> None:
        super().__init__(settings)
        self.provider = sdk_trace.TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(exporter))

    def start(self) -> TracedServer:
        provider = self.provider

        async def boot():
            app = build_app(self.settings, tracer_provider=provider)
            await app.start()
            return app

        self._thread.start()
        self.app = self.run(boot())
        self.channel = grpc.insecure_channel(f"localhost:{self.app.port}")
        from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

        self.stub = pb_grpc.InferenceStub(self.channel)
        return self


@pytest.fixture()
def traced(model_repo: Path):
    exporter = InMemorySpanExporter()
    server = TracedServer(make_settings(model_repo), exporter).start()
    access = logging.getLogger("rnnserve.server.access")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        yield server, exporter, out
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
        server.stop()


def test_generate_span_continues_the_callers_trace(traced) -> None:
    server, exporter, out = traced
    replies = list(
        server.stub.Generate(
            pb.GenerateRequest(model="lstm", prompt="the ", max_tokens=4),
            metadata=[("traceparent", TRACEPARENT), ("x-request-id", "req-1")],
            timeout=30,
        )
    )
    assert replies[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    (span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/Generate")]
    assert span.name == "rnnserve.v1.Inference/Generate"
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    attrs = span.attributes
    assert (attrs["rpc.system"], attrs["rpc.method"]) == ("grpc", "Generate")
    assert attrs["rpc.grpc.status_code"] == 0 and attrs["rnnserve.model"] == "lstm"
    assert attrs["rnnserve.request_id"] == "req-1"
    names = [e.name for e in span.events]
    assert names == ["admitted", "first_token", "finish"]
    assert span.events[-1].attributes["finish_reason"] in {"length", "stop", "eos"}
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (line,) = [x for x in lines if x.get("request_id") == "req-1"]
    assert line["trace_id"] == TRACE_ID
    assert line["pid"] == os.getpid()  # which process wrote it (--workers, decode children)


def test_without_traceparent_a_new_trace_starts_and_errors_are_marked(traced) -> None:
    server, exporter, _ = traced
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Score(pb.ScoreRequest(model="no-such-model", texts=["a"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/Score")]
    assert span.parent is None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code == StatusCode.UNSET, "the caller's mistake, not an error"


def test_engine_events_reach_the_rpc_span(traced) -> None:
    """What the engine calls (tracing.event / current_span) lands on the call's span."""
    server, exporter, _ = traced
    tracer = server.app.tracer

    async def call() -> None:
        rpc = tracer.start("/rnnserve.v1.Inference/Generate", {}, "rid")
        tracing.event("admitted", {"queue": 0})
        later = tracing.current_span()
        await asyncio.sleep(0)
        later.add_event("prefill")
        rpc.finish(grpc.StatusCode.INTERNAL, "lstm", "boom")

    server.run(call())
    spans = exporter.get_finished_spans()
    (span,) = [s for s in spans if s.attributes["rnnserve.request_id"] == "rid"]
    assert [e.name for e in span.events] == ["admitted", "prefill"]
    assert span.status.status_code == StatusCode.ERROR


def test_http_paths_get_their_own_span_name_and_the_headers_traceparent(traced) -> None:
    """The HTTP port runs requests through the same interceptor steps with its headers."""
    server, exporter, _ = traced
    headers = {"traceparent": TRACEPARENT, "content-type": "application/json"}

    async def call() -> None:
        server.app.tracer.start("/v1/completions", headers, "http-1").finish(
            grpc.StatusCode.OK, "lstm", ""
        )

    server.run(call())
    spans = exporter.get_finished_spans()
    (span,) = [s for s in spans if s.attributes["rnnserve.request_id"] == "http-1"]
    assert span.name == "/v1/completions" and span.attributes["url.path"] == "/v1/completions"
    assert "rpc.system" not in span.attributes
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_without_an_endpoint_nothing_is_traced(tmp_path: Path) -> None:
    server = ServerThread(make_settings(tmp_path, allow_empty_repo=1)).start()
    try:
        assert server.app.tracer is None
        assert server.app.settings.otlp_endpoint == ""
    finally:
        server.stop()
    assert tracing.NO_SPAN.is_recording() is False
    assert tracing.NO_SPAN.add_event("x") is None


def test_shutdown_gives_up_on_a_flush_that_does_not_end() -> None:
    """An unreachable collector keeps the SDK's shutdown retrying for up to 30 s; the
    server's flush returns after its timeout instead, so SIGTERM stays within --grace."""
    import threading
    import time

    from opentelemetry.sdk.trace import SpanProcessor

    release = threading.Event()

    class Stuck(SpanProcessor):
        def shutdown(self) -> None:
            release.wait(30)

    provider = sdk_trace.TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(Stuck())
    tracer = tracing.RpcTracer(provider)
    started = time.monotonic()
    try:
        assert tracer.shutdown(timeout_s=0.2) is False
        assert time.monotonic() - started < 5
    finally:
        release.set()
    quick = sdk_trace.TracerProvider(shutdown_on_exit=False)
    assert tracing.RpcTracer(quick).shutdown(timeout_s=5) is True
