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

from server.errors import Overloaded, ShuttingDown
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
    ) -> None:
        self.name = name
        self.model = model
        self.runtime = runtime
        self.limiter = limiter
        self.metrics = metrics
        self.max_batch = max_batch
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
            try:
                results = await self.runtime.call(self._step_sync, batches)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed step fails its streams, never the loop
                log.exception("decode step failed for %s", self.name)
                for batch in batches:
                    for s in batch.streams:
                        s.buffer.fail(exc)
                        s.finished = True
                continue
            for batch, (logprobs, state) in zip(batches, results, strict=True):
                batch.state = state
                self._advance(batch, logprobs)

    def _step_sync(self, batches: list[Batch]) -> list[tuple[np.ndarray, State]]:
        """Runs in a worker thread: one ORT call per batch -> (logprobs [batch, vocab], state)."""
        out = []
        for batch in batches:
            start = time.perf_counter()
            x = np.fromiter((s.last_token for s in batch.streams), dtype=np.int64)[:, None]
            logits, state = self.model.run(x, batch.state)  # [batch, 1, vocab]
            out.append((log_softmax(logits[:, -1, :]), state))
            self.metrics.step_duration.labels(model=self.name).observe(time.perf_counter() - start)
            self.metrics.batch_size.labels(model=self.name).observe(len(batch.streams))
        return out

    def _advance(self, batch: Batch, logprobs: np.ndarray) -> None:
        """Samples each stream's next token; finished streams get their final message."""
        greedy = np.argmax(logprobs, axis=-1)  # [batch]; ties to the lowest id
        for i, stream in enumerate(batch.streams):
            if stream.done:
                continue
            row = logprobs[i]
            token = int(greedy[i]) if stream.sampler.params.greedy else stream.sampler.pick(row)
            if stream.accept(token, row):
                state = self.model.take(batch.state, i) if stream.signer else None
                stream.close(state)

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
