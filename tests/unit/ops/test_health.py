"""Overall health is honest: NOT_SERVING while no model version serves (unless
--allow-empty-repo), re-evaluated on reload; the metrics port answers /metrics, /healthz and
/readyz and 404 elsewhere. Real in-process servers, real HTTP."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.server.health import ModelHealth, overall_serving
from rnnserve.server.metrics import Metrics, loop_answers, serve_http
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.tools import has_ipv6_loopback

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "any_serving,allow_empty,models,expected",
    [
        (True, False, 3, True),
        (False, False, 0, False),  # empty repository
        (False, False, 1, False),  # only a broken model
        (False, True, 0, True),  # bootstrapping allowed
        (False, True, 1, False),  # allowed empty, but a model that is there must serve
    ],
)
def test_overall_verdict(any_serving: bool, allow_empty: bool, models: int, expected) -> None:
    assert overall_serving(any_serving, allow_empty, models) is expected


def _status(server: ServerThread, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _start(repo: Path, **overrides) -> ServerThread:
    return ServerThread(make_settings(repo, **overrides)).start()


def test_empty_repository_is_not_serving_until_a_model_loads(
    model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    srv = _start(repo)
    try:
        assert _status(srv, "") == NOT_SERVING
        assert _status(srv, "rnnserve.v1.Inference") == NOT_SERVING
        assert _status(srv, "rnnserve.v1.Admin") == SERVING, "Admin is how it gets fixed"
        assert srv.app.health.ready is False
        assert srv.app.metrics.registry.get_sample_value("rnnserve_ready") == 0
        shutil.copytree(model_repo / "lstm", repo / "lstm")
        srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        assert _status(srv, "") == SERVING
        assert _status(srv, "lstm") == SERVING
        assert srv.app.metrics.registry.get_sample_value("rnnserve_ready") == 1
        shutil.rmtree(repo / "lstm")
        srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        assert _status(srv, "") == NOT_SERVING, "re-evaluated when the last model goes"
    finally:
        srv.stop()


def test_allow_empty_repo_serves_an_empty_repository(tmp_path: Path) -> None:
    srv = _start(tmp_path, allow_empty_repo=1)
    try:
        assert _status(srv, "") == SERVING
        assert srv.app.health.ready is True
    finally:
        srv.stop()


def test_a_repository_whose_only_model_is_broken_is_not_serving(
    model_repo: Path, tmp_path: Path
) -> None:
    shutil.copytree(model_repo / "lstm", tmp_path / "lstm")
    (tmp_path / "lstm" / "1" / "model.onnx").write_bytes(b"not onnx")
    srv = _start(tmp_path, allow_empty_repo=1)  # not empty: the flag does not apply
    try:
        assert _status(srv, "lstm") == NOT_SERVING
        assert _status(srv, "") == NOT_SERVING
    finally:
        srv.stop()


def test_shutdown_makes_ready_false(model_repo: Path) -> None:
    srv = _start(model_repo)
    try:
        assert srv.app.health.ready is True
        srv.run(srv.app.health.shutdown())
        assert srv.app.health.ready is False
        assert srv.app.metrics.registry.get_sample_value("rnnserve_ready") == 0
    finally:
        srv.stop()


def _get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_port_serves_metrics_health_and_readiness_only() -> None:
    metrics = Metrics()
    ready = {"now": False}
    http = serve_http(metrics.registry, 0, lambda: ready["now"], addr="127.0.0.1")
    port = http.server_port
    try:
        status, body = _get(port, "/metrics")
        assert status == 200 and "# TYPE rnnserve_request_duration_seconds histogram" in body
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/readyz")[0] == 503
        ready["now"] = True
        assert _get(port, "/readyz")[0] == 200
        for path in ("/", "/anything", "/metrics/", "/metricsx", "/healthz/x"):
            status, body = _get(port, path)
            assert status == 404, path
            assert "rnnserve_" not in body
    finally:
        http.shutdown()
        http.server_close()


def test_metrics_port_answers_on_ipv4_and_ipv6() -> None:
    """By default the probes' port listens on every address of both stacks, like the gRPC
    port's "[::]": an IPv6-only cluster's kubelet reaches /healthz as an IPv4 one does."""
    http = serve_http(Metrics().registry, 0, lambda: True)
    port = http.server_port
    try:
        assert _get(port, "/healthz") == (200, "ok\n")
        if has_ipv6_loopback():
            assert _get(port, "/readyz", host="[::1]") == (200, "ready\n")
    finally:
        http.shutdown()
        http.server_close()


def test_metrics_port_falls_back_to_ipv4_where_the_host_has_no_ipv6(monkeypatch) -> None:
    import errno

    from rnnserve.server import metrics as metrics_module

    def no_ipv6(self) -> None:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(metrics_module._IPv6WSGIServer, "server_bind", no_ipv6)
    http = serve_http(Metrics().registry, 0, lambda: False)
    try:
        assert http.socket.family == socket.AF_INET
        assert _get(http.server_port, "/readyz")[0] == 503
    finally:
        http.shutdown()
        http.server_close()


class _Decoder:
    """A decode process as health sees it; starting a new one fails (e.g. out of fds)."""

    def __init__(self, name: str, model: object) -> None:
        self.name, self.model, self.cannot_open, self.retries = name, model, False, 0

    def retry_open(self) -> None:
        self.retries += 1
        raise OSError(24, "Too many open files")


def test_recheck_follows_a_decoder_that_cannot_open_and_outlives_a_failed_retry(
    tmp_path: Path,
) -> None:
    """The server's once-a-second loop calls recheck: an error there must not end it."""
    model = object()
    repository = Repository(tmp_path, loader=lambda path, manifest: model)
    repository.models = {"m": {"1": ModelVersion("m", "1", tmp_path, model=model)}}
    decoder = _Decoder("m", model)
    seen: list[tuple[str, bool]] = []

    async def run() -> None:
        health = ModelHealth(
            repository,
            decoders=lambda: [decoder],
            on_version=lambda entry, serving: seen.append((entry.version, serving)),
        )
        await health.refresh()
        assert health.ready
        decoder.cannot_open = True
        await health.recheck()
        assert decoder.retries == 1 and not health.ready
        check = health_pb2.HealthCheckRequest(service="m")
        assert (await health.servicer.Check(check, None)).status == NOT_SERVING
        decoder.cannot_open = False
        await health.recheck()
        assert decoder.retries == 1 and health.ready

    asyncio.run(run())
    assert seen == [("1", False), ("1", True)]


