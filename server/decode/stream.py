"""One Generate stream: its sampler and stop rules, and a bounded, coalescing output buffer.

The scheduler pushes tokens without ever waiting; the RPC handler takes whatever has
accumulated as one message. A slow reader therefore gets several tokens per message and
never holds up the batch, and each stream buffers at most one pending message (whose size
is bounded by max_tokens).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server.sampling import Sampler
from rnnserve.server.stopping import StopChecker

StateSigner = Callable[[list[np.ndarray], int], bytes]


@dataclass
class Chunk:
    """What one GenerateResponse carries."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprob: float = 0.0
    finish_reason: str | None = None
    state: bytes = b""


class OutputBuffer:
    """At most one pending Chunk; pushes coalesce into it, `next()` takes it."""

    def __init__(self) -> None:
        self._pending: Chunk | None = None
        self._event = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None

    def push(self, token_ids: list[int], text: str, logprob: float) -> None:
        """Adds tokens (and their summed logprob) and text to the pending message."""
        chunk = self._pending or Chunk()
        chunk.token_ids += token_ids
        chunk.logprob += logprob
        chunk.text += text
        self._pending = chunk
        self._event.set()

    def finish(self, reason: str, state: bytes = b"") -> None:
        chunk = self._pending or Chunk()
        chunk.finish_reason, chunk.state = reason, state
        self._pending = chunk
        self._closed = True
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error, self._closed = error, True
        self._event.set()

    async def next(self) -> Chunk | None:
        """The next message, or None once the stream is over and everything was taken."""
        while True:
            if self._pending is not None:
                chunk, self._pending = self._pending, None
                self._event.clear()
                return chunk
            if self._error is not None:
                raise self._error
            if self._closed:
                return None
            await self._event.wait()


class Stream:
    """A live Generate call as the scheduler sees it."""

    def __init__(
        self,
        *,
        model: str,
        sampler: Sampler,
        stopper: StopChecker,
        decode: Callable[[int], str],
        signer: StateSigner | None,
        started: float,
        deadline: float | None,
        on_tokens: Callable[[Stream, list[float]], None] | None = None,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.stopper = stopper
        self.decode = decode
        self.signer = signer
        self.started = started  # perf_counter() at request arrival
        self.deadline = deadline  # perf_counter() deadline, or None
        self.on_tokens = on_tokens  # (stream, when each new token was made), before counting
        self.buffer = OutputBuffer()
        self.last_token = -1  # sampled, not yet fed to the model
        self.last_time = started
        self.tokens = 0
        self.finished = False
        self.cancelled = False
        self.joined_at = 0.0
        self._pending_reason = ""

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def cancel(self) -> None:
        """Called when the client goes away; the scheduler drops the stream by its next step."""
        self.cancelled = True

    def accept(self, token_id: int, logprob: float, at: float | None = None) -> bool:
        """Records one sampled token made at perf_counter() `at` (now if None); True when the
        stream finished."""
        self.accept_run([token_id], [logprob], [time.perf_counter() if at is None else at])
        return self.finished

    def accept_run(self, token_ids: list[int], logprobs: list[float], times: list[float]) -> int:
        """Records consecutive tokens (with their logprobs and the perf_counter() each was made
        at) up to the one that finishes the stream; returns how many were taken. One call per
        hand-over keeps the event loop's work per stream, not per token."""
        n, text, reason = self.stopper.feed_run(token_ids, [self.decode(t) for t in token_ids])
        shown = n - 1 if reason == "eos" else n  # the end-of-sequence token is not shown
        if shown or text:
            self.buffer.push(token_ids[:shown], text, sum(logprobs[:shown]))
        if self.on_tokens:
            self.on_tokens(self, times[:n])
        self.last_token = token_ids[n - 1]
        self.tokens += n
        self.last_time = times[n - 1]
        if reason is not None:
            self.finished = True
            self._pending_reason = reason
        return n

    def close(self, state: list[np.ndarray] | None) -> None:
        """Ends a finished stream: the last message gets the reason and, if asked, the state."""
        token = b""
        if self.signer is not None and state is not None:
            token = self.signer(state, self.last_token)
        self.buffer.finish(self._pending_reason, token)
