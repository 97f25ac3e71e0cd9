"""Generate with --decode-process 1: prefill in the server, steps in a child process.

The Generate tests of test_generate.py run again here against such a server (imported, so
pytest collects them with this module's `server` fixture), then what only a child process
can do: die, be replaced, and leave with the server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.artifact.manifest import Manifest
from rnnserve.server import logs
from rnnserve.server.decode import process
from rnnserve.server.decode.process import JoinSpec, LoopConfig
from rnnserve.server.runtime import OnnxModel
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.integration.server.test_generate import (  # noqa: F401  (collected here too)
    PROMPT,
    _generate,
    _ids,
    _ort_greedy,
    _until_eos,
    test_churn_keeps_greedy_and_resume_exact,
    test_greedy_equals_the_reference,
    test_resume_token_continues_exactly,
    test_seeded_sampling_is_reproducible_while_others_share_the_batch,
    test_stop_string_ends_the_stream_and_is_not_returned,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_settings(model_repo, max_tokens=200_000, decode_process=1)).start()
    yield srv
    srv.stop()


@pytest.fixture
def stub(server: ServerThread):
    return server.stub


def _decoder(server: ServerThread, name: str = "lstm"):
    return server.call(lambda: next(d for d in server.app.engine.decoders() if d.name == name))


def _wait(predicate, what: str, limit_s: float = 20.0) -> None:
    """Bounded polling for something the server does soon; no timing assertion."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {limit_s} s: {what}")


def _child_pid(server: ServerThread, name: str = "lstm") -> int | None:
    process = _decoder(server, name)._process
    return process.pid if process is not None else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_steps_run_in_a_child_process_and_report_their_metrics(stub, server) -> None:
    _generate(stub, model="lstm", prompt=PROMPT, max_tokens=20)
    pid = _child_pid(server)
    assert pid is not None and pid != os.getpid() and _alive(pid)
    reg = server.app.metrics.registry

    def steps() -> float:
        return reg.get_sample_value("rnnserve_step_duration_seconds_count", {"model": "lstm"}) or 0

    _wait(lambda: steps() >= 19, "the child's step observations reach the server's metrics")
    itl = reg.get_sample_value("rnnserve_inter_token_latency_seconds_count", {"model": "lstm"})
    assert itl and itl >= 19


def test_cancelled_stream_leaves_the_child_batch(stub, server) -> None:
    call = stub.Generate(pb.GenerateRequest(model="lstm", prompt=PROMPT, max_tokens=150_000))
    next(call)
    decoder = _decoder(server)
    _wait(lambda: server.call(lambda: decoder.live) == 1, "the stream is in the child's batch")
    call.cancel()
    _wait(lambda: server.call(lambda: (decoder.admitted, decoder.live)) == (0, 0),
          "the cancelled stream left")  # fmt: skip


def test_deadline_ends_a_stream_in_the_child(stub) -> None:
    request = pb.GenerateRequest(model="lstm", prompt=PROMPT, max_tokens=150_000)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Generate(request, timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_dead_child_fails_its_streams_unavailable_and_is_replaced(stub, server) -> None:
    _generate(stub, model="gru", prompt=PROMPT, max_tokens=5)
    pid = _child_pid(server, "gru")
    assert pid is not None
    call = stub.Generate(pb.GenerateRequest(model="gru", prompt=PROMPT, max_tokens=150_000))
    next(call)
    decoder = _decoder(server, "gru")
    _wait(lambda: server.call(lambda: decoder.live) == 1, "the stream is in the child's batch")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode process" in err.value.details()
    _wait(lambda: server.call(lambda: (decoder.admitted, decoder.live)) == (0, 0),
          "no admission or batch row is left to the dead child")  # fmt: skip
    again = _ids(_generate(stub, model="gru", prompt=PROMPT, max_tokens=12))
    assert len(again) == 12 and _child_pid(server, "gru") not in (None, pid)


def test_the_child_leaves_with_the_server(model_repo: Path) -> None:
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        assert len(_ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8))) == 8
        pid = _child_pid(srv, "rnn")
        assert pid is not None and _alive(pid)
    finally:
        srv.stop(grace=1.0)
    _wait(lambda: not _alive(pid) or _zombie(pid), "the child exits on shutdown")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_child_ignores_the_stop_signals_the_server_drains_on(stub, server, signum) -> None:
    """Ctrl-C (or systemd's stop) signals the whole process group: the server drains its
    calls, so the steps under them must go on until it closes the child."""
    _generate(stub, model="rnn", prompt=PROMPT, max_tokens=5)
    pid = _child_pid(server, "rnn")
    assert pid is not None
    call = stub.Generate(pb.GenerateRequest(model="rnn", prompt=PROMPT, max_tokens=3000))
    got = len(next(call).token_ids)
    os.kill(pid, signum)
    got += sum(len(r.token_ids) for r in call)
    assert got == 3000
    assert len(_ids(_generate(stub, model="rnn", prompt=PROMPT, max_tokens=4))) == 4
    assert _child_pid(server, "rnn") == pid


