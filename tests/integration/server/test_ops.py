"""Health, reflection, metrics, admission limits, broken packages, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.integration.server.harness import ServerThread, make_settings
from tests.tools import need_module

METRICS = [
    "rnnserve_request_duration_seconds", "rnnserve_time_to_first_token_seconds",
    "rnnserve_inter_token_latency_seconds", "rnnserve_generated_tokens_total",
    "rnnserve_live_streams", "rnnserve_batch_size", "rnnserve_step_duration_seconds",
    "rnnserve_queue_wait_seconds", "rnnserve_model_load_seconds", "rnnserve_errors_total",
    "rnnserve_model_serving",
]  # fmt: skip


def _health(server: ServerThread, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service)).status


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_health_bytes_that_are_no_message_are_invalid_argument(server, method: str) -> None:
    """A probe whose bytes were no HealthCheckRequest got UNKNOWN, and a DecodeError
    traceback was logged for each one."""
    path = f"/grpc.health.v1.Health/{method}"
    if method == "Check":
        call = server.channel.unary_unary(path)
    else:
        call = lambda data, timeout: list(server.channel.unary_stream(path)(data, timeout=timeout))  # noqa: E731
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x05hel", timeout=30)  # a string field cut short
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in err.value.details()
    assert _health(server, "") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_bytes_that_are_no_message_are_invalid_argument(server, caplog) -> None:
    """Health answered such bytes INVALID_ARGUMENT, but reflection, which grpcurl and scanners
    call as freely, still answered UNKNOWN and logged a DecodeError traceback per call."""
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    call = server.channel.stream_stream(path)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\x0a\x05hel"]), timeout=30))  # a string field cut short
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in err.value.details()
    assert "Traceback" not in caplog.text
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    [answer] = list(stub.ServerReflectionInfo(iter([ask]), timeout=30))
    assert answer.list_services_response.service


def test_health_overall_and_per_model(server) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(server, "") == serving
    assert _health(server, "rnnserve.v1.Inference") == serving
    assert _health(server, "lstm") == serving


def test_reflection_lists_the_services(server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([req])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"rnnserve.v1.Inference", "grpc.health.v1.Health"} <= names


def test_metrics_have_the_contract_names_and_labels(server) -> None:
    from prometheus_client import generate_latest

    stub = server.stub
    list(stub.Generate(pb.GenerateRequest(model="lstm", prompt="the ", max_tokens=3)))
    with pytest.raises(grpc.RpcError):
        stub.Score(pb.ScoreRequest(model="lstm", texts=[]))
    text = generate_latest(server.app.metrics.registry).decode()
    for name in METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    reg = server.app.metrics.registry
    ok = {"rpc": "Generate", "model": "lstm", "code": "OK"}
    assert reg.get_sample_value("rnnserve_request_duration_seconds_count", ok) >= 1
    assert (
        reg.get_sample_value("rnnserve_errors_total", {"rpc": "Score", "code": "INVALID_ARGUMENT"})
        >= 1
    )
    assert reg.get_sample_value("rnnserve_model_serving", {"model": "lstm", "version": "1"}) == 1
    # unknown model names collapse into one label value (bounded cardinality)
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Score(pb.ScoreRequest(model="no-such-model-xyz", texts=["ab"]))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert 'model="no-such-model-xyz"' not in generate_latest(reg).decode()
    # a call that names no model is not counted as an unknown one
    stub.ListModels(pb.ListModelsRequest())
    listed = {"rpc": "ListModels", "model": "", "code": "OK"}
    assert reg.get_sample_value("rnnserve_request_duration_seconds_count", listed) >= 1


def test_streams_past_the_limit_are_refused_not_queued(model_repo: Path) -> None:
    srv = ServerThread(make_settings(model_repo, max_streams=1, max_tokens=200_000)).start()
    try:
        first = srv.stub.Generate(pb.GenerateRequest(model="lstm", prompt="a", max_tokens=150_000))
        next(first)
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Generate(pb.GenerateRequest(model="gru", prompt="a", max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()
    finally:
        srv.stop()


def test_broken_packages_are_not_serving_with_a_reason(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "lstm", repo / "lstm")
    shutil.copytree(model_repo / "gru" / "1", repo / "lstm" / "2")
    (repo / "lstm" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    shutil.copytree(model_repo / "rnn", repo / "rnn")
    (repo / "rnn" / "1" / "manifest.json").write_text('{"format_version": 99}')
    shutil.copytree(model_repo / "sine-gru", repo / "sine-gru")
    manifest = repo / "sine-gru" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["series"]["mean"] = float("nan")  # JSON as Python writes it: every Forecast would fail
    manifest.write_text(json.dumps(data))
    srv = ServerThread(make_settings(repo)).start()
    try:
        info = srv.stub.GetModel(pb.GetModelRequest(model="lstm"))
        assert info.default_version == "1"  # the highest SERVING version
        v2 = next(v for v in info.versions if v.version == "2")
        assert v2.status == "NOT_SERVING" and "sha256" in v2.status_reason
        bad = srv.stub.GetModel(pb.GetModelRequest(model="rnn")).versions[0]
        assert bad.status == "NOT_SERVING" and "format_version" in bad.status_reason
        nan = srv.stub.GetModel(pb.GetModelRequest(model="sine-gru")).versions[0]
        assert nan.status == "NOT_SERVING" and "series" in nan.status_reason
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Generate(pb.GenerateRequest(model="rnn", prompt="ab")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Generate(pb.GenerateRequest(model="lstm", version="2", prompt="ab")))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert list(srv.stub.Generate(pb.GenerateRequest(model="lstm", prompt="ab")))
        assert _health(srv, "rnn") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        srv.stop()


def test_reload_loads_new_and_unloads_removed_versions(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "gru", repo / "gru")
    srv = ServerThread(make_settings(repo)).start()
    try:
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / "2")
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert list(report.loaded) == ["gru/2"]
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).default_version == "2"
        reg = srv.app.metrics.registry
        labels = {"model": "gru", "version": "2"}
        assert reg.get_sample_value("rnnserve_model_serving", labels) == 1
        shutil.rmtree(repo / "gru" / "2")
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert list(report.unloaded) == ["gru/2"]
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).default_version == "1"
        assert reg.get_sample_value("rnnserve_model_serving", labels) is None  # series gone
    finally:
        srv.stop()


def test_a_removed_version_takes_no_new_stream_while_its_old_ones_drain(
    model_repo: Path, tmp_path: Path
) -> None:
    """Removal turns new calls away at once (NOT_FOUND); the streams already running drain on
    the old decode loop; nothing of the old version is left to serve a later version 2."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / version)
    srv = ServerThread(make_settings(repo)).start()
    engine = srv.app.engine
    try:
        request = pb.GenerateRequest(model="gru", version="2", prompt="ab", max_tokens=3)
        assert list(srv.stub.Generate(request))
        old = engine._decoders[("gru", "2")]
        srv.call(old.admit)  # stands in for a long stream in flight: the drain waits for it
        shutil.rmtree(repo / "gru" / "2")
        pending = srv.admin.ReloadModels.future(pb.ReloadModelsRequest(), timeout=30)
        listed, end = {"2"}, time.monotonic() + 30  # the rescan runs first, then the removal
        while "2" in listed and time.monotonic() < end:
            info = srv.stub.GetModel(pb.GetModelRequest(model="gru"))
            listed = {v.version for v in info.versions}
        assert "2" not in listed
        with pytest.raises(grpc.RpcError) as err:  # while version 2 drains
            list(srv.stub.Generate(request))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not pending.done()
        srv.call(old.release)  # the long stream ends
        assert list(pending.result().unloaded) == ["gru/2"]
        assert ("gru", "2") not in engine._decoders and ("gru", "2") not in engine._generators
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / "2")
        assert list(srv.admin.ReloadModels(pb.ReloadModelsRequest()).loaded) == ["gru/2"]
        assert list(srv.stub.Generate(request))
        fresh = engine.repository.get("gru", "2")
        assert engine._generators[("gru", "2")].entry is fresh
        assert engine._decoders[("gru", "2")] is not old
    finally:
        srv.stop()


