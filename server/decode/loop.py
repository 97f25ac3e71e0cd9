"""The decode loop of one model version: a prefill thread and a decode thread that owns the
batch.

Everything a Generate stream goes through after admission happens here, in this order:

1. **take admissions** — the event loop tokenizes a request and appends it to a
   thread-safe inbox (`submit`); the prefill thread wakes if it was idle.
2. **prefill** (`_run_prefill`, its own thread; with prefill_thread=False the decode thread
   does it between steps) — up to `--prefill-batch` waiting prompts run as one ORT call, all
   rows aligned: every prompt advances by the shortest remaining length (at most
   `--prefill-chunk` tokens), so prompts of different lengths share calls and a long prompt
   holds the ones behind it up for at most one chunk. Small calls keep arrivals apart: one
   call for every waiting prompt makes streams that arrive together finish together and
   come back together, a convoy whose first tokens all wait for one long call. A prompt
   that ends in this call gets its first token picked in the same call, handed to the
   event loop at once (time to first token), and its row goes to the join queue. ORT
   releases the GIL, so prefill runs beside the decode steps.
3. **join** (`_run` → `_turn`, the decode thread) — prefilled rows are concatenated on.
4. **filter** — streams the event loop finished (a stop string) or cancelled (the client
   went away), and streams past their deadline, leave: their state rows are taken out.
5. **step** — one ORT call `[batch, 1]` per batch of at most `--max-batch` rows feeds every
   stream its last token and picks its next one (server/decode/choose.py). A stream that
   reaches max_tokens or end-of-sequence leaves inside the thread.
6. **hand over** — tokens go to the event loop, which only moves them into messages: new
   and finished streams at once; the rest every `live` steps (at most 64) and at most once
   per `--stream-interval-us`, because a gRPC message costs the event loop more than a
   decode step costs the model and the two share the GIL.

The event loop never decides when the batch changes, so joins and leaves cost no round
trip between threads (the trips of the previous design ended on every join or leave).
Batch state follows TGI's filter/concatenate: rows are taken out along each state tensor's
batch axis when streams leave and concatenated when they join.

Sampling stays batch-invariant: each stream uses exactly one uniform per sampled token, the
next of its own sequence (peeked in blocks per batch, marked used as they are consumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server.decode.choose import GREEDY, TokenChooser
from rnnserve.server.decode.stream import Stream
from rnnserve.server.decode_head import RowParams
from rnnserve.server.errors import DEADLINE_PASSED, DeadlineExceeded
from rnnserve.server.metrics import Metrics, observe_many, observe_repeated
from rnnserve.server.runtime import OnnxModel, State

log = logging.getLogger(__name__)

HAND_EVERY_MAX = 64  # steps: a message per stream at least this often under any load
UNIFORM_BLOCK = 64  # uniforms peeked per sampled stream at a time


@dataclass(eq=False)
class Slot:
    """A stream in the decode thread: what it feeds next and what it made since the last
    hand-over. Only the decode thread touches a slot."""

    stream: Stream
    ids: list[int]  # the prompt (after a resume: the resumed last token first)
    state: State | None  # before the prompt: None = the model's initial state
    budget: int  # tokens it may still make (max_tokens minus those made)
    fed: int = 0  # prompt tokens consumed by prefill
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    count: int = 0  # tokens made, counted from the original request (a resume starts there)
    # The state after the next token must be copied (stream.wants_state): only where a
    # checkpoint or the end needs it, not every step. `_record` puts the copy on the stream
    # (`stream.snapshots`), before the hand-over that carries the token is queued.
    due: bool = False


Join = tuple[Slot, State, int, float]  # a prefilled row: slot, state, first token, its time


@dataclass
class Handover:
    """One stream's news for the event loop."""

    stream: Stream
    tokens: list[int]
    logprobs: list[float]
    times: list[float]  # perf_counter() when each token existed
    error: BaseException | None = None
    last: bool = False  # the stream left the loop with this news (end, eos, error)