def test_the_child_is_read_outside_the_context_of_the_call_that_started_it(stub, server) -> None:
    """Log lines about the child (it exited, it cannot open the model) belong to no call."""
    _generate(stub, model="lstm-deep", prompt=PROMPT, max_tokens=5)  # starts the child
    decoder = _decoder(server, "lstm-deep")
    seen: list[str] = []
    handle = decoder._handle

    def spy(message: tuple) -> None:
        seen.append(logs.request_id.get())
        handle(message)

    server.call(lambda: setattr(decoder, "_handle", spy))
    try:
        _generate(stub, model="lstm-deep", prompt=PROMPT, max_tokens=5)
    finally:
        server.call(lambda: delattr(decoder, "_handle"))
    assert seen and set(seen) == {""}


def _decode_children() -> dict[int, str]:
    """This process's decode processes: pid -> state (R, S, Z...)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"rnnserve.server.decode.process" in cmdline:
            found[int(stat.parent.name)] = fields[0]
    return found


def _kill_child(server: ServerThread, name: str) -> None:
    """SIGKILLs the version's decode process and waits until the server has let it go."""
    pid = _child_pid(server, name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: _child_pid(server, name) is None, "the server sees its child gone")


def _change(folder: Path, gru: Path, change: str) -> None:
    if change == "rewritten":  # other weights, the same interface
        (folder / "model.onnx").write_bytes((gru / "model.onnx").read_bytes())
    else:
        shutil.rmtree(folder)


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_a_first_child_after_model_onnx_changed_or_went_runs_the_loaded_weights(
    model_repo: Path, tmp_path: Path, change: str
) -> None:
    """Between loading and the version's first Generate (hours, maybe) the file may change:
    the first child still builds its session from the bytes the server loaded."""
    shutil.copytree(model_repo / "rnn", tmp_path / "rnn")
    want = _until_eos(_ort_greedy(model_repo / "rnn" / "1", PROMPT, 24))
    srv = ServerThread(make_settings(tmp_path, decode_process=1)).start()
    try:
        _change(tmp_path / "rnn" / "1", model_repo / "gru" / "1", change)
        assert _ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=24)) == want
    finally:
        srv.stop()


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_streams_keep_the_loaded_weights_after_model_onnx_changes_or_goes(
    model_repo: Path, tmp_path: Path, change: str
) -> None:
    """The child runs the bytes the server loaded, not whatever the path holds when it
    starts: a stream running meanwhile, and streams on a restarted child, still get the
    loaded model's greedy tokens after model.onnx is rewritten with other weights (the gru's,
    same interface) or its version folder is removed (no rescan has unloaded it yet)."""
    shutil.copytree(model_repo / "rnn", tmp_path / "rnn")
    folder = tmp_path / "rnn" / "1"
    want = _until_eos(_ort_greedy(model_repo / "rnn" / "1", PROMPT, 24))
    srv = ServerThread(make_settings(tmp_path, decode_process=1)).start()
    try:
        assert _ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=24)) == want
        running = srv.stub.Generate(
            pb.GenerateRequest(model="rnn", prompt=PROMPT, max_tokens=2000), timeout=60
        )
        got = len(next(running).token_ids)
        _change(folder, model_repo / "gru" / "1", change)
        got += sum(len(r.token_ids) for r in running)
        assert got == 2000
        for _ in range(2):  # each restart opens the same bytes
            _kill_child(srv, "rnn")
            assert _ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=24)) == want
    finally:
        srv.stop()


