"""A real `rnn-server` process: health, Generate, /metrics, JSON logs, SIGTERM -> exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.e2e.processes import reap, stop_gracefully

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
READY_WAIT_S = 120.0  # a bound on start-up (the tiny zoo loads in a second), not a target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(address: str, proc: subprocess.Popen) -> None:
    """A fresh channel per probe: one that kept failing while the server started reconnects
    only on its backoff schedule (about 1, 2.6, 5.2, 9.3, 15.8, 26, 43 s), so a server up at
    27 s went unseen until 43 s, past the 300 probes (about 30 s) this loop used to count."""
    end = time.monotonic() + READY_WAIT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"rnn-server exited early with {proc.returncode}")
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if time.monotonic() > end:
            raise AssertionError(f"rnn-server not healthy after {READY_WAIT_S:g}s")
        time.sleep(0.1)


def test_real_server_process(model_repo: Path, tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "RNNSERVE_METRICS_PORT": str(metrics_port), "RNNSERVE_GRACE": "5"}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--port", str(port),
             "--host", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        _wait_healthy(f"127.0.0.1:{port}", proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            msgs = list(
                stub.Generate(
                    pb.GenerateRequest(model="lstm", prompt="the time", max_tokens=8), timeout=30
                )
            )
            assert sum(len(m.token_ids) for m in msgs) >= 1
            assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            text = body.read().decode()
            assert (
                'rnnserve_request_duration_seconds_count{code="OK",model="lstm",rpc="Generate"}'
                in text
            )
        stop_gracefully(proc)
    finally:
        reap(proc)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    access = [e for e in lines if e.get("rpc") == "Generate"]
    assert access and access[0]["code"] == "OK" and access[0]["request_id"]


def test_missing_model_repo_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(BIN / "rnn-server"), "--model-repo", str(tmp_path / "nope"), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "error:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
def test_a_taken_port_is_named_in_the_error(model_repo: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": _free_port(), "--http-port": 0, "--metrics-port": 0, flag: busy}
        cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1"]
        for name, value in ports.items():
            cmd += [name, str(value)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert f"cannot start: {flag} {busy}" in out and "Traceback" not in out


def test_sigterm_lets_in_flight_streams_finish_and_exits_0(model_repo: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--port", str(port),
         "--host", "127.0.0.1", "--metrics-port", "0", "--grace", "20", "--log-level", "ERROR",
         "--max-tokens", "5000"],
    )  # fmt: skip
    try:
        _wait_healthy(f"127.0.0.1:{port}", proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(model="lstm", prompt="the time", max_tokens=5000), timeout=60
            )
            tokens = len(next(call).token_ids)
            proc.send_signal(signal.SIGTERM)
            msgs = list(call)  # the in-flight stream runs to its end
            tokens += sum(len(m.token_ids) for m in msgs)
            assert msgs[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
            if msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH:
                assert tokens == 5000
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(pb.ScoreRequest(model="lstm", texts=["ab"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