class Batch:
    """Streams stepped by one ORT call, their stacked state and their token choice."""

    def __init__(self, chooser: TokenChooser) -> None:
        self.chooser = chooser
        self.slots: list[Slot] = []
        self.state: State = []
        self.x = np.zeros((0, 1), dtype=np.int64)  # each row's last token
        self._head: RowParams | None = None
        self._rows: list = []
        self._sampled: list[int] = []
        self._uniforms = np.zeros((0, 0))  # [block step, row]
        self._used = 0  # block steps used
        self.deadline: float | None = None
        self.stepped_at: float | None = None  # when the last step's tokens existed
        self.joined: list[tuple[Slot, float]] = []  # rows joined since: their first token time

    def __len__(self) -> int:
        return len(self.slots)

    def join(
        self, slots: list[Slot], states: list[State], tokens: list[int], at: list[float]
    ) -> None:
        """Adds prefilled rows; `at`: when each row's first token existed."""
        model = self.chooser.model
        self.joined += list(zip(slots, at, strict=True))
        self._settle_uniforms()
        self.state = model.concat(([self.state] if self.slots else []) + states)
        self.slots += slots
        self.x = np.concatenate([self.x, np.asarray(tokens, dtype=np.int64)[:, None]])
        self._changed()

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows (in order): the others left."""
        self._settle_uniforms()
        self.slots = [self.slots[i] for i in rows]
        if self.joined:
            kept = {id(s) for s in self.slots}
            self.joined = [(s, at) for s, at in self.joined if id(s) in kept]
        self.state = self.chooser.model.take(self.state, rows) if rows else []
        self.x = self.x[rows]
        self._changed()

    def _changed(self) -> None:
        params = [s.stream.sampler.params for s in self.slots]
        self._rows = params
        self._head = self.chooser.params(params) if self.slots else None
        self._sampled = [i for i, p in enumerate(params) if not p.greedy]
        self._uniforms, self._used = np.zeros((0, len(params))), 0
        deadlines = [s.stream.deadline for s in self.slots if s.stream.deadline is not None]
        self.deadline = min(deadlines, default=None)

    def _settle_uniforms(self) -> None:
        """Marks the peeked uniforms each sampled row consumed as used."""
        for i in self._sampled:
            self.slots[i].stream.sampler.use(self._used)
        self._uniforms, self._used = np.zeros((0, len(self.slots))), 0

    def _next_uniforms(self) -> np.ndarray:
        if not self._sampled:
            return np.zeros(len(self.slots))  # greedy rows ignore them
        if self._used == len(self._uniforms):
            self._settle_uniforms()
            block = np.zeros((UNIFORM_BLOCK, len(self.slots)))
            for i in self._sampled:
                block[:, i] = self.slots[i].stream.sampler.peek(UNIFORM_BLOCK)
            self._uniforms = block
        self._used += 1
        return self._uniforms[self._used - 1]

    def step(self) -> tuple[list[int], list[float]]:
        """One ORT call: every row's next token and its logprob; state and x move on."""
        tokens, logprobs, self.state = self.chooser.run(
            self.x, self.state, self._rows, self._next_uniforms(), self._head
        )
        self.x = tokens[:, None]
        return tokens.tolist(), logprobs.tolist()

    def close(self) -> None:
        self._settle_uniforms()


