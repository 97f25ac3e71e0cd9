"""The decode loop and output buffer with a fake model: no ONNX, no gRPC.

The fake "model" predicts token (last + 1) mod V and counts fed tokens in its state, so every
stream's expected output is known exactly. Tests either run the real thread through asyncio,
or drive single turns by hand (`_turns`) to check what each ORT call contained.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.decode.limiter import StreamLimiter
from rnnserve.server.decode.loop import DecodeLoop, Handover, Slot
from rnnserve.server.decode.process import DecodeProcess, LoopConfig
from rnnserve.server.decode.stream import OutputBuffer, Stream
from rnnserve.server.errors import DeadlineExceeded, EngineUnavailable, Overloaded
from rnnserve.server.metrics import Metrics
from rnnserve.server.runtime import OnnxModel
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.stopping import StopChecker

V = 10


class FakeModel(OnnxModel):
    """OnnxModel's state helpers with a pure-numpy `run` (no session)."""

    def __init__(self, eos: bool = False) -> None:
        self.specs = [StateSpec("n", "n_in", "n_out", [1, -1, 1], 1)]
        self._init = [np.zeros((1, 1), dtype=np.float32)]
        vocab = [str(i) for i in range(V)]
        if eos:
            vocab[V - 1] = "<eos>"
        self.manifest = SimpleNamespace(vocab=vocab)
        self.calls: list[tuple[int, int]] = []  # (rows, time) of every call
        self.has_head = False  # tokens are picked in numpy
        self.args = ("fake/model.onnx",)  # what a decode process would open (no file here)

    def run(self, x, state):
        self.calls.append(x.shape)
        nxt = (x[:, -1] + 1) % V  # [batch]
        logits = np.full((x.shape[0], x.shape[1], V), -10.0, dtype=np.float32)
        logits[np.arange(x.shape[0]), -1, nxt] = 10.0
        return logits, [state[0] + x.shape[1]]


def _stream(max_tokens: int, deadline: float | None = None) -> Stream:
    return Stream(
        model="fake", sampler=Sampler(SamplingParams()), stopper=StopChecker(max_tokens),
        decode=str, signer=None, started=0.0, deadline=deadline,
    )  # fmt: skip


def _loop(model: FakeModel | None = None, max_batch: int = 64, interval: float = 0.0,
          chunk: int = 256, threaded: bool = True) -> DecodeLoop:  # fmt: skip
    """threaded: prompts prefill in their own thread (the default) or between steps."""
    return DecodeLoop("fake", model or FakeModel(), Metrics(), max_batch, interval, chunk,
                      threaded)  # fmt: skip


def _start(loop: DecodeLoop, ids: list[int], max_tokens: int) -> Stream:
    stream = _stream(max_tokens)
    loop.admit()
    loop.submit(stream, ids, None)
    return stream


async def _collect(stream: Stream) -> list[int]:
    ids = []
    while (chunk := await stream.buffer.next()) is not None:
        ids += chunk.token_ids
    return ids


@pytest.mark.parametrize("threaded", [True, False])
def test_streams_share_steps_and_each_gets_its_own_tokens(threaded: bool) -> None:
    async def main():
        loop = _loop(threaded=threaded)
        streams = [_start(loop, [first], 6) for first in range(4)]
        outs = await asyncio.gather(*[_collect(s) for s in streams])
        for _ in streams:
            loop.release()
        await asyncio.wait_for(loop.drain(), 5)
        await loop.close()
        return outs, loop

    outs, loop = asyncio.run(main())
    for first, ids in enumerate(outs):
        assert ids == [(first + k) % V for k in range(1, 7)]
    assert max(rows for rows, _ in loop.model.calls) > 1  # decode steps were batched
    assert loop.admitted == 0 and loop.live == 0


@pytest.mark.parametrize("threaded", [True, False])
def test_max_batch_splits_a_step_into_chunks(threaded: bool) -> None:
    async def main():
        loop = _loop(max_batch=2, threaded=threaded)
        streams = [_start(loop, [0], 5) for _ in range(5)]
        outs = await asyncio.gather(*[_collect(s) for s in streams])
        await loop.close()
        return loop.model.calls, outs

    calls, outs = asyncio.run(main())
    assert max(rows for rows, _ in calls) == 2
    assert all(ids == [1, 2, 3, 4, 5] for ids in outs)


