"""The scheduler and output buffer with a fake model: no ONNX, no gRPC.

The fake "model" predicts token (last + 1) mod V and counts steps in its state, so every
stream's expected output is known exactly.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.errors import Overloaded
from rnnserve.server.metrics import Metrics
from rnnserve.server.runtime import OnnxModel, Runtime
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.scheduler import Scheduler, StreamLimiter
from rnnserve.server.stopping import StopChecker
from rnnserve.server.stream import OutputBuffer, Stream

V = 10


class FakeModel(OnnxModel):
    """OnnxModel's state helpers with a pure-numpy `run` (no session)."""

    def __init__(self) -> None:
        self.specs = [StateSpec("n", "n_in", "n_out", [1, -1, 1], 1)]
        self._init = [np.zeros((1, 1), dtype=np.float32)]
        self.calls: list[int] = []  # batch size of every call
        self.has_head = False  # tokens are picked in numpy

    def run(self, x, state):
        self.calls.append(x.shape[0])
        nxt = (x[:, -1] + 1) % V  # [batch]
        logits = np.full((x.shape[0], x.shape[1], V), -10.0, dtype=np.float32)
        logits[np.arange(x.shape[0]), -1, nxt] = 10.0
        return logits, [state[0] + x.shape[1]]


def _stream(max_tokens: int) -> Stream:
    return Stream(
        model="fake", sampler=Sampler(SamplingParams()), stopper=StopChecker(max_tokens),
        decode=str, signer=None, started=0.0, deadline=None,
    )  # fmt: skip


def _greedy() -> Sampler:
    return Sampler(SamplingParams())


async def _start(sched: Scheduler, first: int, max_tokens: int) -> Stream:
    stream = _stream(max_tokens)
    sched.admit()
    token, logprob, state = await sched.prefill([first], None, stream.sampler)
    stream.accept(token, logprob)
    sched.join(stream, state)
    return stream


async def _collect(stream: Stream) -> list[int]:
    ids = []
    while (chunk := await stream.buffer.next()) is not None:
        ids += chunk.token_ids
    return ids


def _scheduler(max_batch: int = 64, limit: int = 100, steps: int = 1):
    model = FakeModel()
    sched = Scheduler("fake", model, Runtime(2), StreamLimiter(limit), Metrics(), max_batch,
                      steps)  # fmt: skip
    return sched, model


def test_streams_share_steps_and_each_gets_its_own_tokens() -> None:
    async def main():
        sched, model = _scheduler()
        streams = [await _start(sched, first, 6) for first in range(4)]
        outs = await asyncio.gather(*[_collect(s) for s in streams])
        await asyncio.wait_for(sched.drain(), 5)  # slots free when the trip ends
        await sched.close()
        return outs, model.calls, sched

    outs, calls, sched = asyncio.run(main())
    for first, ids in enumerate(outs):
        assert ids == [(first + k) % V for k in range(1, 7)]
    assert max(calls) > 1  # decode steps were batched
    assert sched.admitted == 0 and sched.limiter.active == 0


def test_max_batch_splits_a_step_into_chunks() -> None:
    async def main():
        sched, model = _scheduler(max_batch=2)
        streams = [await _start(sched, 0, 5) for _ in range(5)]
        await asyncio.gather(*[_collect(s) for s in streams])
        await sched.close()
        return model.calls

    calls = asyncio.run(main())
    assert max(calls) == 2


def test_multi_step_trips_give_the_same_tokens() -> None:
    async def main():
        sched, _ = _scheduler(steps=8)
        streams = [await _start(sched, i % V, 30) for i in range(20)]
        outs = await asyncio.gather(*[_collect(s) for s in streams])
        await sched.close()
        return outs

    for i, ids in enumerate(asyncio.run(main())):
        assert ids == [(i + k) % V for k in range(1, 31)]


def test_cancelled_stream_leaves_by_the_next_step() -> None:
    async def main():
        sched, _ = _scheduler()
        keep = await _start(sched, 0, 400)
        gone = await _start(sched, 0, 10**6)
        await gone.buffer.next()
        gone.cancel()
        ids = await _collect(keep)  # the batch goes on without it
        await asyncio.wait_for(sched.drain(), 5)  # keep's slot frees at the trip's end
        await sched.close()
        return sched, ids

    sched, ids = asyncio.run(main())
    assert len(ids) == 400
    assert sched.live == 0 and sched.admitted == 0 and sched.limiter.active == 0


def test_admission_is_bounded() -> None:
    sched, _ = _scheduler(limit=2)
    sched.admit()
    sched.admit()
    with pytest.raises(Overloaded):
        sched.admit()
    sched.release()
    sched.admit()


def test_output_buffer_coalesces_for_a_slow_reader() -> None:
    async def main():
        buf = OutputBuffer()
        for i in range(5):
            buf.push([i], str(i), -0.5)
        buf.finish("length")
        first = await buf.next()
        return first, await buf.next()

    first, end = asyncio.run(main())
    assert first.token_ids == [0, 1, 2, 3, 4] and first.text == "01234"
    assert first.logprob == pytest.approx(-2.5) and first.finish_reason == "length"
    assert end is None


