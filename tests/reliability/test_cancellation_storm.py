"""Cancellation storm: 1,000 Generate streams cancelled at random points leak nothing.

Afterwards every decode loop has no admitted or batched stream, the server-wide stream limiter is
back to 0, and the rnnserve_live_streams gauge reads 0 for every model.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import time

import grpc
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb

pytestmark = pytest.mark.slow

MODELS = ["lstm", "gru", "rnn", "ngram", "hmm", "lstm-deep"]
STREAMS, WORKERS = 1000, 16


def _one(stub, rng: random.Random) -> str:
    """Opens one stream, reads 0..6 messages, cancels it; returns how it ended."""
    req = pb.GenerateRequest(
        model=rng.choice(MODELS),
        prompt="the time traveller ",
        max_tokens=rng.choice([1, 3, 400, 4000]),  # 1 and 3 may finish first
        sampling=pb.SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(1000)),
    )
    call = stub.Generate(req, timeout=60)
    if rng.random() < 0.2:
        time.sleep(rng.random() * 0.005)  # cancel before or around admission
    try:
        for _ in range(rng.randrange(7)):
            next(call)
    except StopIteration:
        return "finished"
    call.cancel()
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e
        return "cancelled"
    return "finished"


def _state(server) -> dict[str, float]:
    def read():
        app = server.app
        scheds = app.engine.decoders()
        reg = app.metrics.registry
        gauges = [
            reg.get_sample_value("rnnserve_live_streams", {"model": s.name}) or 0.0 for s in scheds
        ]
        return {
            "admitted": sum(s.admitted for s in scheds),
            "live": sum(s.live for s in scheds),
            "pending": sum(s.pending for s in scheds),
            "limiter": app.engine.limiter.active,
            "gauge": sum(gauges),
        }

    return server.call(read)


def test_cancellation_storm_frees_every_slot(server) -> None:
    rngs = [random.Random(i) for i in range(STREAMS)]
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        ends = list(pool.map(lambda r: _one(server.stub, r), rngs))
    # a storm, not a trickle: about half the streams (max_tokens 400 or 4000) are cut; how many
    # of those end first depends on the machine's speed (573-583 of 1000 measured here), so
    # the bar is a quarter, far from that figure, yet no run that cancels little passes it
    assert len(ends) == STREAMS and ends.count("cancelled") > STREAMS // 4
    zero = {"admitted": 0, "live": 0, "pending": 0, "limiter": 0, "gauge": 0.0}
    for _ in range(200):  # cancellations reach the server asynchronously: wait, bounded
        if _state(server) == zero:
            break
        time.sleep(0.05)
    assert _state(server) == zero
    # and the server still serves
    msgs = list(server.stub.Generate(pb.GenerateRequest(model="lstm", prompt="a", max_tokens=4)))
    assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
