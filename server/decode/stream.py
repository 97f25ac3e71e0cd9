"""One Generate stream: its sampler and stop rules, and a bounded, coalescing output buffer.

The scheduler pushes tokens without ever waiting; the RPC handler takes whatever has
accumulated as one message. A slow reader therefore gets several tokens per message and
never holds up the batch, and each stream buffers at most two pending messages (whose size
is bounded by max_tokens).

Checkpoints (`state_every`): when a stream's token count reaches a multiple of N, the message
is cut there and carries a resume token that continues after its last token; later tokens go
to the next message. So a message's `state` always means "the stream after this message", and
a client that holds it knows exactly which tokens it covers. The decode thread copies a
stream's state only for the tokens that need one (`snapshots`), not on every step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server.resume import Progress
from rnnserve.server.sampling import Sampler
from rnnserve.server.stopping import StopChecker

# (state, last token, progress: set on checkpoints, None on the end state) -> resume token
StateSigner = Callable[[list[np.ndarray], int, Progress | None], bytes]


@dataclass
class Chunk:
    """What one GenerateResponse carries."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprob: float = 0.0
    finish_reason: str | None = None
    state: bytes = b""
    # the last message of a stream the model ended (finish "eos"): the end-of-sequence
    # token's logprob, which `logprob` leaves out as `token_ids` leave out its id; not sent
    # over gRPC (GenerateResponse has no field for it), OpenAI streams list it as `<eos>`
    eos_logprob: float | None = None


class OutputBuffer:
    """Pending messages: at most one sealed at a checkpoint, then one open; pushes coalesce
    into the open one, `next()` takes the oldest."""

    def __init__(self) -> None:
        self._sealed: Chunk | None = None  # ends at a checkpoint; carries its state
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

    def seal(self, state: bytes) -> None:
        """Ends the open message at a checkpoint with `state`, the stream after its last
        token. A message sealed earlier and not yet taken absorbs it (the newer state covers
        both), so a slow reader still holds at most two messages."""
        chunk = self._pending or Chunk()
        self._pending = None
        chunk.state = state
        self._sealed = _merge(self._sealed, chunk) if self._sealed else chunk
        self._event.set()

    def finish(self, reason: str, state: bytes = b"", eos_logprob: float | None = None) -> None:
        """The last message gets the reason (and `eos_logprob`, for a stream the model
        ended); with a final `state` everything pending goes out as one message (the state
        follows its last token)."""
        chunk = self._pending or Chunk()
        if self._sealed is not None and (state or not (chunk.token_ids or chunk.text)):
            chunk, self._sealed = _merge(self._sealed, chunk), None
        chunk.finish_reason, chunk.state = reason, state or chunk.state
        chunk.eos_logprob = eos_logprob
        self._pending = chunk
        self._closed = True
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error, self._closed = error, True
        self._event.set()

    async def next(self) -> Chunk | None:
        """The next message, or None once the stream is over and everything was taken."""
        while True:
            if self._sealed is not None:
                chunk, self._sealed = self._sealed, None
                if self._pending is None:
                    self._event.clear()
                return chunk
            if self._pending is not None:
                chunk, self._pending = self._pending, None
                self._event.clear()
                return chunk
            if self._error is not None:
                raise self._error
            if self._closed:
                return None
            await self._event.wait()


def wants_state(count: int, every: int, end_state: bool, max_tokens: int) -> bool:
    """Whether the state after token number `count` (from the original request) must be
    copied for a stream that signs states: every token for return_state, else checkpoints
    and the last token max_tokens allows."""
    return end_state or (every > 0 and count % every == 0) or count == max_tokens


