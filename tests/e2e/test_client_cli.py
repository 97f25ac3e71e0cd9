"""The real `rnn-client` CLI against a real `rnn-server` process serving the tiny zoo.

Shows: generate streams text and resumes from a file exactly; score prints perplexity;
infill ranks candidates; forecast reads a CSV and draws a PNG; models/model describe the zoo;
every failure is one line on stderr and a distinct exit code. `running_server` is also used
by the grpcurl and Node.js end-to-end tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

READY_WAIT_S = 90.0  # upper bound on start-up, not an assertion about speed
CALL_TIMEOUT_S = 60.0  # every subprocess has a limit: a stuck server fails, not hangs
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class ServerProcess:
    address: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def running_server(model_repo: Path, log_dir: Path) -> Iterator[ServerProcess]:
    """Starts `rnn-server` on a free port, waits for grpc.health SERVING, stops it after."""
    port = _free_port()
    log = log_dir / "rnn-server.log"
    script = BIN / "rnn-server"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rnnserve.server.main"]
    cmd += ["--model-repo", str(model_repo), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--metrics-port", "0"]
    env = {**os.environ, "RNNSERVE_LOG_LEVEL": "WARNING"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    try:
        end = time.monotonic() + READY_WAIT_S
        while not _serving(address):
            if proc.poll() is not None:
                pytest.fail(f"rnn-server exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > end:
                pytest.fail(f"rnn-server not SERVING after {READY_WAIT_S:g}s:\n{_tail(log)}")
            time.sleep(0.3)
        yield ServerProcess(address, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(model_repo, tmp_path_factory.mktemp("client-cli")) as srv:
        yield srv


def client_cmd() -> list[str]:
    script = BIN / "rnn-client"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rnnserve.client.cli"]


@pytest.fixture
def rnn_client(server: ServerProcess):
    def run(*argv: str, address: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*client_cmd(), "--address", address or server.address, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)

    return run


def test_models_and_model(rnn_client) -> None:
    done = rnn_client("models")
    assert done.returncode == 0, done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert {"lstm", "bilstm", "ngram", "hmm", "sine-mlp", "sine-gru"} <= names
    done = rnn_client("--json", "model", "lstm")
    info = json.loads(done.stdout)
    assert info["name"] == "lstm" and info["versions"][0]["task"] == "lm"


def test_generate_streams_text(rnn_client) -> None:
    done = rnn_client(  # long enough to span several messages (--stream-interval-us)
        "--json", "generate", "--model", "lstm", "--prompt", "the time", "--max-tokens", "400"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(events) >= 2  # a few tokens per message
    assert events[-1]["finish_reason"] and not any(e["finish_reason"] for e in events[:-1])
    plain = rnn_client("generate", "--model", "lstm", "--prompt", "the time", "--max-tokens", "400")
    assert plain.returncode == 0
    assert plain.stdout == "".join(e["text"] for e in events) + "\n"  # greedy: same text


def test_generate_resume_file_continues_exactly(rnn_client, tmp_path) -> None:
    args = ["generate", "--model", "gru", "--max-tokens", "6"]
    whole = rnn_client("--json", *args[:3], "--prompt", "the time", "--max-tokens", "12")
    events = [json.loads(line) for line in whole.stdout.splitlines()]
    assert events[-1]["finish_reason"] == "length"  # no <eos> in the zoo's corpus, no stops
    state = tmp_path / "gru.state"
    first = rnn_client(*args, "--prompt", "the time", "--resume-file", str(state))
    assert first.returncode == 0, first.stderr
    assert state.stat().st_size > 0
    second = rnn_client(*args, "--resume-file", str(state))
    assert second.returncode == 0, second.stderr
    text = first.stdout.removesuffix("\n") + second.stdout.removesuffix("\n")
    assert text == "".join(e["text"] for e in events)


def test_score_prints_perplexity(rnn_client) -> None:
    done = rnn_client("score", "--model", "lstm", "the time traveller", "hello")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[0] == "perplexity" and len(rows) == 2
    result = json.loads(rnn_client("--json", "score", "--model", "ngram", "the time").stdout)[0]
    vocab = json.loads(rnn_client("--json", "model", "ngram").stdout)["versions"][0]["vocab_size"]
    assert 1 <= result["perplexity"] <= 10 * vocab
    ll = result["log_likelihood"]
    assert result["perplexity"] == pytest.approx(math.exp(-ll / result["num_tokens"]), rel=1e-4)


def test_infill(rnn_client) -> None:
    done = rnn_client(
        "--json", "infill", "--model", "bilstm", "--left", "the t", "--right", "me", "--top-k", "4"
    )
    assert done.returncode == 0, done.stderr
    cands = json.loads(done.stdout)
    assert len(cands) == 4 and cands[0]["probability"] >= cands[-1]["probability"]


def test_forecast_prints_and_plots(rnn_client, tmp_path) -> None:
    csv = tmp_path / "sine.csv"
    csv.write_text("t,x\n" + "".join(f"{t},{math.sin(0.01 * t)}\n" for t in range(1, 201)))
    png = tmp_path / "forecast.png"
    done = rnn_client(
        "forecast",
        "--model",
        "sine-gru",
        "--history-file",
        str(csv),
        "--column",
        "x",
        "--horizon",
        "8",
        "--fitted",
        "--plot",
        str(png),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["step", "index", "forecast", "lower", "upper"]  # its interval
    assert lines[8].split()[0] == "8"
    assert png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(
        rnn_client(
            "--json",
            "forecast",
            "--model",
            "sine-mlp",
            "--history-file",
            str(csv),
            "--horizon",
            "3",
        ).stdout
    )
    assert len(data["forecast"]) == 3 and all(math.isfinite(v) for v in data["forecast"])


@pytest.mark.parametrize(
    ("argv", "status", "exit_code"),
    [
        (["score", "--model", "no-such-model", "ab"], "NOT_FOUND", 5),
        (["generate", "--model", "bilstm", "--prompt", "the"], "FAILED_PRECONDITION", 9),
        (
            ["generate", "--model", "lstm", "--prompt", "a", "--max-tokens", "100000000"],
            "INVALID_ARGUMENT",
            3,
        ),
        (["score", "--model", "lstm", "a"], "INVALID_ARGUMENT", 3),
    ],
)
def test_errors_exit_with_the_status_code(rnn_client, argv, status, exit_code) -> None:
    done = rnn_client(*argv)
    assert done.returncode == exit_code, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {status}: ") and "Traceback" not in done.stderr


def test_no_server_exits_unavailable(rnn_client) -> None:
    done = rnn_client("--timeout", "5", "models", address=f"127.0.0.1:{_free_port()}")
    assert done.returncode == 14
    assert done.stderr.startswith("error: UNAVAILABLE: ")