def _removed_while_a_stream_runs(model_repo: Path, tmp_path: Path):
    """A server with gru versions 1 and 2, a stream admitted on 2 (held until released), and
    version 2's folder removed: returns the server, the repository and version 2's loop."""
    repo = tmp_path / "repo"
    for version in ("1", "2"):
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / version)
    srv = ServerThread(make_settings(repo)).start()
    request = pb.GenerateRequest(model="gru", version="2", prompt="ab", max_tokens=3)
    assert list(srv.stub.Generate(request))
    old = srv.app.engine._decoders[("gru", "2")]
    srv.call(old.admit)  # a long stream on version 2
    shutil.rmtree(repo / "gru" / "2")
    return srv, repo, old


def test_a_reload_is_not_held_up_by_a_removed_version_still_draining(
    model_repo: Path, tmp_path: Path
) -> None:
    """Rescans are one at a time, but the wait for a removed version's streams is not part
    of one: a version published meanwhile loads while the first reload is still waiting."""
    srv, repo, old = _removed_while_a_stream_runs(model_repo, tmp_path)
    try:
        pending = srv.admin.ReloadModels.future(pb.ReloadModelsRequest(), timeout=60)
        listed, end = {"2"}, time.monotonic() + 30  # its rescan is over: only the drain is left
        while "2" in listed and time.monotonic() < end:
            listed = {
                v.version for v in srv.stub.GetModel(pb.GetModelRequest(model="gru")).versions
            }
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / "3")
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=30)  # was: deadline
        assert list(report.loaded) == ["gru/3"]
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).default_version == "3"
        assert not pending.done(), "the first reload still waits for version 2's stream"
        srv.call(old.release)
        assert list(pending.result().unloaded) == ["gru/2"]
    finally:
        srv.stop()


