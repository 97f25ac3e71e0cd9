"""Generate with --decode-process 1: prefill in the server, steps in a child process.

The Generate tests of test_generate.py run again here against such a server (imported, so
pytest collects them with this module's `server` fixture), then what only a child process
can do: die, be replaced, and leave with the server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.integration.server.test_generate import (  # noqa: F401  (collected here too)
    PROMPT,
    _generate,
    _ids,
    test_churn_keeps_greedy_and_resume_exact,
    test_greedy_equals_the_reference,
    test_resume_token_continues_exactly,
    test_seeded_sampling_is_reproducible_while_others_share_the_batch,
    test_stop_string_ends_the_stream_and_is_not_returned,
)


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
