"""Continuous batching: one asyncio task per model version steps every live stream together.

A stream is admitted (bounded: past --max-streams the call is refused, never queued),
prefilled on its own (one ORT call over its prompt), and then joins the running batch at the
next step. Each step feeds every live stream's last token as one [batch, 1] ORT call (or
one call per --max-batch chunk) off the event loop, samples each stream's next token with
its own RNG, and drops streams that finished, were cancelled or ran past their deadline.
Batch state follows TGI's filter/concatenate: rows are taken out along each state tensor's
batch axis when streams leave and concatenated when they join.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, Overloaded, ShuttingDown
from server.metrics import Metrics
from server.runtime import OnnxModel, Runtime, State, log_softmax
from server.stream import Stream

log = logging.getLogger(__name__)


class StreamLimiter:
    """Server-wide count of admitted streams, bounded by --max-streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.closed = False

    def acquire(self) -> None:
        if self.closed:
            raise ShuttingDown("the server is shutting down")
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} streams are live (--max-streams {self.limit}); retry later"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


@dataclass
class StepResult:
    """What a trip to the ORT thread produced for one batch."""

    tokens: np.ndarray  # [steps, batch] int64
    logprobs: np.ndarray  # [steps, batch] float32, of the chosen tokens
    state: State  # after the last step
    snapshots: dict[int, list[State]]  # row -> state after each step (resume-token streams)


@dataclass
class Batch:
    """Streams stepped by one ORT call, and their stacked state."""

    streams: list[Stream] = field(default_factory=list)
    state: State = field(default_factory=list)


