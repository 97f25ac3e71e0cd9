"""Prefill batching: the prompts of streams that arrive together run as one ONNX Runtime call
per prompt length, instead of one call (and one thread hop) each.

Why: when many Generate calls arrive at once, each prefill queued on its own behind the
others and behind the decode trips; time to first token grew with the queue. Rows of equal
length stack without padding, so a recurrent state never sees a pad token; different
lengths run as separate calls, concurrently. Each prompt's first token is picked in the
same call (by the decode head when the graph has one), so the event loop never samples.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from rnnserve.server.decode_head import RowParams
from rnnserve.server.runtime import OnnxModel, Runtime, State, log_softmax
from rnnserve.server.sampling import Sampler, choose_tokens


@dataclass
class _Prompt:
    ids: list[int]
    state: State | None  # None: the model's initial state
    sampler: Sampler
    done: asyncio.Future


class PrefillBatcher:
    """Collects prompts while a round of prefills runs; the next round batches them."""

    def __init__(self, model: OnnxModel, runtime: Runtime, max_batch: int) -> None:
        self.model = model
        self.runtime = runtime
        self.max_batch = max_batch
        self._waiting: list[_Prompt] = []
        self._task: asyncio.Task | None = None

    async def prefill(
        self, ids: list[int], state: State | None, sampler: Sampler
    ) -> tuple[int, float, State]:
        """Runs a prompt from `state` (fresh if None) -> (the first token, picked by
        `sampler`, its logprob, state [batch of 1] after the prompt)."""
        loop = asyncio.get_running_loop()
        prompt = _Prompt(list(ids), state, sampler, loop.create_future())
        self._waiting.append(prompt)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._rounds(), name="prefill")
        return await prompt.done

    async def _rounds(self) -> None:
        while self._waiting:
            prompts, self._waiting = self._waiting, []
            await asyncio.gather(*[self._run(group) for group in self.groups(prompts)])

    def groups(self, prompts: list[_Prompt]) -> list[list[_Prompt]]:
        """Equal-length prompts together, at most max_batch per call, in arrival order."""
        by_length: dict[int, list[_Prompt]] = {}
        for p in prompts:
            if not p.done.done():  # its caller went away
                by_length.setdefault(len(p.ids), []).append(p)
        return [
            same[i : i + self.max_batch]
            for same in by_length.values()
            for i in range(0, len(same), self.max_batch)
        ]

    async def _run(self, group: list[_Prompt]) -> None:
        x = np.asarray([p.ids for p in group], dtype=np.int64)  # [rows, time]
        fresh = self.model.initial_state(1)
        start = self.model.concat([p.state if p.state is not None else fresh for p in group])
        samplers = [p.sampler for p in group]
        try:
            tokens, logprobs, states = await self.runtime.call(self._run_sync, x, start, samplers)
        except Exception as exc:
            for p in group:
                if not p.done.done():
                    p.done.set_exception(exc)
            return
        for row, p in enumerate(group):
            if not p.done.done():
                p.done.set_result((int(tokens[row]), float(logprobs[row]), states[row]))

    def _run_sync(
        self, x: np.ndarray, state: State, samplers: list[Sampler]
    ) -> tuple[np.ndarray, np.ndarray, list[State]]:
        """Worker thread: [rows, time] -> first tokens [rows], their logprobs, states."""
        if self.model.has_head:
            vocab = len(self.model.manifest.vocab)
            rows = RowParams.of([s.params for s in samplers], vocab)
            uniform = np.array([0.0 if s.params.greedy else s.uniform() for s in samplers])
            tokens, logprobs, state = self.model.decode(x, state, rows, uniform)
            return tokens, logprobs, self.model.split(state)
        logits, state = self.model.run(x, state)  # [rows, time, vocab]
        lp = log_softmax(logits[:, -1])  # [rows, vocab]
        tokens = choose_tokens(lp, list(samplers))
        return tokens, lp[np.arange(len(tokens)), tokens], self.model.split(state)