def test_a_failing_sample_does_not_end_the_gauges_or_the_rechecks(caplog) -> None:
    """The loop that samples the gauges and rechecks decode processes died with the first
    exception either raised: gauges froze and a NOT_SERVING version was never retried."""
    import asyncio
    from types import SimpleNamespace

    from rnnserve.server.main import App

    passes = []

    class Metrics:
        loop_heartbeat = SimpleNamespace(set=lambda value: None)

        def sample(self) -> None:
            passes.append("sample")
            if len(passes) == 1:
                raise RuntimeError("a gauge callback failed")

    class Health:
        async def recheck(self) -> None:
            passes.append("recheck")

    app = SimpleNamespace(metrics=Metrics(), health=Health())

    async def main() -> None:
        task = asyncio.ensure_future(App._sample_metrics(app, period_s=0))  # type: ignore[arg-type]
        for _ in range(1000):  # bounded: a loop that died must fail the test, not hang it
            if passes.count("recheck") >= 2:
                break
            await asyncio.sleep(0)
        task.cancel()

    asyncio.run(main())
    assert passes.count("recheck") >= 2, passes
    assert "a gauge callback failed" in caplog.text


def test_overall_health_is_not_serving_before_the_first_refresh(tmp_path: Path) -> None:
    """The gRPC port opens before health's first refresh (App.start): grpc's servicer starts
    "" as SERVING, so a probe in between passed a replica with no model it could serve."""

    async def run() -> int:
        health = ModelHealth(Repository(tmp_path, loader=lambda path, manifest: object()))
        check = health_pb2.HealthCheckRequest(service="")
        return (await health.servicer.Check(check, None)).status

    assert asyncio.run(run()) == NOT_SERVING


def test_healthz_fails_while_the_event_loop_is_wedged() -> None:
    """Liveness asks the event loop that serves the calls, not just the metrics thread: a
    loop blocked by a handler (or closed) is 503, so Kubernetes restarts the replica."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    http = serve_http(
        Metrics().registry, 0, lambda: True, addr="127.0.0.1", alive=loop_answers(loop, 0.5)
    )
    release = threading.Event()
    try:
        assert _get(http.server_port, "/healthz") == (200, "ok\n")
        loop.call_soon_threadsafe(release.wait, 30)  # wedges the loop until released
        status, body = _get(http.server_port, "/healthz")
        assert status == 503 and "event loop" in body
        assert _get(http.server_port, "/readyz")[0] == 200  # readiness is another question
        release.set()
        assert _get(http.server_port, "/healthz") == (200, "ok\n")
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
        assert _get(http.server_port, "/healthz")[0] == 503
    finally:
        release.set()
        http.shutdown()
        http.server_close()
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)


def test_the_workers_liveness_reads_the_oldest_heartbeat() -> None:
    """Under --workers the parent's /healthz reads the merged heartbeat gauge (the oldest
    worker's, livemin): fresh passes, stale fails, 0 (a worker still starting) passes."""
    from rnnserve.server.metrics import HEARTBEAT_STALE_S, heartbeats_fresh

    metrics = Metrics()
    assert heartbeats_fresh(metrics.registry, 1000.0)  # 0: not beaten yet
    metrics.loop_heartbeat.set(1000.0)
    assert heartbeats_fresh(metrics.registry, 1000.0 + HEARTBEAT_STALE_S - 1)
    assert not heartbeats_fresh(metrics.registry, 1000.0 + HEARTBEAT_STALE_S + 1)
