"""The worker-thread side of a decode trip: one batch's steps, and the tokens they made.

Each step is one ORT call [batch, 1] and one token per stream, picked by the decode head
inside that call when the model has one, else in numpy. Tokens, logprobs, the step's end time
and (for streams that asked for a resume state) the state after each step accumulate until
the scheduler hands them to the event loop as one `StepResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import Histogram

from rnnserve.server.decode_head import RowParams
from rnnserve.server.metrics import observe_many
from rnnserve.server.runtime import OnnxModel, State, log_softmax
from rnnserve.server.sampling import choose_tokens
from rnnserve.server.stream import Stream


@dataclass
class StepResult:
    """Tokens of one batch from consecutive steps, handed to the event loop at once."""

    tokens: np.ndarray  # [steps, batch] int64
    logprobs: np.ndarray  # [steps, batch] float32, of the chosen tokens
    times: list[float]  # perf_counter() at the end of each step: when its tokens existed
    snapshots: dict[int, list[State]]  # row -> state after each step (resume-token streams)


class TripRows:
    """One batch during a trip: its input, state, and the tokens not yet handed over."""

    def __init__(
        self,
        model: OnnxModel,
        streams: list[Stream],
        state: State,
        steps: int,
        step_seconds: Histogram,
        batch_size: Histogram,
    ) -> None:
        """`steps`: the most steps this trip may run (uniforms are peeked for that many)."""
        self.model = model
        self.streams = streams
        self.state = state
        self._step_seconds, self._batch_size = step_seconds, batch_size
        n = len(streams)
        self.x = np.fromiter((s.last_token for s in streams), dtype=np.int64, count=n)[:, None]
        self.sampled = [i for i, s in enumerate(streams) if not s.sampler.params.greedy]
        self.head: RowParams | None = None
        if model.has_head:
            vocab = len(model.manifest.vocab)
            self.head = RowParams.of([s.sampler.params for s in streams], vocab)
            self._uniforms = np.zeros((steps, n), dtype=np.float64)  # [step, row]
            for i in self.sampled:
                self._uniforms[:, i] = streams[i].sampler.peek(steps)
        self.steps = 0
        self.signed = [i for i, s in enumerate(streams) if s.signer]
        self._clear()

    def _clear(self) -> None:
        self.times: list[float] = []
        self.durations: list[float] = []
        self.tokens: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.snapshots: dict[int, list[State]] = {i: [] for i in self.signed}

    def step(self) -> None:
        """One ORT call [batch, 1] and one token per stream."""
        streams = self.streams
        start = time.perf_counter()
        self.steps += 1
        if self.head is not None:
            tokens, logprobs, self.state = self._pick_in_graph()
        else:
            tokens, logprobs, self.state = self._pick_in_numpy(streams)
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)
        for i, kept in self.snapshots.items():
            kept.append(self.model.take(self.state, i))
        self.x = tokens[:, None]
        self.times.append(time.perf_counter())
        self.durations.append(self.times[-1] - start)

    def _pick_in_graph(self) -> tuple[np.ndarray, np.ndarray, State]:
        """The decode head picks the tokens inside the ORT call (GIL released), with each
        sampled stream's next uniform, peeked for the whole trip at its start."""
        uniform = self._uniforms[self.steps - 1]
        return self.model.decode(self.x, self.state, self.head, uniform)

    def use_uniforms(self) -> None:
        """Trip end: each sampled stream used one peeked uniform per step run."""
        if self.head is not None:
            for i in self.sampled:
                self.streams[i].sampler.use(self.steps)

    def _pick_in_numpy(self, streams: list[Stream]) -> tuple[np.ndarray, np.ndarray, State]:
        logits, state = self.model.run(self.x, self.state)  # [batch, 1, vocab]
        lp = log_softmax(logits[:, -1, :])  # [batch, vocab]
        tokens = choose_tokens(lp, [None if s.done else s.sampler for s in streams])
        return tokens, lp[np.arange(len(tokens)), tokens], state

    def flush(self) -> StepResult:
        """The tokens since the last flush, as [steps, batch]; records the steps' metrics."""
        observe_many(self._step_seconds, self.durations)
        observe_many(self._batch_size, [len(self.streams)] * len(self.durations))
        result = StepResult(
            np.stack(self.tokens), np.stack(self.logprobs), self.times, self.snapshots
        )
        self._clear()
        return result