def test_a_removed_version_closes_even_if_its_reload_call_gave_up(
    model_repo: Path, tmp_path: Path
) -> None:
    """The caller's deadline passes while version 2 drains: its decode loop must still close
    once the stream ends (it was popped from the engine: shutdown would never close it)."""
    srv, _repo, old = _removed_while_a_stream_runs(model_repo, tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as err:
            srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        end = time.monotonic() + 30  # the rescan goes on past the deadline: a bound, not a speed
        while ("gru", "2") in srv.call(lambda: dict(srv.app.engine._decoders)):
            assert time.monotonic() < end, "the rescan never removed version 2"
            time.sleep(0.05)
        srv.call(old.release)  # the stream ends
        end = time.monotonic() + 30
        while not srv.call(lambda: old._closed) and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.call(lambda: old._closed), "the removed version's decode threads live on"
    finally:
        srv.stop()


def test_shutdown_closes_a_removed_version_still_draining(model_repo: Path, tmp_path: Path) -> None:
    """SIGTERM while a removed version still waits for a stream: the engine no longer lists
    its decode loop, so shutdown must close it itself. A decode thread still stepping when the
    process exits aborted it (SIGABRT, exit 134, "terminate called without an active
    exception") instead of the documented exit 0."""
    srv, _repo, old = _removed_while_a_stream_runs(model_repo, tmp_path)
    pending = srv.admin.ReloadModels.future(pb.ReloadModelsRequest(), timeout=60)
    end = time.monotonic() + 30  # the rescan ran once the engine has let go of the loop
    while ("gru", "2") in srv.call(lambda: dict(srv.app.engine._decoders)):
        assert time.monotonic() < end, "the rescan never removed version 2"
        time.sleep(0.05)
    srv.run(srv.app.shutdown(grace=0.0, delay=0.0))  # the stream on version 2 never ended
    assert old._closed
    assert not any(t.is_alive() for t in old._threads), "a decode thread outlives the server"
    with contextlib.suppress(grpc.RpcError):
        pending.result(30)
    srv.app = None  # shut down already
    srv.stop()


def test_a_reload_whose_caller_gave_up_still_installs_what_it_loaded(
    model_repo: Path, tmp_path: Path
) -> None:
    """The caller's deadline passed while a new version loaded (a large model, or a URL
    repository's download: `rnn-client reload` waits 30 s): the rescan was cancelled, the
    model loaded in its thread and was thrown away, so no reload ever installed it."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "gru", repo / "gru")
    srv = ServerThread(make_settings(repo)).start()
    repository = srv.app.engine.repository
    load, gate, loads = repository._loader, threading.Event(), []

    def slow(path, manifest):
        loads.append(path)
        assert gate.wait(30), "the test never let the load finish"
        return load(path, manifest)

    repository._loader = slow
    try:
        shutil.copytree(model_repo / "gru" / "1", repo / "gru" / "2")
        with pytest.raises(grpc.RpcError) as err:
            srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        assert not report.loaded and not report.failed, "loaded by the first reload"
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).default_version == "2"
        assert len(loads) == 1, "loaded twice"
    finally:
        gate.set()
        srv.stop()


def test_a_broken_version_fixed_in_place_loads_on_the_next_reload(
    model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "gru", repo / "gru")
    good = (repo / "gru" / "1" / "manifest.json").read_text()
    (repo / "gru" / "1" / "manifest.json").write_text("{ broken")
    srv = ServerThread(make_settings(repo)).start()
    try:
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).versions[0].status == (
            "NOT_SERVING"
        )
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())  # unchanged: not retried
        assert not report.loaded and not report.failed
        (repo / "gru" / "1" / "manifest.json").write_text(good)
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert list(report.loaded) == ["gru/1"]
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).versions[0].status == "SERVING"
        assert list(srv.stub.Generate(pb.GenerateRequest(model="gru", prompt="ab")))
    finally:
        srv.stop()


def test_a_url_repository_sync_failure_is_in_the_reload_reply(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was only logged: `rnn-client reload` printed an empty reply while the sync failed."""
    fsspec = need_module("fsspec", "the [remote] extra")
    fs, root = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    for version in ("1", "2"):
        fs.put(str(model_repo / "gru" / "1"), f"{root}/gru/{version}", recursive=True)
    fs.rm(f"{root}/gru/2", recursive=True)  # published after the start
    srv = ServerThread(
        make_settings(f"memory://{root}", model_cache=str(tmp_path / "cache"))
    ).start()
    try:
        fs.put(str(model_repo / "gru" / "1"), f"{root}/gru/2", recursive=True)
        get_file = type(fs).get_file

        def refused(self, remote: str, local: str, *args, **kwargs):
            if "/gru/2/" in remote:
                raise OSError("503 Service Unavailable")
            return get_file(self, remote, local, *args, **kwargs)

        monkeypatch.setattr(type(fs), "get_file", refused)  # the server's instance too
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert not report.loaded and len(report.failed) == 1
        assert report.failed[0].startswith(f"gru/2: cannot fetch from memory://{root}")
        assert "503 Service Unavailable" in report.failed[0]
        fs.rm(root, recursive=True)  # the URL is gone
        report = srv.admin.ReloadModels(pb.ReloadModelsRequest())
        assert len(report.failed) == 1
        assert report.failed[0].startswith(f"model repository sync: cannot list memory://{root}")
        assert srv.stub.GetModel(pb.GetModelRequest(model="gru")).default_version == "1"
    finally:
        srv.stop()
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_shutdown_turns_health_off_and_refuses_new_calls(model_repo: Path) -> None:
    """App.shutdown itself (what SIGTERM runs): while a stream in flight drains, health says
    NOT_SERVING and a new call is refused with UNAVAILABLE; the stream runs to its end."""
    srv = ServerThread(make_settings(model_repo, grace=5.0, max_tokens=60_000)).start()
    health = health_pb2_grpc.HealthStub(srv.channel)
    request = pb.GenerateRequest(model="lstm", prompt="the", max_tokens=60_000)  # seconds
    stream = srv.stub.Generate(request, timeout=60)
    first = next(stream)
    stopping = asyncio.run_coroutine_threadsafe(srv.app.shutdown(grace=30.0), srv.loop)
    deadline = time.monotonic() + 20  # a bound on a busy machine (the grace is 30 s)
    while time.monotonic() < deadline:  # health is still answered while the stream drains
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.01)
    else:
        pytest.fail("health still SERVING while shutting down")
    # UNAVAILABLE (retryable), never grpc's CANCELLED: the port stays open while calls drain,
    # on a channel opened before the drain and on one opened during it
    for _ in range(20):
        with pytest.raises(grpc.RpcError) as err:
            srv.stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "shutting down" in err.value.details()
        fresh = grpc.insecure_channel(f"localhost:{srv.app.port}")
        with fresh, pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceStub(fresh).Score(pb.ScoreRequest(model="lstm", texts=["ab"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert not stopping.done()  # the stream in flight holds the drain open
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(m.token_ids) for m in [first, *rest]) == 60_000
    # a client's next call on the same connection, at once: still refused UNAVAILABLE (the
    # port lingers), not CANCELLED by grpc's stop racing it
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    stopping.result(30)
    srv.app = None  # shut down already
    srv.stop()


def test_an_open_health_watch_does_not_hold_the_drain(model_repo: Path) -> None:
    """A Watch never ends by itself (client-side health checking keeps one per channel): it
    sees NOT_SERVING at SIGTERM and then ends with OK when calls are refused, instead of
    holding the stop for the whole --grace and being cancelled at its end."""
    srv = ServerThread(make_settings(model_repo)).start()
    health = health_pb2_grpc.HealthStub(srv.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=600)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.run_coroutine_threadsafe(srv.app.shutdown(grace=600.0), srv.loop)
    seen = [m.status for m in watch]  # ends: a cancelled stream would raise here instead
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]
    stopping.result(120)  # well inside the grace: nothing else was in flight
    srv.app = None
    srv.stop()


def test_drain_delay_turns_health_off_before_calls_are_refused(model_repo: Path) -> None:
    srv = ServerThread(make_settings(model_repo, drain_delay=30.0)).start()
    health = health_pb2_grpc.HealthStub(srv.channel)
    stopping = asyncio.run_coroutine_threadsafe(srv.app.shutdown(grace=1.0), srv.loop)
    deadline = time.monotonic() + 20  # a bound within the 30 s delay, not a speed check
    while time.monotonic() < deadline:  # health turns NOT_SERVING at once...
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.01)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    # ...while calls still succeed during the delay
    assert srv.stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"])).results
    assert not stopping.done()
    stopping.cancel()
    srv.stop(grace=1.0)


