"""Hot reload and broken models on real `rnn-server` processes.

SIGHUP, --poll-interval and Admin.ReloadModels load new versions; a broken new version is
refused with a log line while the old one serves; a removed version unloads only after its
in-flight stream finishes. Broken models at start-up (corrupt ONNX, manifest missing fields,
unknown format version) leave the others serving and are NOT_SERVING with their reason.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.e2e.processes import reap, stop_gracefully

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
WAIT_S = 60.0  # bound on start-up / reload, not a speed assertion
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _repo(model_repo: Path, tmp_path: Path, names: list[str]) -> Path:
    repo = tmp_path / "models"
    for name in names:
        shutil.copytree(model_repo / name, repo / name)
    return repo


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return -1


def _until(what: str, check: Callable[[], bool], proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"rnn-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"{what} not seen in {WAIT_S:g}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def running(repo: Path, log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, grpc.Channel]]:
    port = _free_port()
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", "5", *args]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _until("SERVING", lambda: _health(channel) == SERVING, proc, log)
            yield proc, channel
        stop_gracefully(proc)
    finally:
        reap(proc)


def _versions(channel: grpc.Channel, name: str) -> dict[str, pb.VersionInfo]:
    info = pb_grpc.InferenceStub(channel).GetModel(pb.GetModelRequest(model=name), timeout=10)
    return {v.version: v for v in info.versions}


def _log_lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


def test_sighup_rpc_and_removal(model_repo: Path, tmp_path: Path) -> None:
    repo = _repo(model_repo, tmp_path, ["lstm", "ngram"])
    log = tmp_path / "server.log"
    with running(repo, log) as (proc, channel):
        admin = pb_grpc.AdminStub(channel)
        infer = pb_grpc.InferenceStub(channel)
        # SIGHUP: a new version directory loads (no polling: only the signal can find it)
        shutil.copytree(repo / "lstm" / "1", repo / "lstm" / "2")
        assert set(_versions(channel, "lstm")) == {"1"}
        proc.send_signal(signal.SIGHUP)
        _until("lstm/2 after SIGHUP", lambda: "2" in _versions(channel, "lstm"), proc, log)
        assert _versions(channel, "lstm")["2"].status == "SERVING"

        # Admin RPC: a broken new version is refused; version 2 keeps serving
        shutil.copytree(repo / "lstm" / "1", repo / "lstm" / "3")
        (repo / "lstm" / "3" / "model.onnx").write_bytes(b"not an onnx graph")
        reply = admin.ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        assert [f.split(":")[0] for f in reply.failed] == ["lstm/3"]
        v3 = _versions(channel, "lstm")["3"]
        assert v3.status == "NOT_SERVING" and v3.status_reason
        info = infer.GetModel(pb.GetModelRequest(model="lstm"), timeout=10)
        assert info.default_version == "2"
        assert _health(channel, "lstm") == SERVING
        errors = [e for e in _log_lines(log) if e.get("level") == "ERROR"]
        assert any("lstm/3" in e["msg"] and "NOT_SERVING" in e["msg"] for e in errors)

        # removal: an in-flight stream on lstm/2 finishes; then lstm/2 unloads
        stream = infer.Generate(
            pb.GenerateRequest(model="lstm", version="2", prompt="the", max_tokens=2000),
            timeout=60,
        )
        first = next(stream)
        assert first.token_ids
        shutil.rmtree(repo / "lstm" / "2")
        pending = admin.ReloadModels.future(pb.ReloadModelsRequest(), timeout=60)
        rest = list(stream)  # not cut off by the reload
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        produced = sum(len(m.token_ids) for m in [first, *rest])
        assert produced == 2000
        assert list(pending.result().unloaded) == ["lstm/2"]
        assert set(_versions(channel, "lstm")) == {"1", "3"}
        assert infer.GetModel(pb.GetModelRequest(model="lstm"), timeout=10).default_version == "1"


def test_sighup_while_draining_does_not_kill_the_server(model_repo: Path, tmp_path: Path) -> None:
    """Once reloading has stopped, SIGHUP's default action (terminate) must not come back:
    under --workers any worker's ReloadModels has the parent SIGHUP every worker, draining
    ones too (Admin is still answered during --drain-delay)."""
    repo = _repo(model_repo, tmp_path, ["ngram"])
    log = tmp_path / "server.log"
    with running(repo, log, "--drain-delay", "3") as (proc, _channel):
        proc.send_signal(signal.SIGTERM)
        _until("the drain", lambda: "shutting down" in log.read_text(), proc, log)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]


def test_poll_interval_loads_new_model(model_repo: Path, tmp_path: Path) -> None:
    repo = _repo(model_repo, tmp_path, ["ngram"])
    log = tmp_path / "server.log"
    with running(repo, log, "--poll-interval", "0.5") as (proc, channel):
        assert _health(channel, "gru") != SERVING
        shutil.copytree(model_repo / "gru", repo / "gru")
        _until("gru via polling", lambda: _health(channel, "gru") == SERVING, proc, log)
        reply = pb_grpc.InferenceStub(channel).Score(
            pb.ScoreRequest(model="gru", texts=["the time"]), timeout=30
        )
        assert len(reply.results) == 1


def test_broken_models_at_startup(model_repo: Path, tmp_path: Path) -> None:
    repo = _repo(model_repo, tmp_path, ["lstm", "gru", "rnn", "ngram"])
    (repo / "lstm" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    manifest = repo / "gru" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["task"], data["state"]
    manifest.write_text(json.dumps(data))
    manifest = repo / "rnn" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 999
    manifest.write_text(json.dumps(data))
    log = tmp_path / "server.log"
    with running(repo, log) as (_, channel):
        assert _health(channel, "ngram") == SERVING
        for name in ("lstm", "gru", "rnn"):
            assert _health(channel, name) == NOT_SERVING
            v1 = _versions(channel, name)["1"]
            assert v1.status == "NOT_SERVING" and v1.status_reason, name
        assert "999" in _versions(channel, "rnn")["1"].status_reason
        with pytest.raises(grpc.RpcError) as info:
            list(
                pb_grpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(model="lstm", prompt="the", max_tokens=2), timeout=10
                )
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        msgs = list(
            pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(model="ngram", prompt="the", max_tokens=2), timeout=10
            )
        )
        assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    errors = " ".join(e["msg"] for e in _log_lines(log) if e.get("level") == "ERROR")
    for name in ("lstm/1", "gru/1", "rnn/1"):
        assert f"model {name} is NOT_SERVING" in errors