# A decode process that cannot open the model: it answers "failed" and exits, as a child
# does when onnxruntime cannot build the session (out of memory, say).
FAILING_CHILD = [
    "-c",
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[3]))  # argv: -c, -m, the module, fd, level\n"
    "conn.recv()\n"
    "conn.send(('failed', 'RuntimeError: no memory for the session'))\n",
]


def _children_fail(
    monkeypatch: pytest.MonkeyPatch, backoff_s: float = 0.05, command: list[str] = FAILING_CHILD
) -> list[str]:
    """Decode processes start as `command` (they fail to open the model) with a back-off of
    `backoff_s`; returns the real command, for the test to put back."""
    # raising=False: a test fails on behaviour, not here, where the constants are missing
    monkeypatch.setattr(process, "OPEN_BACKOFF_S", backoff_s, raising=False)
    monkeypatch.setattr(process, "OPEN_BACKOFF_CAP_S", backoff_s, raising=False)
    real = process.SAFE_PATH
    monkeypatch.setattr(process, "SAFE_PATH", command)
    return real


def test_a_child_that_cannot_open_the_model_fails_its_streams_and_is_reaped(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    safe_path = _children_fail(monkeypatch)
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no memory for the session" in err.value.details()
        _wait(lambda: "Z" not in _decode_children().values(), "the failed child is reaped")
        monkeypatch.setattr(process, "SAFE_PATH", safe_path)
        decoder = _decoder(srv, "rnn")

        def may_start_a_good_child() -> bool:
            """The back-off has passed and no child is opening the model: health's retry
            (every second, once the back-off passed) may have started one with the failing
            command before it was put back, and a stream joining that one fails too."""
            return not decoder._opening and decoder._backoff.refusal("rnn") is None

        _wait(lambda: srv.call(may_start_a_good_child), "back-off")
        assert len(_ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8))) == 8
    finally:
        srv.stop()


def test_the_child_logs_json_lines(model_repo: Path) -> None:
    """The child writes to the server's stderr: in the server's format, not bare tracebacks."""
    folder = model_repo / "rnn" / "1"
    model = OnnxModel(
        folder / "model.onnx", Manifest.load(folder), ["CPUExecutionProvider"], 1, keep_image=True
    )
    image = model.image
    assert image is not None
    ours, theirs = socket.socketpair()
    with theirs:
        cmd = [sys.executable, "-m", "rnnserve.server.decode.process", str(theirs.fileno()),
               "INFO"]  # fmt: skip
        fds = [theirs.fileno(), image.fd]
        child = subprocess.Popen(cmd, pass_fds=fds, stderr=subprocess.PIPE)
    image.close()
    conn = Connection(ours.detach())
    try:
        conn.send(("open", "rnn", image.fd, model.args, LoopConfig(8, 0.0, 64, False)))
        spec = JoinSpec(sampler=None, count=1, budget=5, due=False, max_tokens=6, signs=False,
                        state_every=0, end_state=False, started=0.0, deadline=None)  # fmt: skip
        conn.send(("join", 0, spec, model.initial_state(1), 1, 0.0))  # no sampler: it fails
        message = ("metrics",)
        while message[0] != "news":
            assert conn.poll(30)
            message = conn.recv()
        items = message[1]
        assert items[0][5] is not None and items[0][6]  # failed, and the stream's last news
        conn.send(("close",))
        _, err = child.communicate(timeout=30)
    finally:
        conn.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = [json.loads(line) for line in err.decode().splitlines()]
    assert any(e["level"] == "ERROR" and e["msg"] == "decode failed for rnn" and "exc" in e
               for e in lines)  # fmt: skip