def test_a_call_past_its_deadline_is_counted_deadline_exceeded_not_cancelled(
    model_repo: Path,
) -> None:
    """grpc cancels a handler both when the caller goes away and when the call's deadline
    passes; the access log, rnnserve_errors_total and the span must say which, as the client
    does: the error-rate alert counts DEADLINE_EXCEEDED (a server too slow), not CANCELLED."""
    srv = ServerThread(make_settings(model_repo)).start()
    try:
        release, entered = asyncio.Event(), threading.Semaphore(0)

        async def stuck(*args, **kwargs):  # a Score that outlives any deadline
            entered.release()
            await release.wait()

        srv.app.engine.score = stuck
        with pytest.raises(grpc.RpcError) as err:  # 2 s: it reaches the handler first
            srv.stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"]), timeout=2.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        left = srv.stub.Score.future(pb.ScoreRequest(model="lstm", texts=["ab"]), timeout=60)
        assert entered.acquire(timeout=20) and entered.acquire(timeout=20)  # both reached it
        left.cancel()
        reg = srv.app.metrics.registry

        def count(code: str) -> float:
            labels = {"rpc": "Score", "code": code}
            return srv.call(lambda: reg.get_sample_value("rnnserve_errors_total", labels) or 0)

        deadline = time.monotonic() + 20  # the handlers end asynchronously: a bound, not a speed
        while count("CANCELLED") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count("DEADLINE_EXCEEDED") == 1
        assert count("CANCELLED") == 1
    finally:
        srv.stop()