@pytest.mark.parametrize("threaded", [True, False])
def test_many_streams_joining_and_leaving_get_exact_tokens(threaded: bool) -> None:
    """Churn: streams of different lengths arrive while others run; each gets its own."""

    async def main():
        loop = _loop(max_batch=8, threaded=threaded)
        streams = []
        for i in range(40):
            streams.append((i, _start(loop, [i % V] * (1 + i % 5), 3 + (i * 7) % 30)))
            if i % 3 == 0:
                await asyncio.sleep(0.001)
        outs = await asyncio.gather(*[_collect(s) for _, s in streams])
        await loop.close()
        return streams, outs

    streams, outs = asyncio.run(main())
    for (i, stream), ids in zip(streams, outs, strict=True):
        n = 3 + (i * 7) % 30
        assert ids == [(i % V + k) % V for k in range(1, n + 1)], i
        assert stream.finished


async def _settled_live(loop, within: float = 10.0) -> int:
    """The loop's live count once it reaches 0, or as it stands after `within` seconds (a
    bound on a busy machine, not a speed check): a fixed short sleep raced the decode thread."""
    end = time.monotonic() + within
    while loop.live and time.monotonic() < end:
        await asyncio.sleep(0.01)
    return loop.live


@pytest.mark.parametrize("threaded", [True, False])
def test_cancelled_stream_leaves_by_the_next_step(threaded: bool) -> None:
    async def main():
        loop = _loop(threaded=threaded)
        keep = _start(loop, [0], 400)
        gone = _start(loop, [0], 10**6)
        await gone.buffer.next()
        gone.cancel()
        loop.release()
        ids = await _collect(keep)  # the batch goes on without it
        loop.release()
        await asyncio.wait_for(loop.drain(), 5)
        live = await _settled_live(loop)
        await loop.close()
        return live, ids

    live, ids = asyncio.run(main())
    assert len(ids) == 400
    assert live == 0


def test_admission_is_bounded() -> None:
    limiter = StreamLimiter(2)
    limiter.acquire()
    limiter.acquire()
    with pytest.raises(Overloaded):
        limiter.acquire()
    limiter.release()
    limiter.acquire()


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


@pytest.mark.parametrize("threaded", [True, False])
def test_expired_stream_ends_with_deadline_exceeded(threaded: bool) -> None:
    async def main():
        loop = _loop(threaded=threaded)
        stream = _stream(10**6, deadline=0.0)  # long past
        loop.admit()
        loop.submit(stream, [0], None)
        with pytest.raises(DeadlineExceeded):
            await _collect(stream)
        live = await _settled_live(loop)
        await loop.close()
        return live

    assert asyncio.run(main()) == 0


def test_a_stream_that_fails_while_handed_its_tokens_fails_alone() -> None:
    """Hand-overs drained together: one stream raising (here its text cannot be decoded)
    fails that stream; the others still get their tokens and their end."""

    def undecodable(token: int) -> str:
        raise KeyError(token)

    async def main():
        loop = _loop()
        bad = Stream(model="fake", sampler=Sampler(SamplingParams()),
                     stopper=StopChecker(5), decode=undecodable, signer=None, started=0.0,
                     deadline=None)  # fmt: skip
        good = _stream(3)
        ended = Handover(good, [1, 2, 3], [0.0] * 3, [0.0] * 3, last=True)
        loop._outbox.append([Handover(bad, [1], [0.0], [0.0]), ended])
        loop._deliver()
        with pytest.raises(KeyError):
            await asyncio.wait_for(_collect(bad), 10)
        return await asyncio.wait_for(_collect(good), 10), good

    ids, good = asyncio.run(main())
    assert ids == [1, 2, 3] and good.finish_reason == "length"


