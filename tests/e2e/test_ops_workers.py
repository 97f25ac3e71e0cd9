"""`rnn-server --workers 2`: two processes on one port, one merged /metrics whose sums are
true (not doubled), /readyz once both workers serve, SIGTERM -> exit 0."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.e2e.processes import reap, stop_gracefully

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
READY_WAIT_S = 90.0  # bound on start-up, not a speed assertion
CALLS = 8
# without it, channels to one address share a TCP connection, so one worker would get them all
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as body:
        return body.read().decode()


def _ready(port: int) -> bool:
    """The parent's /readyz: every worker alive and overall SERVING."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as reply:
            return reply.status == 200
    except OSError:
        return False


def _values(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of `name` in a /metrics page."""
    pattern = rf"^{name}(?:\{{([^}}]*)\}})? ([0-9.e+-]+)$"
    return [(labels, float(v)) for labels, v in re.findall(pattern, text, re.M)]


def _wait_until_serving(port: int, end: float) -> None:
    while True:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as ch:
                ask = health_pb2.HealthCheckRequest()
                got = health_pb2_grpc.HealthStub(ch).Check(ask, timeout=5)
            if got.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            pytest.fail("the workers never answered health SERVING")
        time.sleep(0.2)


def _generate_count(text: str) -> float:
    pattern = r"rnnserve_request_duration_seconds_count\{([^}]*)\} ([0-9.e+]+)"
    total = 0.0
    for labels, value in re.findall(pattern, text):
        if 'rpc="Generate"' in labels and 'code="OK"' in labels:
            total += float(value)
    return total


def test_two_workers_share_port_and_metrics(model_repo: Path, tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    log = tmp_path / "server.log"
    repo = tmp_path / "models"
    shutil.copytree(model_repo, repo)
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--grace", "2",
           "--executor-threads", "1", "--http-port", "0"]  # fmt: skip
    env = {**os.environ, "RNNSERVE_WORKERS": "2"}  # the env var form of --workers
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + READY_WAIT_S
        while not _ready(metrics_port):  # both workers have loaded the zoo
            if proc.poll() is not None:
                pytest.fail(f"rnn-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(f"2 workers not up in {READY_WAIT_S:g}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        _wait_until_serving(port, end)  # models load before the port is bound
        before = _generate_count(_scrape(metrics_port))
        state = b""
        for _ in range(CALLS):  # a fresh connection each time: the kernel spreads them
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as ch:
                health = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=30
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                # each call resumes the previous one, which likely ran on the other worker:
                # workers share one resume-token key
                ask = pb.GenerateRequest(model="lstm", max_tokens=2, version="1")
                ask.return_state = True
                if state:
                    ask.state = state
                else:
                    ask.prompt = "the"
                msgs = list(pb_grpc.InferenceStub(ch).Generate(ask, timeout=30))
                assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
                state = msgs[-1].state
                assert state
        after = _scrape(metrics_port)
        assert _generate_count(after) - before == CALLS
        serving = _values(after, "rnnserve_model_serving")
        models = {d.name for d in model_repo.iterdir() if d.is_dir()}
        assert len(serving) == len(models), "one series per version, not one per worker"
        assert sum(v for _, v in serving) == len(models), "a true sum under --workers"
        # the parent merges the workers' files while they write them: read until it settles
        ready, settle = _values(after, "rnnserve_ready"), time.monotonic() + 10
        while ready != [("", 1.0)] and time.monotonic() < settle:
            time.sleep(0.5)
            ready = _values(_scrape(metrics_port), "rnnserve_ready")
        assert ready == [("", 1.0)]
        assert _values(after, "rnnserve_stream_capacity") == [("", 2 * 512.0)]
        rss = _values(after, "process_resident_memory_bytes")
        assert len({labels for labels, _ in rss}) == 3, "the parent and each worker, by pid"
        assert _values(after, "rnnserve_build_info")[0][1] == 1
        # Admin.ReloadModels reaches one worker; that worker has the parent rescan them all
        shutil.copytree(repo / "lstm" / "1", repo / "lstm" / "2")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as ch:
            reply = pb_grpc.AdminStub(ch).ReloadModels(pb.ReloadModelsRequest(), timeout=30)
        assert list(reply.loaded) == ["lstm/2"]
        seen, settle = [], time.monotonic() + 30
        while seen[-CALLS:] != ["2"] * CALLS and time.monotonic() < settle:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as ch:
                info = pb_grpc.InferenceStub(ch).GetModel(pb.GetModelRequest(model="lstm"))
            seen.append(info.default_version)
        assert seen[-CALLS:] == ["2"] * CALLS, "every worker serves the new version"
        stop_gracefully(proc, timeout=40)
    finally:
        reap(proc)


def _start_workers(repo: Path, log: Path, port: int, metrics_port: int) -> subprocess.Popen:
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", "0",
           "--grace", "2", "--executor-threads", "1", "--workers", "2"]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _worker_pids(proc: subprocess.Popen, log: Path) -> list[int]:
    """The pids the parent logs once it has started its workers (they are still importing)."""
    end = time.monotonic() + READY_WAIT_S
    while time.monotonic() < end:
        for line in log.read_text().splitlines():
            if '"pids"' in line and "started 2 workers" in line:
                return json.loads(line)["pids"]
        if proc.poll() is not None:
            pytest.fail(f"rnn-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"no workers started:\n{log.read_text()[-3000:]}")


def _wait_ready(proc: subprocess.Popen, metrics_port: int, log: Path) -> None:
    end = time.monotonic() + READY_WAIT_S
    while not _ready(metrics_port):
        if proc.poll() is not None:
            pytest.fail(f"rnn-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"2 workers not up in {READY_WAIT_S:g}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_workers_stop_when_the_parent_is_killed(model_repo: Path, tmp_path: Path) -> None:
    """kill -9 of the parent (OOM killer, a supervisor's last resort) must not leave its
    workers serving the port: a restarted instance would share it with them (SO_REUSEPORT)."""
    log = tmp_path / "server.log"
    proc = _start_workers(model_repo, log, _free_port(), _free_port())
    pids: list[int] = []
    try:
        pids = _worker_pids(proc, log)
        _wait_ready(proc, int(proc.args[proc.args.index("--metrics-port") + 1]), log)
        proc.kill()
        proc.wait(timeout=10)
        end = time.monotonic() + 30  # a bound on the drain, not a speed assertion
        while any(_alive(pid) for pid in pids) and time.monotonic() < end:
            time.sleep(0.2)
        assert not [pid for pid in pids if _alive(pid)], "orphaned workers still serve"
    finally:
        reap(proc)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_signal_while_the_workers_import(
    signum: signal.Signals, model_repo: Path, tmp_path: Path
) -> None:
    """SIGHUP while the workers are still importing is a reload (they scan anyway): the
    server comes up; SIGTERM then is a stop while starting: exit 0, as with one process."""
    log, metrics_port = tmp_path / "server.log", _free_port()
    proc = _start_workers(model_repo, log, _free_port(), metrics_port)
    try:
        _worker_pids(proc, log)
        proc.send_signal(signum)
        if signum == signal.SIGHUP:
            _wait_ready(proc, metrics_port, log)
            stop_gracefully(proc, timeout=40)
        else:
            assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
    finally:
        reap(proc)


def test_a_second_instance_on_the_port_is_refused(model_repo: Path, tmp_path: Path) -> None:
    """SO_REUSEPORT lets any process of the same user join the port: a second --workers
    server started by mistake would silently take half the connections. It must fail as a
    single-process server does on a taken port."""
    port, first_log, second_log = _free_port(), tmp_path / "first.log", tmp_path / "second.log"
    metrics_port = _free_port()
    first = _start_workers(model_repo, first_log, port, metrics_port)
    second = None
    try:
        _wait_ready(first, metrics_port, first_log)
        second = _start_workers(model_repo, second_log, port, _free_port())
        assert second.wait(timeout=READY_WAIT_S) == 2
        assert f"{port}" in second_log.read_text() and "in use" in second_log.read_text()
        assert first.poll() is None
        stop_gracefully(first, timeout=40)
    finally:
        reap(first)
        if second is not None:
            reap(second)


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_parents_liveness_fails_while_a_worker_is_wedged(
    model_repo: Path, tmp_path: Path
) -> None:
    """The parent answers /healthz, so a worker whose event loop no longer runs (here:
    SIGSTOPped) passed it while holding its share of the port and of the calls; its
    heartbeat gauge now goes stale, /healthz turns 503, and 200 again once it runs."""
    port, metrics_port = _free_port(), _free_port()
    log = tmp_path / "server.log"
    proc = _start_workers(model_repo, log, port, metrics_port)
    try:
        pids = _worker_pids(proc, log)
        _wait_ready(proc, metrics_port, log)
        assert _healthz(metrics_port) == 200
        os.kill(pids[0], signal.SIGSTOP)
        try:
            end = time.monotonic() + 60  # the heartbeat goes stale after a few seconds
            while _healthz(metrics_port) == 200:
                assert time.monotonic() < end, "liveness passed with a worker stopped"
                time.sleep(0.5)
            assert _healthz(metrics_port) == 503
        finally:
            os.kill(pids[0], signal.SIGCONT)
        end = time.monotonic() + 60
        while _healthz(metrics_port) != 200:
            assert time.monotonic() < end, "liveness did not recover once the worker ran"
            time.sleep(0.5)
        stop_gracefully(proc, timeout=40)
    finally:
        reap(proc)
