"""Starting an `rnn-server` process from any environment (the dev venv or a fresh one)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_WAIT_S = 120.0  # an upper bound on start-up (a fresh venv imports cold), not a target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str, service: str = "") -> int:
    """The grpc.health status of `service` (0 UNKNOWN when the server does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
    return reply.status


@contextlib.contextmanager
def rnn_server(
    model_repo: str | Path,
    log: Path,
    python: Path = Path(sys.executable),
    env: dict[str, str] | None = None,
    ready_service: str = "",
) -> Iterator[str]:
    """Runs `python -m rnnserve.server.main` on a free port until `ready_service` is SERVING;
    yields its address and stops it (SIGTERM, then a kill) afterwards."""
    port = free_port()
    cmd = [str(python), "-m", "rnnserve.server.main", "--model-repo", str(model_repo)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    # RNNSERVE_HTTP_PORT: servers that have an HTTP port must not fight over its default
    full_env = {**os.environ, "RNNSERVE_LOG_LEVEL": "INFO", "RNNSERVE_HTTP_PORT": "0"}
    full_env.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    address = f"127.0.0.1:{port}"
    try:
        end = time.monotonic() + READY_WAIT_S
        while health(address, ready_service) != health_pb2.HealthCheckResponse.SERVING:
            if proc.poll() is not None:
                pytest.fail(f"rnn-server exited with {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > end:
                pytest.fail(f"rnn-server not SERVING after {READY_WAIT_S:g}s:\n{tail(log)}")
            time.sleep(0.3)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