class FailingStateModel(FakeModel):
    """Its state helpers fail in one thread (a failure past the model call, e.g. no memory
    left to copy a state): `concat` in the decode thread (joining the batch), or `split`
    (the rows after a prefill call)."""

    def __init__(self, fails: str) -> None:
        super().__init__()
        self.fails = fails

    def concat(self, states):
        if self.fails == "join" and threading.current_thread().name.startswith("decode:"):
            raise MemoryError("no room to join the batch")
        return super().concat(states)

    def split(self, state):
        if self.fails == "prefill":
            raise MemoryError("no room for the rows")
        return super().split(state)


@pytest.mark.parametrize("fails", ["join", "prefill"])
def test_streams_whose_rows_fail_past_the_model_call_end_with_the_error(fails: str) -> None:
    """A row taken off a queue is failed with the error if it cannot go on: no stream is
    left waiting forever (holding its --max-streams slot and a drain)."""

    async def main():
        loop = _loop(FailingStateModel(fails))
        stream = _start(loop, [0], 5)
        with pytest.raises(MemoryError):
            await asyncio.wait_for(_collect(stream), 10)
        loop.release()
        await asyncio.wait_for(loop.drain(), 5)
        live = await _settled_live(loop)
        await loop.close()
        return live, loop.pending

    assert asyncio.run(main()) == (0, 0)


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


def test_a_lone_stream_gets_every_step_without_waiting() -> None:
    """With no stream interval each step's token reaches the reader before the next step
    runs (were tokens held for later, every step would stall)."""

    async def main():
        model = LockstepModel()
        loop = _loop(model)
        stream = _start(loop, [0], 40)
        ids = []
        while (chunk := await stream.buffer.next()) is not None:
            ids += chunk.token_ids
            model.received(len(chunk.token_ids))
        await loop.close()
        return ids, model

    ids, model = asyncio.run(main())
    assert ids == [k % V for k in range(1, 41)]
    assert len(model.calls) == 40  # 1 prefill + 39 decode steps, none wasted
    assert model.stalls == 0


def test_a_stream_interval_coalesces_steps_into_few_messages() -> None:
    async def main():
        loop = _loop(interval=10.0)
        stream = _start(loop, [0], 40)
        chunks = []
        await asyncio.sleep(0.2)  # let the thread run ahead of the reader
        while (chunk := await stream.buffer.next()) is not None:
            chunks.append(chunk.token_ids)
        await loop.close()
        return chunks

    chunks = asyncio.run(main())
    assert [t for c in chunks for t in c] == [k % V for k in range(1, 41)]
    assert len(chunks) <= 2  # the first token at once, the rest when the stream ended


# -- single turns, driven by hand: what each ORT call contained ------------------------------
def _turns(loop: DecodeLoop, n: int) -> None:
    """Turns of a decode loop that prefills between steps, driven in this thread."""
    assert not loop.prefill_thread
    loop._loop = SimpleNamespace(is_closed=lambda: True)  # no event loop: news stay queued
    for _ in range(n):
        loop._turn()


def _queue(loop: DecodeLoop, ids: list[int], max_tokens: int = 50) -> Stream:
    stream = _stream(max_tokens)
    loop._inbox.append(Slot(stream, ids, None, max_tokens))
    return stream


def _news(loop: DecodeLoop) -> dict[int, list[int]]:
    """Tokens made so far (handed over, or waiting for the next hand-over), by stream id()."""
    loop._send(loop._news)
    out: dict[int, list[int]] = {}
    for batch in loop._outbox:
        for news in batch:
            out.setdefault(id(news.stream), []).extend(news.tokens)
    for batch in loop._batches:
        for slot in batch.slots:
            out.setdefault(id(slot.stream), []).extend(slot.tokens)
    return out