def test_an_sse_client_gone_before_the_headers_is_cancelled_not_internal(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/completions with stream=true waits for the first token before its headers go out;
    a client that left meanwhile makes them meet a closing transport. That is a cancel (as a
    later write's reset is), not an INTERNAL error logged with its traceback, and the stream
    frees its slot."""
    import urllib.request

    from aiohttp import web
    from aiohttp.client_exceptions import ClientConnectionResetError

    from tests.integration.http.conftest import free_port

    prepare = web.StreamResponse.prepare

    async def closing(self, request):  # what aiohttp raises when the client has gone
        if self.headers.get("Content-Type") == "text/event-stream":
            raise ClientConnectionResetError("Cannot write to closing transport")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", closing)
    srv = ServerThread(make_settings(model_repo, http_port=free_port())).start()
    try:
        body = json.dumps({"model": "lstm", "prompt": "the", "max_tokens": 50, "stream": True})
        url = f"http://127.0.0.1:{srv.app.http.port}/v1/completions"
        post = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
        with pytest.raises(OSError):  # no response: the connection is dropped
            urllib.request.urlopen(post, timeout=30).read()
        reg = srv.app.metrics.registry

        def count(code: str) -> float:
            labels = {"rpc": "openai.Completions", "code": code}
            return srv.call(lambda: reg.get_sample_value("rnnserve_errors_total", labels) or 0)

        deadline = time.monotonic() + 20  # the handler ends asynchronously: a bound
        while not count("CANCELLED") + count("INTERNAL") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (count("CANCELLED"), count("INTERNAL")) == (1, 0)
        assert srv.call(lambda: srv.app.engine.limiter.active) == 0
    finally:
        srv.stop()


def test_unparsable_request_bytes_are_invalid_argument_not_internal(server) -> None:
    raw = server.channel.unary_unary("/rnnserve.v1.Inference/Score")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")  # field 1 (model) with invalid UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request" in err.value.details()


def test_an_error_echoing_a_huge_name_keeps_its_status(server) -> None:
    """The message quoted a 20 kB model name whole: past the client's metadata limit the call
    failed RESOURCE_EXHAUSTED ("Stream removed") instead of NOT_FOUND; a version of 5,000
    digits was INTERNAL (int() refuses past 4300 digits)."""
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Score(pb.ScoreRequest(model="x" * 20_000, texts=["ab"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().endswith("' is not in the repository")
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Score(pb.ScoreRequest(model="lstm", version="9" * 5000, texts=["ab"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# a new user and PID namespace, the command its PID 1, killed if unshare is
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--mount-proc", "--kill-child"]


def _pid1_available() -> bool:
    """`unshare` can start a process as PID 1 of a new PID namespace (no root needed)."""
    if shutil.which("unshare") is None:
        return False
    probe = [*UNSHARE, "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def _server_blocked_loading(tmp_path: Path, *flags: str, prefix: tuple = ()):
    """A real server whose start-up scan blocks on a manifest that is a FIFO nobody writes
    (slow storage); returns the process and the FIFO's write end, opened once the server reads
    it. Closing the write end gives the server an empty manifest (that version fails)."""
    fifo = tmp_path / "repo" / "slow" / "1" / "manifest.json"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    cmd = [*prefix, sys.executable, "-m", "rnnserve.server.main", "--model-repo",
           str(tmp_path / "repo"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
           "--http-port", "0", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a bound, not a speed assertion
    while True:  # opening the write end succeeds once the server reads it
        try:
            return proc, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never began loading: {proc.communicate(timeout=10)[1]}")
        time.sleep(0.05)


@pytest.mark.parametrize("as_pid1", [False, True], ids=["process", "pid1"])
def test_sigterm_while_loading_models_exits_0_at_once(tmp_path: Path, as_pid1: bool) -> None:
    """A stop while the models load (slow storage: here a manifest that is a FIFO nobody
    writes, so the load blocks on it) ends the real process with 0, neither killed by the
    signal nor, as a container's PID 1, ignoring it until SIGKILL."""
    if as_pid1 and not _pid1_available():
        pytest.skip("no unprivileged PID namespaces here")
    proc, writer = _server_blocked_loading(tmp_path, prefix=tuple(UNSHARE) if as_pid1 else ())
    try:
        # the server now waits for the manifest's bytes; as PID 1 it is unshare's child
        server = proc.pid
        if as_pid1:
            server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(server, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopped by SIGTERM while starting" in err
        assert "listening" not in err
    finally:
        os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_sighup_while_loading_models_is_a_rescan_once_started(
    model_repo: Path, tmp_path: Path
) -> None:
    """SIGHUP's default action is to terminate: one that reached a server still loading (under
    --workers, any worker's ReloadModels has the parent SIGHUP every worker) killed it."""
    proc, writer = _server_blocked_loading(tmp_path, "--allow-empty-repo", "1")
    try:
        deadline = time.monotonic() + 120  # a bound, not a speed assertion
        os.kill(proc.pid, signal.SIGHUP)  # while it waits for the manifest's bytes
        # a model the start-up scan has passed (it listed the folders first): only the
        # rescan the SIGHUP asked for can find it
        shutil.copytree(model_repo / "lstm", tmp_path / "repo" / "lstm")
        os.close(writer)  # an empty manifest: that version fails, the server starts
        lines: list[str] = []
        wanted = "reload (SIGHUP while starting) changed the repository"
        while not any(wanted in line for line in lines):
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
