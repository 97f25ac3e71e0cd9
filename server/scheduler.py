"""Continuous batching: one asyncio task per model version steps every live stream together.

A stream is admitted (bounded: past --max-streams the call is refused, never queued),
prefilled (server/prefill.py: with the prompts of its length that arrive alongside), and then
joins the running batch at the next step. Each step feeds every live stream's last token as
one [batch, 1] ORT call (or one call per --max-batch chunk) off the event loop and picks each
stream's next token with its own uniforms (server/trip.py). Steps run back to back in the ORT
thread (a "trip") until the batch has to change; tokens are handed to the event loop every
few steps, not at the trip's end.
Batch state follows TGI's filter/concatenate: rows are taken out along each state tensor's
batch axis when streams leave and concatenated when they join."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from rnnserve.server.errors import DeadlineExceeded, Overloaded, ShuttingDown
from rnnserve.server.metrics import Metrics
from rnnserve.server.prefill import PrefillBatcher
from rnnserve.server.runtime import OnnxModel, Runtime, State
from rnnserve.server.sampling import Sampler
from rnnserve.server.stream import Stream
from rnnserve.server.trip import StepResult, TripRows

log = logging.getLogger(__name__)

HAND_EVERY_MAX = 64  # steps: a message per stream at least this often under any load


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
        decode_steps: int = 1,
        stream_interval: float = 0.0,
    ) -> None:
        self.name = name
        self.model = model
        self.runtime = runtime
        self.limiter = limiter
        self.metrics = metrics
        self.max_batch = max_batch
        self.decode_steps = decode_steps
        self.stream_interval = stream_interval  # seconds
        self.batches: list[Batch] = []
        self._prefills = PrefillBatcher(model, runtime, max_batch)
        self.pending: list[tuple[Stream, State]] = []
        self.admitted = 0  # prefilling + pending + in a batch
        self._wake = asyncio.Event()
        self._outbox: deque[tuple[list[Stream], StepResult]] = deque()  # worker -> loop
        self._wake_pending = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._gauge = metrics.live_streams.labels(model=name)
        self._step_seconds = metrics.step_duration.labels(model=name)
        self._batch_size = metrics.batch_size.labels(model=name)
        self._generated = metrics.generated_tokens.labels(model=name)

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

    async def prefill(
        self, ids: list[int], state: State | None, sampler: Sampler
    ) -> tuple[int, float, State]:
        """Runs a prompt from `state` (fresh if None) -> (first token, its logprob, state),
        batched with the prompts of equal length that arrive at the same time."""
        return await self._prefills.prefill(ids, state, sampler)

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
        self._closed = True  # a trip still running in the ORT thread stops after its step
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit_pending()
            self._filter()
            if not self.batches:
                self._wake.clear()
                await self._wake.wait()
                continue
            batches = list(self.batches)
            try:
                states = await self.runtime.call(self._trip, loop, batches)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed step fails its streams, never the loop
                log.exception("decode step failed for %s", self.name)
                for batch in batches:
                    for s in batch.streams:
                        s.buffer.fail(exc)
                        s.finished = True
                continue
            for batch, state in zip(batches, states, strict=True):
                batch.state = state

    def _trip(self, loop: asyncio.AbstractEventLoop, batches: list[Batch]) -> list[State]:
        """Worker thread: decode steps back to back, one ORT call per batch each, until the
        batch must change; returns each batch's state after the last step.

        The trip ends after the step in which a stream is waiting to join, a stream left
        (finished, cancelled, past its deadline) or reaches its max_tokens, another call
        waits for an ORT thread, or after --decode-steps steps: the loop then filters and
        concatenates before the next step.
        Tokens reach the event loop every `_hand_every` steps, and at most once per
        --stream-interval-us: one gRPC message per token costs the event loop more than a
        step costs the model, and while the loop sends, this thread waits for the GIL; so a
        single stream gets a message of a few tokens every interval and streams at the
        model's pace. Samplers are only touched by this thread, so each stream's RNG still
        draws once per token in order.
        """
        streams = [s for b in batches for s in b.streams]
        hand_every = self._hand_every(len(streams))
        budget = min(s.stopper.max_tokens - s.tokens for s in streams)
        deadline = min((s.deadline for s in streams if s.deadline is not None), default=None)
        steps = max(1, min(self.decode_steps, budget))
        rows = [
            TripRows(self.model, b.streams, b.state, steps, self._step_seconds, self._batch_size)
            for b in batches
        ]
        handed = time.perf_counter()
        for step in range(1, steps + 1):
            for r in rows:
                r.step()
            now = time.perf_counter()
            end = (
                step == steps
                or bool(self.pending)
                or self._closed
                or self.runtime.queued > 0  # other work waits for an ORT thread
                or any(s.done for s in streams)
                or (deadline is not None and now >= deadline)
            )
            if end or (step % hand_every == 0 and now - handed >= self.stream_interval):
                handed = now
                for r in rows:
                    self._hand_over(loop, r.streams, r.flush())
            if end:
                break
        for r in rows:
            r.use_uniforms()
        return [r.state for r in rows]

    def _hand_over(
        self, loop: asyncio.AbstractEventLoop, streams: list[Stream], result: StepResult
    ) -> None:
        """Worker thread: queues tokens for the event loop, waking it only if no wake-up is
        already pending (each wake-up is a syscall and a GIL hand-off between the threads)."""
        self._outbox.append((streams, result))
        if not self._wake_pending and not loop.is_closed():
            self._wake_pending = True
            loop.call_soon_threadsafe(self._take_outbox)

    def _take_outbox(self) -> None:
        """Event loop: advances the streams by everything queued so far, in order."""
        self._wake_pending = False  # before draining: a later append schedules a new wake-up
        while self._outbox:
            self._advance(*self._outbox.popleft())

    def _hand_every(self, live: int) -> int:
        """Steps per hand-over to the event loop: 1 for a single stream; under load one step
        per live stream, at most HAND_EVERY_MAX. The loop's work is per message and holds the
        GIL the ORT thread needs between calls, so with many streams it sends fewer, larger
        messages; each stream still streams at the batch's pace."""
        return max(1, min(HAND_EVERY_MAX, live))

    def _advance(self, streams: list[Stream], result: StepResult) -> None:
        """Event loop: hands each stream its tokens; finished streams get their final message."""
        tokens, logprobs = result.tokens.T.tolist(), result.logprobs.T.tolist()  # [batch][steps]
        accepted = 0
        for i, stream in enumerate(streams):
            if stream.done:
                continue
            n = stream.accept_run(tokens[i], logprobs[i], result.times)
            accepted += n
            if stream.finished:
                stream.close(result.snapshots[i][n - 1] if stream.signer else None)
        self._generated.inc(accepted)

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
