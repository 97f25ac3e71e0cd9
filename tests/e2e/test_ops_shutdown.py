"""Graceful shutdown of a real `rnn-server`: SIGTERM mid-stream.

Health stops being SERVING, a new call gets UNAVAILABLE, the in-flight stream still runs to
its full length, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.tools import http_status

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
WAIT_S = 60.0  # bounds, not speed assertions
TOKENS = 8000  # a couple of seconds of generation: still running when SIGTERM lands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return -1


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.parametrize("extra", [[], ["--decode-process", "1"]], ids=["threads", "process"])
def test_sigterm_drains_in_flight_stream(model_repo: Path, tmp_path: Path, extra) -> None:
    """With --decode-process 1 the stream drains across the process boundary and the decode
    process leaves with the server."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", "30",
           "--max-tokens", str(TOKENS), *extra]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(address) as channel:
            end = time.monotonic() + WAIT_S
            while _health(channel) != health_pb2.HealthCheckResponse.SERVING:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < end, log.read_text()[-3000:]
                time.sleep(0.2)
            stream = pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(model="lstm", prompt="the", max_tokens=TOKENS), timeout=WAIT_S
            )
            first = next(stream)
            children = _children(proc.pid)
            assert len(children) == (1 if extra else 0)  # the decode process of lstm
            proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + WAIT_S
            while _health(channel) == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < end, "health still SERVING after SIGTERM"
                time.sleep(0.05)
            with grpc.insecure_channel(address) as fresh, pytest.raises(grpc.RpcError) as info:
                list(
                    pb_grpc.InferenceStub(fresh).Generate(
                        pb.GenerateRequest(model="lstm", prompt="the", max_tokens=2), timeout=10
                    )
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(m.token_ids) for m in [first, *rest]) == TOKENS
        assert proc.wait(timeout=WAIT_S) == 0
        assert not [c for c in children if Path(f"/proc/{c}").exists()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "shutting down" in log.read_text()


@contextlib.contextmanager
def _started(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """The server process, its output in `log`; killed at the end if still running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def _opened_by_the_server(fifo: Path, proc: subprocess.Popen, log: Path) -> Iterator[None]:
    """Waits until the server has opened `fifo` to read (its load then waits in read() for
    ever: nobody writes), holding our write end open until the block ends."""
    end = time.monotonic() + WAIT_S
    while True:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:  # ENXIO: no reader yet
            assert exc.errno == errno.ENXIO, exc
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.05)
    try:
        yield
    finally:
        os.close(writer)


def test_sigterm_during_a_hung_rescan_exits(model_repo: Path, tmp_path: Path) -> None:
    """A rescan blocked on the repository (a hung network mount, a stalled download: here a
    manifest that is a FIFO nobody writes to) must not hold the exit: Kubernetes would
    SIGKILL the pod at the end of its grace period. The load thread is abandoned."""
    repo = tmp_path / "models"
    shutil.copytree(model_repo, repo)
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", "1"]  # fmt: skip
    with _started(cmd, log) as proc:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            end = time.monotonic() + WAIT_S
            while _health(channel) != health_pb2.HealthCheckResponse.SERVING:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < end, log.read_text()[-3000:]
                time.sleep(0.2)
        hung = repo / "lstm" / "99"
        hung.mkdir()
        shutil.copy(next((repo / "lstm").glob("*/model.onnx")), hung / "model.onnx")
        os.mkfifo(hung / "manifest.json")
        proc.send_signal(signal.SIGHUP)
        with _opened_by_the_server(hung / "manifest.json", proc, log):
            proc.send_signal(signal.SIGTERM)  # the rescan now waits in read() for ever
            assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "stopped" in text and "model load still running (abandoned)" in text


def test_probes_answer_while_the_models_load(model_repo: Path, tmp_path: Path) -> None:
    """/healthz, /readyz and /metrics listen before the models load: a load that takes long
    (a large model, a slow download; here a manifest that is a FIFO nobody writes) is alive
    (200) and not ready (503), so Kubernetes neither restarts it nor sends it traffic, and
    Prometheus does not read it as down. The endpoints only opened once everything was
    loaded, so the startup probe killed a server whose load outlasted it."""
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "lstm", repo / "lstm")
    hung = repo / "lstm" / "99"
    hung.mkdir()
    shutil.copy(repo / "lstm" / "1" / "model.onnx", hung / "model.onnx")
    os.mkfifo(hung / "manifest.json")
    metrics_port = _free_port()
    log = tmp_path / "server.log"
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", str(_free_port()), "--metrics-port", str(metrics_port)]  # fmt: skip
    base = f"http://127.0.0.1:{metrics_port}"
    with _started(cmd, log) as proc, _opened_by_the_server(hung / "manifest.json", proc, log):
        assert http_status(base + "/healthz") == 200, log.read_text()[-3000:]
        assert http_status(base + "/readyz") == 503
        assert http_status(base + "/metrics") == 200
        proc.send_signal(signal.SIGTERM)  # stopped while starting: at once, exit 0
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    assert "while starting" in log.read_text()