def test_expired_stream_ends_with_deadline_exceeded() -> None:
    from rnnserve.server.errors import DeadlineExceeded

    async def main():
        sched, _ = _scheduler()
        stream = await _start(sched, 0, 10**6)
        stream.deadline = 0.0  # long past
        with pytest.raises(DeadlineExceeded):
            await _collect(stream)
        await asyncio.wait_for(sched.drain(), 5)
        await sched.close()
        return sched

    sched = asyncio.run(main())
    assert sched.admitted == 0


class LockstepModel(FakeModel):
    """Computes step k only once the reader has received the tokens of the steps before it
    (or gives up after a while and counts a stall)."""

    def __init__(self) -> None:
        super().__init__()
        self.consumed = 0
        self.stalls = 0
        self.cond = threading.Condition()

    def run(self, x, state):
        with self.cond:
            made = len(self.calls)  # tokens made so far (the prefill makes the first)
            if not self.cond.wait_for(lambda: self.consumed >= made, timeout=5):
                self.stalls += 1
        return super().run(x, state)

    def received(self, n: int) -> None:
        with self.cond:
            self.consumed += n
            self.cond.notify_all()


def test_a_long_trip_hands_over_every_step() -> None:
    """One stream, up to 64 steps per trip: each step's token reaches the reader before the
    next step runs (were tokens handed over only at the trip's end, every step would stall)."""

    async def main():
        model = LockstepModel()
        sched = Scheduler("lockstep", model, Runtime(1), StreamLimiter(4), Metrics(), 64, 64)
        stream = await _start(sched, 0, 40)
        ids = []
        while (chunk := await stream.buffer.next()) is not None:
            ids += chunk.token_ids
            model.received(len(chunk.token_ids))
        await sched.close()
        return ids, model

    ids, model = asyncio.run(main())
    assert ids == [k % V for k in range(1, 41)]
    assert len(model.calls) == 40  # 1 prefill + 39 decode steps, none wasted
    assert model.stalls == 0


def _handed_over_steps(sched: Scheduler) -> list[int]:
    """Records how many steps each hand-over to the event loop carries."""
    sizes: list[int] = []
    hand_over = sched._hand_over

    def record(loop, streams, result):
        sizes.append(len(result.times))
        hand_over(loop, streams, result)

    sched._hand_over = record
    return sizes


def test_a_stream_interval_coalesces_steps_into_one_message() -> None:
    """With a long --stream-interval-us a single stream's trip is handed over once, at its
    end, and the reader gets it as one message; the tokens are the same."""

    async def main():
        model = FakeModel()
        sched = Scheduler("fake", model, Runtime(1), StreamLimiter(4), Metrics(), 64, 64, 10.0)
        sizes = _handed_over_steps(sched)
        stream = await _start(sched, 0, 40)
        chunks = []
        while (chunk := await stream.buffer.next()) is not None:
            chunks.append(chunk.token_ids)
        await sched.close()
        return chunks, sizes

    chunks, sizes = asyncio.run(main())
    assert [t for c in chunks for t in c] == [k % V for k in range(1, 41)]
    assert sizes == [39]  # the prefill made the first token; one trip made the rest
    assert len(chunks) <= 2


def test_under_load_each_hand_over_carries_one_step_per_live_stream() -> None:
    async def main():
        sched, _ = _scheduler(steps=64)
        sizes = _handed_over_steps(sched)
        prefilled = []
        for first in range(8):
            stream = _stream(60)
            sched.admit()
            token, logprob, state = await sched.prefill([first], None, stream.sampler)
            stream.accept(token, logprob)
            prefilled.append((stream, state))
        for stream, state in prefilled:  # all join before the first decode step
            sched.join(stream, state)
        outs = await asyncio.gather(*[_collect(s) for s, _ in prefilled])
        await sched.close()
        return sizes, outs

    sizes, outs = asyncio.run(main())
    for i, ids in enumerate(outs):
        assert ids == [(i + k) % V for k in range(1, 61)]
    assert sizes == [8] * 7 + [3]  # one trip of 59 steps, handed over every 8


def test_prompts_arriving_together_prefill_as_one_call_per_length() -> None:
    async def main():
        sched, model = _scheduler()
        prompts = [[1, 2], [3, 4], [5, 6], [7, 8, 9], [2, 3, 4]]
        got = await asyncio.gather(*[sched.prefill(p, None, _greedy()) for p in prompts])
        return prompts, got, model.calls

    prompts, got, calls = asyncio.run(main())
    assert sorted(calls) == [2, 3]  # three of length 2 in one call, two of length 3 in another
    for ids, (token, logprob, state) in zip(prompts, got, strict=True):
        assert token == (ids[-1] + 1) % V  # each row its own prediction
        assert logprob == pytest.approx(0.0, abs=1e-6)
        assert state[0].shape == (1, 1, 1) and float(state[0][0, 0, 0]) == len(ids)


def test_a_prefill_whose_caller_left_is_skipped() -> None:
    async def main():
        sched, model = _scheduler()
        gone = asyncio.ensure_future(sched.prefill([1, 2], None, _greedy()))
        kept = asyncio.ensure_future(sched.prefill([3, 4], None, _greedy()))
        await asyncio.sleep(0)  # both queued, the round not started
        gone.cancel()
        token, _, _ = await kept
        return token, model.calls

    token, calls = asyncio.run(main())
    assert calls == [1]
    assert token == 5