def test_prompts_arriving_together_prefill_in_aligned_calls() -> None:
    loop = _loop(threaded=False)
    prompts = [[1, 2], [3, 4], [5, 6], [7, 8, 9], [2, 3, 4]]
    streams = [_queue(loop, p) for p in prompts]
    _turns(loop, 1)
    # one call of 5 rows x 2 tokens (three prompts end), then the decode step of those three
    assert loop.model.calls[:2] == [(5, 2), (3, 1)]
    _turns(loop, 1)
    # the two 3-token prompts end with one more token; then one step for all five
    assert loop.model.calls[2:4] == [(2, 1), (5, 1)]
    news = _news(loop)
    for ids, stream in zip(prompts, streams, strict=True):
        first = (ids[-1] + 1) % V
        assert news[id(stream)][0] == first  # each row its own prediction


def test_prefill_calls_take_at_most_prefill_batch_prompts_first_come_first() -> None:
    loop = DecodeLoop("fake", FakeModel(), Metrics(), 64, 0.0, 256, False, prefill_batch=2)
    prompts = [[1, 2], [3, 4], [5, 6, 7], [8, 9], [2, 3]]
    streams = [_queue(loop, p) for p in prompts]
    _turns(loop, 1)
    # prompts 1 and 2 in one call, then the step of the two
    assert loop.model.calls[:2] == [(2, 2), (2, 1)]
    _turns(loop, 3)
    # prompts 3 and 4 (aligned at 2 tokens: 3 goes to the back with one token left), then 5
    # and 3 (aligned at 1: 3 ends, 5 goes to the back), then the rest of 5; a step each turn
    assert loop.model.calls[2:] == [(2, 2), (3, 1), (2, 1), (4, 1), (1, 1), (5, 1)]
    news = _news(loop)
    for ids, stream in zip(prompts, streams, strict=True):
        assert news[id(stream)][0] == (ids[-1] + 1) % V


def test_queue_wait_ends_at_each_prompts_first_prefill_call() -> None:
    """rnnserve_queue_wait_seconds: arrival to the first prefill call, once per stream (a
    prompt sent to the back after a partial call is not counted again)."""
    metrics = Metrics()
    loop = DecodeLoop("fake", FakeModel(), metrics, 64, 0.0, 256, False, prefill_batch=2)
    streams = [_queue(loop, p) for p in ([1, 2], [3, 4, 5, 6], [7, 8])]
    base = time.perf_counter()
    for i, stream in enumerate(streams):
        stream.started = base - 10.0 * (i + 1)  # arrived 10, 20 and 30 s ago

    def waits() -> tuple[float, float]:
        sample = {x.name: x.value for x in metrics.queue_wait.collect()[0].samples}
        return sample["rnnserve_queue_wait_seconds_count"], sample[
            "rnnserve_queue_wait_seconds_sum"
        ]

    # each wait is its arrival's age plus the time since `base`, which a busy machine may make
    # long: bounded by the time measured, not by a guess
    _turns(loop, 1)  # the first two prompts: one ends, the 4-token one goes to the back
    since = time.perf_counter() - base
    count, total = waits()
    assert count == 2 and 30.0 <= total <= 30.0 + 2 * since
    _turns(loop, 2)  # the third prompt's first call, then the rest of the second
    since = time.perf_counter() - base
    count, total = waits()
    assert count == 3 and 60.0 <= total <= 60.0 + 3 * since


def test_long_prompts_prefill_in_chunks_between_decode_steps() -> None:
    loop = _loop(chunk=4, threaded=False)
    running = _queue(loop, [0])
    _turns(loop, 1)  # prefill [1, 1] + a step [1, 1]
    _queue(loop, list(range(10)))
    _turns(loop, 3)
    # each turn: at most 4 prompt tokens, then the running stream's step
    assert loop.model.calls[2:] == [(1, 4), (1, 1), (1, 4), (1, 1), (1, 2), (2, 1)]
    assert _news(loop)[id(running)] == [1, 2, 3, 4, 5]


def test_a_prompt_whose_caller_left_is_skipped() -> None:
    loop = _loop(threaded=False)
    gone = _queue(loop, [1, 2])
    _queue(loop, [3, 4])
    gone.cancel()
    _turns(loop, 1)
    assert loop.model.calls[0] == (1, 2)


