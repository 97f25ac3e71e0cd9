"""A very slow reader does not hold up the other streams of its batch, and its buffer stays
bounded: the server coalesces its tokens into fewer, larger messages.

Throughput is compared as a ratio of the same measurement with and without the slow reader, so
the test does not depend on how fast the shared CI machine is.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

FAST, TOKENS = 6, 1500
# a small HTTP/2 window without BDP growth: the transport cannot hide a slow reader's backlog
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _req(seed: int, tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="lstm", prompt="the ", max_tokens=tokens,
        sampling=pb.SamplingParams(temperature=1.0, seed=seed),
    )  # fmt: skip


def _fast(stub, seed: int, out: list[float]) -> None:
    start = time.monotonic()
    n = sum(len(m.token_ids) for m in stub.Generate(_req(seed, TOKENS), timeout=120))
    out.append(n / (time.monotonic() - start))  # tokens/s of this stream


def _round(server, slow: bool) -> tuple[float, list[pb.GenerateResponse]]:
    """Mean tokens/s of the FAST streams, run alongside an optional slow reader."""
    rates: list[float] = []
    slow_msgs: list[pb.GenerateResponse] = []
    stop = threading.Event()
    ch = grpc.insecure_channel(f"127.0.0.1:{server.app.port}", options=SMALL_WINDOW)

    def reader() -> None:
        """Reads one message, stalls until the fast streams are done, then drains."""
        call = pb_grpc.InferenceStub(ch).Generate(_req(99, 4096), timeout=120)
        slow_msgs.append(next(call))
        stop.wait(120)
        slow_msgs.extend(call)

    slow_thread = threading.Thread(target=reader, daemon=True)
    if slow:
        slow_thread.start()
        time.sleep(0.5)
    threads = [
        threading.Thread(target=_fast, args=(server.stub, i, rates), daemon=True)
        for i in range(FAST)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if slow:
        for _ in range(600):  # bounded wait until the stalled stream has generated everything
            if server.call(lambda: sum(s.live for s in server.app.engine.decoders())) == 0:
                break
            time.sleep(0.05)
    stop.set()
    if slow:
        slow_thread.join(30)
    ch.close()
    assert len(rates) == FAST
    return sum(rates) / FAST, slow_msgs


def test_slow_reader_does_not_slow_its_batch(server) -> None:
    base, _ = _round(server, slow=False)
    with_slow, msgs = _round(server, slow=True)
    # the fast streams keep most of their throughput (generous: the CPU is shared)
    assert with_slow / base > 0.5, (base, with_slow)
    # the stalled reader got every token, coalesced: several per message, fewer messages than
    # tokens, so the server held at most one pending chunk plus the bounded transport buffers
    per_msg = [len(m.token_ids) for m in msgs]
    assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert max(per_msg) > 1 and sum(per_msg) > len(msgs), (len(msgs), sum(per_msg))