def _merge(first: Chunk, then: Chunk) -> Chunk:
    """`first` followed by `then` as one message (the later state, if any)."""
    first.token_ids += then.token_ids
    first.text += then.text
    first.logprob += then.logprob
    first.state = then.state or first.state
    return first


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
        state_every: int = 0,
        end_state: bool = False,
    ) -> None:
        self.model = model
        self.sampler = sampler
        self.stopper = stopper
        self.decode = decode
        self.signer = signer
        # checkpoint every this many tokens (counted from the original request; 0: none)
        self.state_every = state_every if signer is not None else 0
        # the end state whatever ends the stream (return_state): a state copy per token
        self.end_state = end_state and signer is not None
        # (token count, state after that token), appended by the decode thread only where a
        # checkpoint or the end needs one (`wants_state`), taken here
        self.snapshots: deque[tuple[int, list[np.ndarray]]] = deque()
        self.started = started  # perf_counter() at request arrival
        self.deadline = deadline  # perf_counter() deadline, or None
        self.on_tokens = on_tokens  # (stream, when each new token was made), before counting
        self.buffer = OutputBuffer()
        self.last_token = -1  # sampled, not yet fed to the model
        self.last_time = started
        self.tokens = 0
        self.finished = False
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None  # the decode loop's, if it must know
        self._pending_reason = ""
        self._eos_logprob: float | None = None  # of the end-of-sequence token that ended it

    @property
    def finish_reason(self) -> str | None:
        """length, stop or eos once the stream finished; None while it runs or if aborted."""
        return self._pending_reason if self.finished else None

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def cancel(self) -> None:
        """Called when the client goes away; the scheduler drops the stream by its next step."""
        if not self.cancelled and self.on_cancel is not None:
            self.on_cancel()
        self.cancelled = True

    def wants_state(self, count: int) -> bool:
        """Decode thread: whether the state after token number `count` must be copied."""
        if self.signer is None:
            return False
        return wants_state(count, self.state_every, self.end_state, self.stopper.max_tokens)

    def accept_run(self, token_ids: list[int], logprobs: list[float], times: list[float]) -> int:
        """Records consecutive tokens (with their logprobs and the perf_counter() each was made
        at) up to the one that finishes the stream; returns how many were taken. One call per
        hand-over keeps the event loop's work per stream, not per token. A run that crosses
        a checkpoint is cut there: the message so far is sealed with the resume state."""
        taken, every = 0, self.state_every
        while taken < len(token_ids) and not self.finished:
            end = len(token_ids)
            if every:
                end = min(end, taken + every - self.stopper.count % every)
            taken += self._accept(token_ids[taken:end], logprobs[taken:end], times[taken:end])
            if every and not self.finished and self.stopper.count % every == 0:
                state = self._snapshot(self.stopper.count)
                if state is not None:
                    self.buffer.seal(self._sign(state))
        while self.snapshots and self.snapshots[0][0] < self.stopper.count:
            self.snapshots.popleft()  # copies for tokens already passed (return_state streams)
        return taken

    def _accept(self, token_ids: list[int], logprobs: list[float], times: list[float]) -> int:
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
            if reason == "eos":  # not shown, but generated: the last message carries it
                self._eos_logprob = logprobs[n - 1]
        return n

    def _snapshot(self, count: int) -> list[np.ndarray] | None:
        """The state the decode thread copied after token `count`, if it copied one."""
        while self.snapshots and self.snapshots[0][0] < count:
            self.snapshots.popleft()
        if self.snapshots and self.snapshots[0][0] == count:
            return self.snapshots.popleft()[1]
        return None

    def progress(self) -> Progress:
        """Where the stream stands now (after its last accepted token)."""
        sampling, stopper = self.sampler.params, self.stopper
        return Progress(
            tokens=stopper.count,
            max_tokens=stopper.max_tokens,
            seed=self.sampler.seed,
            # each sampled token uses exactly one uniform of the stream's sequence
            uniforms=self.sampler.start + (0 if sampling.greedy else self.tokens),
            held=stopper._held,  # the checker's held-back text is part of its state
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            stop=tuple(stopper.stop),
        )

    def _sign(self, state: list[np.ndarray]) -> bytes:
        assert self.signer is not None
        return self.signer(state, self.last_token, self.progress())

    def close(self) -> None:
        """Ends a finished stream: the last message gets the reason (and the logprob of the
        end-of-sequence token that ended it) and, when the decode thread copied the state
        after the last token, the resume state. That one carries no progress: a finished
        stream is not continued but started again from its state (with the next request's
        own max_tokens and sampling)."""
        token = b""
        if self.signer is not None:
            state = self._snapshot(self.stopper.count)
            if state is not None:
                token = self.signer(state, self.last_token, None)
        self.buffer.finish(self._pending_reason, token, self._eos_logprob)