def test_max_tokens_and_eos_leave_inside_the_thread() -> None:
    loop = _loop(FakeModel(eos=True), threaded=False)
    short = _queue(loop, [0], max_tokens=3)
    to_eos = _queue(loop, [5], max_tokens=100)
    _turns(loop, 4)
    news = _news(loop)
    assert news[id(short)] == [1, 2, 3]
    assert news[id(to_eos)] == [6, 7, 8, 9]  # 9 is <eos>
    assert loop.live == 0


# -- --decode-process 1: the parent side, with the child's pipe and process faked ----------


class _Pipe:
    """The parent's end of a child's socketpair: keeps what is sent; `broken`: the child is
    gone (a send fails as on a socket whose peer closed)."""

    def __init__(self, broken: bool = False) -> None:
        self.sent: list[tuple] = []
        self.broken = broken

    def send(self, message: tuple) -> None:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        self.sent.append(message)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class _Child:
    """A child process that closed its pipe and has not exited yet."""

    pid = 4242

    def __init__(self) -> None:
        self.waited = threading.Event()

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        self.waited.set()
        return 0

    def kill(self) -> None:
        pass


def _process(pipe: _Pipe, child: _Child) -> DecodeProcess:
    """A DecodeProcess whose child is `child` on `pipe`; `start` gives it a fresh pair."""
    proc = DecodeProcess("fake", FakeModel(), Metrics(), LoopConfig(64, 0.0, 256, True))
    proc._process, proc._conn = child, pipe
    proc.fresh = []

    def start() -> None:
        proc._process, proc._conn = _Child(), _Pipe()
        proc.fresh.append(proc._conn)

    proc.start = start
    return proc


def test_decode_process_rows_behind_a_failed_send_join_a_new_child() -> None:
    """The child died before the parent read its EOF: the join that finds out fails with it;
    the rows after it go to a new child instead of waiting for none."""
    proc = _process(_Pipe(broken=True), _Child())
    rows = []
    for sid in range(3):
        stream = _stream(10)
        proc._sids[id(stream)] = sid
        rows.append((Slot(stream, [], None, 9, count=1), FakeModel().initial_state(1), 1, 0.0))
    proc._join(rows)
    with pytest.raises(EngineUnavailable):
        asyncio.run(_collect(rows[0][0].stream))
    assert [[m[:2] for m in pipe.sent] for pipe in proc.fresh] == [[("join", 1), ("join", 2)]]
    assert set(proc._streams) == {1, 2}


def test_decode_process_reaps_a_child_that_closed_its_pipe_before_exiting() -> None:
    child = _Child()
    proc = _process(_Pipe(), child)
    proc._child_exited()
    assert child.waited.wait(10), "the exited child is waited for (no zombie)"
    assert proc._process is None and proc.live == 0


def test_a_stream_of_the_decode_process_that_fails_while_handed_tokens_fails_alone() -> None:
    """As in the decode loop: one stream raising while it takes its tokens (its text cannot
    be decoded) fails that stream and cancels it in the child; the others of the same
    delivery still get their tokens and their end."""

    def undecodable(token: int) -> str:
        raise KeyError(token)

    async def main():
        pipe = _Pipe()
        proc = _process(pipe, _Child())
        bad = Stream(model="fake", sampler=Sampler(SamplingParams()),
                     stopper=StopChecker(5), decode=undecodable, signer=None, started=0.0,
                     deadline=None)  # fmt: skip
        good = _stream(3)
        for sid, stream in enumerate((bad, good)):
            proc._sids[id(stream)], proc._streams[sid] = sid, stream
        proc._deliver([(0, [1], [0.0], [0.0], [], None, False),
                       (1, [1, 2, 3], [0.0] * 3, [0.0] * 3, [], None, True)])  # fmt: skip
        with pytest.raises(KeyError):
            await asyncio.wait_for(_collect(bad), 10)
        return await asyncio.wait_for(_collect(good), 10), good, pipe.sent

    ids, good, sent = asyncio.run(main())
    assert ids == [1, 2, 3] and good.finish_reason == "length"
    assert ("cancel", 0) in sent  # the child stops stepping the failed stream