def test_the_child_imports_nothing_from_the_working_directory(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the rnn-server script itself: a module file where the server runs from (a shared
    folder, a checkout) is not imported in its stead."""
    (tmp_path / "numpy.py").write_text('raise ImportError("numpy.py of the working folder")\n')
    monkeypatch.chdir(tmp_path)
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        assert len(_ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8))) == 8
    finally:
        srv.stop()


def _count_starts(server: ServerThread, name: str) -> list[None]:
    """Records each child start of `name`'s decoder from now on."""
    decoder = _decoder(server, name)
    starts: list[None] = []
    start = decoder.start

    def counted() -> None:
        if decoder._process is None:
            starts.append(None)
        start()

    server.call(lambda: setattr(decoder, "start", counted))
    return starts


def test_a_model_no_child_can_open_is_refused_without_a_child_per_stream(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed open was a Python + onnxruntime start, for every later batch of joins."""
    safe_path = _children_fail(monkeypatch, backoff_s=3600.0)  # no retry by time here
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert "no memory for the session" in err.value.details()
        starts = _count_starts(srv, "rnn")
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "new streams are refused" in err.value.details()
            assert "no memory for the session" in err.value.details()
        assert starts == [], "a child started per refused stream"
        monkeypatch.setattr(process, "SAFE_PATH", safe_path)
        decoder = _decoder(srv, "rnn")
        srv.call(lambda: setattr(decoder._backoff, "until", 0.0))  # its time has passed
        assert len(_ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8))) == 8
        assert len(starts) == 1
        assert srv.call(lambda: decoder._backoff.failures) == 0, "not reset by the open"
    finally:
        srv.stop()


def test_a_child_that_exits_before_opening_the_model_backs_off_too(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside onnxruntime's session build sends no "failed": the exit says it."""
    _children_fail(monkeypatch, 3600.0, ["-c", "raise SystemExit(3)"])  # dies at once
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        starts = _count_starts(srv, "rnn")
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "exited before opening the model" in err.value.details()
        assert starts == []
    finally:
        srv.stop()


def _health(server: ServerThread, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _serving_gauge(server: ServerThread, name: str) -> float | None:
    labels = {"model": name, "version": "1"}
    return server.app.metrics.registry.get_sample_value("rnnserve_model_serving", labels)


def test_a_version_no_child_can_open_is_not_serving_until_one_opens(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness must not send calls to a version whose new streams are all refused; and as
    an unready replica gets no calls, the server itself retries once the back-off passed."""
    safe_path = _children_fail(monkeypatch)
    srv = ServerThread(make_settings(model_repo, decode_process=1)).start()
    try:
        assert _health(srv, "rnn") == SERVING
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _wait(lambda: _health(srv, "rnn") == NOT_SERVING, "the version turns NOT_SERVING")
        assert _serving_gauge(srv, "rnn") == 0
        monkeypatch.setattr(process, "SAFE_PATH", safe_path)  # no call follows
        _wait(lambda: _health(srv, "rnn") == SERVING, "a child opens the model")
        assert _serving_gauge(srv, "rnn") == 1
        assert len(_ids(_generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8))) == 8
    finally:
        srv.stop()


def test_a_version_whose_children_die_opening_serves_again_once_one_opens(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The back-off's time passing (no file change) retries too; other models stay ready."""
    safe_path = _children_fail(monkeypatch, command=["-c", "raise SystemExit(3)"])  # dies at once
    for name in ("rnn", "gru"):
        shutil.copytree(model_repo / name, tmp_path / name)
    srv = ServerThread(make_settings(tmp_path, decode_process=1)).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        _wait(lambda: _health(srv, "rnn") == NOT_SERVING, "the version turns NOT_SERVING")
        assert _health(srv, "gru") == SERVING and _health(srv, "") == SERVING
        monkeypatch.setattr(process, "SAFE_PATH", safe_path)  # the next child opens it
        _wait(lambda: _health(srv, "rnn") == SERVING, "a retried child opens the model")
        decoder = _decoder(srv, "rnn")
        assert srv.call(lambda: decoder._backoff.failures) == 0
    finally:
        srv.stop()


def test_the_decode_child_reports_its_cpu_and_memory(server, stub) -> None:
    """process_* describes the server process only: the children that step the streams had
    no CPU or memory series at all."""
    from prometheus_client import generate_latest

    _generate(stub, model="lstm", prompt=PROMPT, max_tokens=50)
    pid = _child_pid(server)
    assert pid is not None
    server.call(server.app.metrics.sample)
    text = generate_latest(server.app.metrics.registry).decode()
    lines = [line for line in text.splitlines() if line.startswith("rnnserve_decode_process")]
    cpu = next(
        line
        for line in lines
        if line.startswith('rnnserve_decode_process_cpu_seconds_total{model="lstm"}')
    )
    rss = next(
        line
        for line in lines
        if line.startswith('rnnserve_decode_process_resident_memory_bytes{model="lstm"}')
    )
    assert float(cpu.split()[-1]) > 0  # it imported onnxruntime and stepped 50 tokens
    assert float(rss.split()[-1]) > 10 * 2**20  # a Python with onnxruntime: tens of MB