class Admissions:
    """Event loop side: streams admitted and not yet released, for the live-streams gauge and
    for draining a version before it is unloaded."""

    def __init__(self, gauge) -> None:
        self.admitted = 0  # streams between submit and release
        self._idle = asyncio.Event()
        self._idle.set()
        self._gauge = gauge

    def admit(self) -> None:
        self.admitted += 1
        self._idle.clear()
        self._gauge.inc()

    def release(self) -> None:
        self.admitted -= 1
        self._gauge.dec()
        if self.admitted == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Waits until every admitted stream has left (hot reload, shutdown)."""
        await self._idle.wait()


class DecodeLoop(Admissions):
    """Owns the decode thread of one model version; the event loop submits and drains.

    `deliver`: where the threads' news go; None = the event loop of the first `submit`
    (`_deliver` moves them into the streams). `joins_to`: where prefilled rows go; None =
    this loop's decode thread, else the loop only prefills (server/decode/process.py sends
    them to a decode process, whose loop takes them with `join`). `prefill_batch`: most prompts
    one prefill call advances (None: max_batch). `spacing_per_stream`:
    hand-overs also wait live streams x this many seconds (a budget of messages a second
    for steps that no GIL shared with the event loop slows down)."""

    def __init__(
        self,
        name: str,
        model: OnnxModel,
        metrics: Metrics,
        max_batch: int,
        stream_interval: float = 0.0,
        prefill_chunk: int = 256,
        prefill_thread: bool = True,
        deliver: Callable[[list[Handover]], None] | None = None,
        on_flush: Callable[[], None] | None = None,
        joins_to: Callable[[list[Join]], None] | None = None,
        spacing_per_stream: float = 0.0,
        prefill_batch: int | None = None,
    ) -> None:
        super().__init__(metrics.live_streams.labels(model=name))
        self.name = name
        self.model = model
        self.chooser = TokenChooser(model)
        self.max_batch = max_batch
        self.stream_interval = stream_interval  # seconds
        self.prefill_chunk = prefill_chunk
        self.prefill_batch = min(prefill_batch or max_batch, max_batch)
        self.prefill_thread = prefill_thread  # prompts prefill beside the steps, not between
        self.eos = model.manifest.vocab.index("<eos>") if "<eos>" in model.manifest.vocab else -1
        self._deliver_to = deliver
        self._on_flush = on_flush
        self._joins_to = joins_to
        self.spacing_per_stream = spacing_per_stream
        # event loop -> prefill (its own thread, or the decode thread between steps)
        self._inbox: deque[Slot] = deque()
        self._prefill_wake = threading.Event()
        # prefill thread -> decode thread: prefilled rows, their state, first token and time
        self._joinbox: deque[Join] = deque()
        self._wake = threading.Event()
        self._closed = False
        # thread -> event loop
        self._outbox: deque[list[Handover]] = deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        # the threads' own
        self._prefilling: list[Slot] = []
        self._batches: list[Batch] = []
        self._news: list[Handover] = []
        self._since_hand = 0
        self._handed = 0.0
        self._step_seconds = metrics.step_duration.labels(model=name)
        self._batch_size = metrics.batch_size.labels(model=name)
        self._itl = metrics.inter_token_latency.labels(model=name)
        self._queue_wait = metrics.queue_wait.labels(model=name)
        self._generated = metrics.generated_tokens.labels(model=name)
        self._durations: list[float] = []
        self._sizes: list[int] = []

    # -- event loop side ------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Streams in a batch (the rows a step works on)."""
        return sum(len(b) for b in list(self._batches))

    @property
    def pending(self) -> int:
        """Streams submitted and not yet in a batch."""
        return len(self._inbox) + len(self._prefilling) + len(self._joinbox)

    def submit(self, stream: Stream, ids: list[int], state: State | None) -> None:
        """Queues an admitted stream: `ids` is its prompt, fed from `state` (None: fresh).
        Its tokens arrive in `stream.buffer`; cancel it with `stream.cancel()`."""
        if self._loop is None and self._deliver_to is None:
            self._loop = asyncio.get_running_loop()
        count = stream.stopper.count  # a resumed stream goes on from its checkpoint's count
        budget = stream.stopper.max_tokens - count
        due = stream.wants_state(count + 1)
        self._inbox.append(Slot(stream, list(ids), state, budget, count=count, due=due))
        self._prefill_wake.set()
        self._wake.set()
        self.start()

    def start(self) -> None:
        """Starts the threads (the first submit does it)."""
        if self._threads:
            return
        targets = {} if self._joins_to else {f"decode:{self.name}": self._run}
        if self.prefill_thread:
            targets[f"prefill:{self.name}"] = self._run_prefill
        for name, target in targets.items():
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def close(self) -> None:
        """Stops the threads after their current call."""
        await asyncio.to_thread(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the threads after their current call (from any thread but theirs)."""
        self.stopping()
        for thread in self._threads:
            thread.join(timeout)

    def stopping(self) -> None:
        """Tells the threads to stop after their current call, without waiting."""
        self._closed = True
        self._wake.set()
        self._prefill_wake.set()

    def _deliver(self) -> None:
        """Event loop: hands each stream its tokens, in order; finished streams get their last
        message (with the resume state when asked for), failed ones their error."""
        self._wake_pending = False  # before draining: a later append schedules a new wake-up
        accepted = 0
        while self._outbox:
            drained = [n for _ in range(len(self._outbox)) for n in self._outbox.popleft()]
            # first tokens first: their handlers then run before a batch's worth of others
            # (stable sort: a stream's own news keep their order, all in one group)
            for news in sorted(drained, key=lambda n: n.stream.tokens > 0):
                stream = news.stream
                if stream.done:
                    continue
                try:
                    accepted += self._hand(news)
                except Exception as exc:  # fails this stream only, not the others drained
                    log.exception("handing tokens to a stream of %s failed", self.name)
                    stream.cancel()  # even if it finished: its last message never closed
                    stream.buffer.fail(exc)
                    continue
                if news.error is not None and not stream.done:
                    stream.cancel()
                    stream.buffer.fail(news.error)
        if accepted:
            self._generated.inc(accepted)

    @staticmethod
    def _hand(news: Handover) -> int:
        """Moves one hand-over's tokens into its stream (the last message when it finishes);
        returns how many it took. Raises what the stream raises (its text, its state)."""
        stream = news.stream
        if not news.tokens:
            return 0
        n = stream.accept_run(news.tokens, news.logprobs, news.times)
        if stream.finished:
            stream.close()
        return n

    # -- the prefill thread ---------------------------------------------------------------
    def _run_prefill(self) -> None:
        """Prompts prefill here, beside the decode steps: ORT releases the GIL, so a prefill
        runs on the other core while the batch steps, and joins it when done."""
        news: list[Handover] = []
        while not self._closed:
            if not (self._inbox or self._prefilling):
                self._prefill_wake.wait()
                self._prefill_wake.clear()
                continue
            try:
                joining = self._prefill(news)
            except Exception as exc:  # fails these prompts, never the thread
                log.exception("prefill failed for %s", self.name)
                joining = []
                self._take_inbox()
                for slot in self._prefilling:
                    news.append(self._failed(slot, exc))
                self._prefilling = []
            self._send(news)  # first tokens reach the event loop before later ones can
            if joining and self._joins_to is not None:
                self._joins_to(joining)
            elif joining:
                self.join(joining)

    def join(self, rows: list[Join]) -> None:
        """Prefilled rows (slot, state after the prompt, first token, when it existed) for
        the decode thread; from any thread."""
        self._joinbox.extend(rows)
        self._wake.set()
        self.start()

    def _take_inbox(self) -> None:
        while self._inbox:
            self._prefilling.append(self._inbox.popleft())

    # -- the decode thread ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            prompts = not self.prefill_thread and (self._prefilling or self._inbox)
            if not (self._batches or self._joinbox or prompts):
                self._flush_metrics()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._turn()
            except Exception as exc:  # a failed call fails its streams, never the thread
                log.exception("decode failed for %s", self.name)
                self._fail_all(exc)
            self._send(self._news)

    def _turn(self) -> None:
        if not self.prefill_thread and (self._inbox or self._prefilling):
            joining = self._prefill(self._news)
            self._send(self._news)  # first tokens go out before the next step
            self._joinbox.extend(joining)
        if self._joinbox:
            self._join()
        self._filter()
        if self._batches:
            self._step()

    def _prefill(self, news: list[Handover]) -> list[Join]:
        """One aligned call for the first --prefill-batch waiting prompts: each advances by
        the shortest remaining length, capped at --prefill-chunk; a prompt not done goes to
        the back. Returns the rows whose prompt ended, to join the batch; their first tokens
        are in `news`."""
        self._take_inbox()
        waiting = [s for s in self._prefilling if not s.stream.done]
        rows, later = waiting[: self.prefill_batch], waiting[self.prefill_batch :]
        if not rows:
            self._prefilling = later
            return []
        now = time.perf_counter()
        for slot in rows:
            if slot.fed == 0:  # its first prefill call: the wait in the queue ends here
                self._queue_wait.observe(now - slot.stream.started)
        n = min(self.prefill_chunk, *(len(s.ids) - s.fed for s in rows))
        x = np.asarray([s.ids[s.fed : s.fed + n] for s in rows], dtype=np.int64)
        fresh = self.model.initial_state(1)
        state = self.model.concat([s.state if s.state is not None else fresh for s in rows])
        ending = [s.fed + n == len(s.ids) for s in rows]
        # rows that do not end here pick no token: greedy placeholders, no uniform used
        params = [s.stream.sampler.params if ending[i] else GREEDY for i, s in enumerate(rows)]
        uniforms = np.array(
            [0.0 if params[i].greedy else s.stream.sampler.uniform() for i, s in enumerate(rows)]
        )
        self._prefilling = later
        try:  # these rows are in no queue now: whatever fails fails them here
            tokens, logprobs, state = self.chooser.run(x, state, params, uniforms)
            now = time.perf_counter()
            states = self.model.split(state) if self.model.specs else [[] for _ in rows]
        except Exception as exc:  # fails these prompts only
            log.exception("prefill failed for %s", self.name)
            news.extend(self._failed(slot, exc) for slot in rows)
            return []
        joining: list[Join] = []
        for i, slot in enumerate(rows):
            slot.fed += n
            slot.state = states[i]
            if not ending[i]:
                self._prefilling.append(slot)
                continue
            token = int(tokens[i])
            ended = self._record(slot, token, float(logprobs[i]), now, states[i])
            if not ended:
                joining.append((slot, states[i], token, now))
            news.append(self._take_news(slot, last=ended))  # the first token goes out at once
        return joining

    def _join(self) -> None:
        """Moves the join queue's rows into batches. A row leaves the queue only once a batch
        holds it: if joining fails, `_fail_all` still finds it there and fails its stream."""
        while self._joinbox:
            target = next((b for b in self._batches if len(b) < self.max_batch), None)
            if target is None:
                target = Batch(self.chooser)
                self._batches.append(target)
            room = min(self.max_batch - len(target), len(self._joinbox))
            now = [self._joinbox[i] for i in range(room)]
            target.join([j[0] for j in now], [j[1] for j in now], [j[2] for j in now],
                        [j[3] for j in now])  # fmt: skip
            for slot, *_ in now:
                self._joinbox.popleft()
                slot.state = None  # the batch holds it now

    def _filter(self) -> None:
        """Drops streams the event loop ended (stop string, cancel) or whose deadline passed."""
        now = time.perf_counter()
        kept = []
        for batch in self._batches:
            expired = batch.deadline is not None and now >= batch.deadline
            if expired or any(s.stream.done for s in batch.slots):
                rows = []
                for i, slot in enumerate(batch.slots):
                    if slot.stream.expired(now) and not slot.stream.done:
                        expired = DeadlineExceeded(DEADLINE_PASSED)
                        self._news.append(self._failed(slot, expired))
                    elif not slot.stream.done:
                        rows.append(i)
                if len(rows) < len(batch):
                    batch.keep(rows)
            if len(batch):
                kept.append(batch)
            else:
                batch.close()
        self._batches = kept

    def _step(self) -> None:
        """One decode step for every batch; streams that reach max_tokens or end-of-sequence
        leave here, their last tokens handed over at once."""
        for batch in self._batches:
            start = time.perf_counter()
            tokens, logprobs = batch.step()
            now = time.perf_counter()
            self._durations.append(now - start)
            self._sizes.append(len(batch))
            self._observe_gaps(batch, now)
            done = []
            for i, slot in enumerate(batch.slots):
                state = self.model.take(batch.state, i) if slot.due else None
                if self._record(slot, tokens[i], logprobs[i], now, state):
                    done.append(i)
                    self._news.append(self._take_news(slot, last=True))
            if done:
                gone = set(done)
                batch.keep([i for i in range(len(batch)) if i not in gone])
        for batch in self._batches:
            if not len(batch):
                batch.close()
        self._batches = [b for b in self._batches if len(b)]
        self._since_hand += 1
        live = sum(len(b) for b in self._batches)
        now = time.perf_counter()
        # 0 = every step's tokens at once (--stream-interval-us 0); else the budget applies
        spacing = self.stream_interval and max(self.stream_interval,
                                               live * self.spacing_per_stream)  # fmt: skip
        if self._since_hand >= max(1, min(HAND_EVERY_MAX, live)) and (
            now - self._handed >= spacing
        ):
            self._since_hand, self._handed = 0, now
            for batch in self._batches:
                self._news.extend(self._take_news(s) for s in batch.slots if s.tokens)
            self._flush_metrics()

    def _observe_gaps(self, batch: Batch, now: float) -> None:
        """Inter-token latency: every row stepped before shares the step's gap (one weighted
        observation); rows that joined since wait from their first token."""
        stepped = len(batch) - len(batch.joined)
        if stepped and batch.stepped_at is not None:
            observe_repeated(self._itl, now - batch.stepped_at, stepped)
        for _, at in batch.joined:
            self._itl.observe(now - at)
        batch.stepped_at, batch.joined = now, []

    def _record(self, slot: Slot, token: int, logprob: float, at: float, state) -> bool:
        """Adds one token to a slot; True when the stream ends with it (max_tokens, eos)."""
        slot.tokens.append(token)
        slot.logprobs.append(logprob)
        slot.times.append(at)
        slot.count += 1
        if slot.due and state is not None:
            slot.stream.snapshots.append((slot.count, state))  # before the hand-over is queued
        slot.due = slot.stream.wants_state(slot.count + 1)
        slot.budget -= 1
        return slot.budget <= 0 or token == self.eos

    def _take_news(self, slot: Slot, last: bool = False) -> Handover:
        news = Handover(slot.stream, slot.tokens, slot.logprobs, slot.times, last=last)
        slot.tokens, slot.logprobs, slot.times = [], [], []
        return news

    def _failed(self, slot: Slot, error: BaseException) -> Handover:
        news = self._take_news(slot, last=True)
        news.error = error
        return news

    def _send(self, news: list[Handover]) -> None:
        """Queues a thread's news for the event loop (and empties the list), waking the loop
        only if no wake-up is pending (each wake-up is a syscall and a GIL hand-off)."""
        if not news:
            return
        if self._deliver_to is not None:
            self._deliver_to(list(news))
            news.clear()
            return
        self._outbox.append(list(news))
        news.clear()
        loop = self._loop
        if not self._wake_pending and loop is not None and not loop.is_closed():
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
                loop.call_soon_threadsafe(self._deliver)

    def _fail_all(self, exc: BaseException) -> None:
        """Decode thread: fails every stream it holds (and the prompts, when it prefills)."""
        slots = [s for b in self._batches for s in b.slots]
        slots += [j[0] for j in [self._joinbox.popleft() for _ in range(len(self._joinbox))]]
        if not self.prefill_thread:
            slots, self._prefilling = slots + self._prefilling, []
        self._news.extend(self._failed(slot, exc) for slot in slots)
        self._batches = []

    def _flush_metrics(self) -> None:
        if self._durations:
            observe_many(self._step_seconds, self._durations)
            observe_many(self._batch_size, self._sizes)
            self._durations, self._sizes = [], []
        if self._on_flush is not None:
            self._on_flush()