class Scheduler:
    """Owns the decode loop of one model version."""

    def __init__(
        self,
        name: str,
        model: OnnxModel,
        runtime: Runtime,
        limiter: StreamLimiter,
        metrics: Metrics,
        max_batch: int,
        decode_steps: int = 1,
    ) -> None:
        self.name = name
        self.model = model
        self.runtime = runtime
        self.limiter = limiter
        self.metrics = metrics
        self.max_batch = max_batch
        self.decode_steps = decode_steps
        self.batches: list[Batch] = []
        self.pending: list[tuple[Stream, State]] = []
        self.admitted = 0  # prefilling + pending + in a batch
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._gauge = metrics.live_streams.labels(model=name)

    # -- admission --------------------------------------------------------------------------
    def admit(self) -> None:
        """Takes a slot or raises Overloaded / ShuttingDown."""
        self.limiter.acquire()
        self.admitted += 1
        self._idle.clear()
        self._gauge.inc()

    def release(self) -> None:
        self.limiter.release()
        self.admitted -= 1
        self._gauge.dec()
        if self.admitted == 0:
            self._idle.set()

    @property
    def live(self) -> int:
        """Streams currently in a batch (the slots a step works on)."""
        return sum(len(b.streams) for b in self.batches)

    async def prefill(self, ids: list[int], state: State | None) -> tuple[np.ndarray, State]:
        """Runs a prompt [1, time] from `state` (fresh if None) -> (logprobs [vocab], state)."""
        x = np.asarray([ids], dtype=np.int64)  # [1, time]
        start = state if state is not None else self.model.initial_state(1)
        return await self.runtime.call(self._prefill_sync, x, start)

    def _prefill_sync(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        logits, state = self.model.run(x, state)  # [1, time, vocab]
        return log_softmax(logits[0, -1]), state

    def join(self, stream: Stream, state: State) -> None:
        """Queues a prefilled stream; it is stepped from the next step on."""
        stream.joined_at = time.perf_counter()
        self.pending.append((stream, state))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"scheduler:{self.name}"
            )

    async def drain(self) -> None:
        """Waits until every admitted stream has left (hot reload, shutdown)."""
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._admit_pending()
            self._filter()
            if not self.batches:
                self._wake.clear()
                await self._wake.wait()
                continue
            batches = list(self.batches)
            k = self._steps_per_trip()
            try:
                results = await self.runtime.call(self._step_sync, batches, k)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed step fails its streams, never the loop
                log.exception("decode step failed for %s", self.name)
                for batch in batches:
                    for s in batch.streams:
                        s.buffer.fail(exc)
                        s.finished = True
                continue
            for batch, result in zip(batches, results, strict=True):
                self._advance(batch, result)

    def _steps_per_trip(self) -> int:
        """1 step per trip for a few streams (lowest latency); up to --decode-steps under load,
        so the event loop sends fewer, larger messages instead of one per token per stream."""
        return max(1, min(self.decode_steps, self.live // 8))

    def _step_sync(self, batches: list[Batch], k: int) -> list[StepResult]:
        """Worker thread: k decode steps per batch, one ORT call each, tokens picked here.

        Samplers are only touched by this thread while a step runs, so each stream's RNG
        still draws once per token in order. Streams that want a resume token get a state
        snapshot after every step (they may stop at any of them).
        """
        return [self._decode(batch, k) for batch in batches]

    def _decode(self, batch: Batch, k: int) -> StepResult:
        streams = batch.streams
        n = len(streams)
        tokens = np.empty((k, n), dtype=np.int64)  # [steps, batch]
        logps = np.empty((k, n), dtype=np.float32)
        snaps: dict[int, list[State]] = {i: [] for i, s in enumerate(streams) if s.signer}
        sampled = [i for i, s in enumerate(streams) if not s.sampler.params.greedy]
        x = np.fromiter((s.last_token for s in streams), dtype=np.int64, count=n)[:, None]
        state = batch.state
        for j in range(k):
            start = time.perf_counter()
            logits, state = self.model.run(x, state)  # [batch, 1, vocab]
            lp = log_softmax(logits[:, -1, :])  # [batch, vocab]
            tokens[j] = np.argmax(lp, axis=-1)  # greedy; ties to the lowest id
            for i in sampled:
                if not streams[i].done:
                    tokens[j, i] = streams[i].sampler.pick(lp[i])
            logps[j] = lp[np.arange(n), tokens[j]]
            for i, kept in snaps.items():
                kept.append(self.model.take(state, i))
            x = tokens[j][:, None]
            self.metrics.step_duration.labels(model=self.name).observe(time.perf_counter() - start)
            self.metrics.batch_size.labels(model=self.name).observe(n)
        return StepResult(tokens, logps, state, snaps)

    def _advance(self, batch: Batch, result: StepResult) -> None:
        """Hands each stream its tokens; finished streams get their final message."""
        batch.state = result.state
        for i, stream in enumerate(batch.streams):
            for j in range(result.tokens.shape[0]):
                if stream.done:
                    break
                if stream.accept(int(result.tokens[j, i]), float(result.logprobs[j, i])):
                    stream.close(result.snapshots[i][j] if stream.signer else None)

    def _admit_pending(self) -> None:
        now = time.perf_counter()
        for stream, state in self.pending:
            if stream.done:
                self.release()
                continue
            self.metrics.queue_wait.labels(model=self.name).observe(now - stream.joined_at)
            target = next((b for b in self.batches if len(b.streams) < self.max_batch), None)
            if target is None:
                target = Batch()
                self.batches.append(target)
            if target.streams:
                target.state = self.model.concat([target.state, state])
            else:
                target.state = list(state)
            target.streams.append(stream)
        self.pending.clear()

    def _filter(self) -> None:
        """Drops finished, cancelled and expired streams; their slots are free from now on."""
        now = time.perf_counter()
        kept: list[Batch] = []
        for batch in self.batches:
            keep = []
            for i, s in enumerate(batch.streams):
                if not s.done and s.expired(now):
                    s.cancel()
                    s.buffer.fail(DeadlineExceeded("the call's deadline passed"))
                if s.done:
                    self.release()
                else:
                    keep.append(i)
            if len(keep) == len(batch.streams):
                kept.append(batch)
            elif keep:
                streams = [batch.streams[i] for i in keep]
                kept.append(Batch(streams, self.model.take(batch.state, keep)))
        self.batches = kept
