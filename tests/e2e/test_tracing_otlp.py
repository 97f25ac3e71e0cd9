"""Tracing end to end: a real `rnn-server --otlp-endpoint` process exports its spans over
OTLP/gRPC to a collector's TraceService (opentelemetry-proto's, served by this test); the
span continues the client's W3C traceparent (gRPC metadata, and an HTTP header on the HTTP
port) and the JSON access line carries its trace id."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.e2e.processes import reap, stop_gracefully
from tests.tools import need_module

collector = need_module(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
    "pip install 'rnnserve[otel]'",
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
WAIT_S = 60.0  # bounds, not speed assertions
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
HTTP_TRACE_ID = "5b8aa5a2d2c872e8321cf37308d69df2"


class Receiver(collector.TraceServiceServicer):
    """The collector side of OTLP/gRPC: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, object]] = []  # (resource attributes, span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((resource, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, suffix: str) -> list[tuple[dict, object]]:
        with self.lock:
            return [(r, s) for r, s in self.spans if s.name.endswith(suffix)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, probe, proc: subprocess.Popen, log: Path):
    end = time.monotonic() + WAIT_S
    while not (result := probe()):
        assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"gave up waiting: {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return result


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_spans_reach_a_real_otlp_receiver(model_repo: Path, tmp_path: Path) -> None:
    receiver = Receiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    collector.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    port, http_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", "2",
           "--http-port", str(http_port),
           "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}"]  # fmt: skip
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "rnnserve-e2e"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait("server SERVING", lambda: _serving(address), proc, log)
        with grpc.insecure_channel(address) as ch:
            replies = list(
                pb_grpc.InferenceStub(ch).Generate(
                    pb.GenerateRequest(model="lstm", prompt="the ", max_tokens=4),
                    metadata=[
                        ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
                        ("x-request-id", "otlp-e2e"),
                    ],
                    timeout=30,
                )
            )
        assert replies[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        # exported by the batch processor while the server runs, not only at shutdown
        ((resource, span),) = _wait(
            "the Generate span at the receiver", lambda: receiver.named("/Generate"), proc, log
        )
        assert span.name == "rnnserve.v1.Inference/Generate"
        assert span.trace_id.hex() == TRACE_ID
        assert span.parent_span_id.hex() == PARENT_ID
        assert resource["service.name"] == "rnnserve-e2e"
        events = [e.name for e in span.events]
        assert "first_token" in events and events[-1] == "finish"
        ask = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/models",
            headers={"traceparent": f"00-{HTTP_TRACE_ID}-{PARENT_ID}-01"},
        )
        with urllib.request.urlopen(ask, timeout=30) as reply:
            assert reply.status == 200
        ((_, http_span),) = _wait(
            "the HTTP span at the receiver", lambda: receiver.named("/v1/models"), proc, log
        )
        assert http_span.trace_id.hex() == HTTP_TRACE_ID
        stop_gracefully(proc, timeout=40)
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        (access,) = [x for x in lines if x.get("request_id") == "otlp-e2e"]
        assert access["trace_id"] == TRACE_ID
    finally:
        reap(proc)
        otlp.stop(0)


def test_otlp_endpoint_without_the_packages_is_a_clear_error(tmp_path: Path) -> None:
    """Simulates a serve-only install: OpenTelemetry hidden from the import system."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "opentelemetry.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(hide)}
    done = subprocess.run(
        [str(BIN / "rnn-server"), "--model-repo", str(tmp_path), "--port", "0",
         "--metrics-port", "0", "--otlp-endpoint", "http://127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "rnnserve[otel]" in done.stderr


def test_sigterm_does_not_wait_for_an_unreachable_collector(
    model_repo: Path, tmp_path: Path
) -> None:
    """A collector that is down must not hold a stopping server past --grace: the SDK's own
    shutdown retries every pending batch for up to 30 s (10 s each, one span per batch
    here); the server gives the flush FLUSH_TIMEOUT_S and exits 0."""
    from rnnserve.server.tracing import FLUSH_TIMEOUT_S

    port, closed = _free_port(), _free_port()  # nothing listens on `closed`
    address = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    grace = 1.0
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", str(grace),
           "--otlp-endpoint", f"http://127.0.0.1:{closed}"]  # fmt: skip
    env = {**os.environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait("server SERVING", lambda: _serving(address), proc, log)
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for _ in range(4):  # four spans: four batches the exporter cannot deliver
                stub.ListModels(pb.ListModelsRequest(), timeout=30)
        started = time.monotonic()
        # old code: 30 s (the SDK's shutdown timeout); bound: grace + flush + start-up slack
        stop_gracefully(proc, timeout=grace + FLUSH_TIMEOUT_S + 8)
        assert time.monotonic() - started < grace + FLUSH_TIMEOUT_S + 8
        assert "spans not exported" in log.read_text()
    finally:
        reap(proc)
