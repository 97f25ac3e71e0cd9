"""Decode steps in a process of their own (`--decode-process 1`): the gRPC event loop and the
decode thread stop sharing one GIL.

Why: in one process the decode thread must take the GIL back after every ONNX Runtime call,
and under load the event loop holds it while it turns a hand-over into gRPC messages for a
whole batch. Measured at 32 churning streams (bench-lstm), a decode step took 1.12 ms of
wall time for 0.63 ms of the thread's own CPU. vLLM's V1 engine splits for the same reason
(an API server process and an EngineCore process).

What runs where:
- **parent** (`DecodeProcess`, same interface as `DecodeLoop`): admission, and the prefill —
  a `DecodeLoop` that only prefills (its prefill thread beside the event loop, as in one
  process), so the first token never crosses a process. Each prefilled row (its state, its
  first token, its sampler where it stands) goes to the child from the event loop, which is
  also where cancels are sent, so a cancel never overtakes its join.
- **child** (`_child_main`): a `DecodeLoop` that only steps, on `RemoteStream`s (what the
  decode thread reads of a stream). It sends back tokens, the state copies checkpoints need,
  and its metric observations; the event loop reads them with `add_reader` and moves tokens
  into the real `Stream` as `DecodeLoop._deliver` does. `perf_counter` is CLOCK_MONOTONIC,
  so token times and deadlines cross unchanged.

The child is `python -P -m rnnserve.server.decode.process FD LEVEL` (-P on Python 3.11+: no
module from the working directory) on one end of a socketpair (not multiprocessing's spawn,
which imports the parent's __main__ again); it logs JSON lines at the server's level and
ignores SIGINT, SIGTERM and SIGHUP (the server drains on those; a Ctrl-C or a signal to the
process group must not kill the steps under that drain), leaving on "close" or when the
server goes away. It builds its session from the bytes the server loaded, never from the
file: the loader sealed them in a memfd (server/model_image.py), which every child inherits.
If one dies, its streams fail UNAVAILABLE (a client holding a resume state continues
elsewhere), it is reaped, and the next join starts a new one on the same bytes. If a child
cannot open the model (no memory for the session, say) or exits before it did, new streams
of that version are refused UNAVAILABLE for a while (`OpenBackoff`) rather than starting a
Python + onnxruntime process per request, and health (server/health.py) reports the version
NOT_SERVING (`cannot_open`) until a child opens it: health's once-a-second recheck calls
`retry_open`, since an unready replica gets no calls that would start one.

Messages, parent -> child: ("open", name, image fd, model args, LoopConfig) first, then
("join", sid, JoinSpec, state, token, time), ("cancel", sid), ("close",). Child -> parent:
("failed", why) if the model does not open, else ("opened",), then ("news", items, live) and
("metrics", observations, live).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from rnnserve.server import logs
from rnnserve.server.decode.loop import Admissions, DecodeLoop, Handover, Join, Slot
from rnnserve.server.decode.stream import Stream, wants_state
from rnnserve.server.errors import DeadlineExceeded, EngineUnavailable
from rnnserve.server.metrics import Metrics, observe_many
from rnnserve.server.model_image import ModelImage
from rnnserve.server.runtime import OnnxModel, State
from rnnserve.server.sampling import Sampler

log = logging.getLogger(__name__)

# the child's metric observations, by the attribute name of server/metrics.py's Metrics
SHIPPED = ("step_duration", "batch_size", "inter_token_latency")
# The child's hand-overs of a full batch are spaced by live streams x this, so the event loop
# sends at most ~2,000 messages a second: steps no longer slowed by the event loop's GIL
# otherwise flooded it, and first tokens waited 30-50 ms behind token messages (C = 32).
# In one process the GIL paces the steps (and this spacing measured slightly worse there).
SPACING_PER_STREAM = 0.0005
# `-m` would put the working directory first on the child's sys.path, so a numpy.py (or any
# module) in the folder the server runs from would be imported there; -P (3.11+) does not.
SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []
# After a child fails to open the model, new streams are refused for this long, doubled at
# each failure in a row up to the cap; a child that opens it resets it.
OPEN_BACKOFF_S = 1.0
OPEN_BACKOFF_CAP_S = 60.0


@dataclass
class LoopConfig:
    """DecodeLoop's settings."""

    max_batch: int
    stream_interval: float
    prefill_chunk: int
    prefill_thread: bool
    prefill_batch: int | None = None  # None: up to max_batch


@dataclass
class JoinSpec:
    """What the decode thread needs of a prefilled stream: its token choice (the sampler
    where the prefill left it), count, budget, state schedule and deadline. Stop strings,
    text and messages stay with the event loop."""

    sampler: Sampler
    count: int
    budget: int
    due: bool
    max_tokens: int
    signs: bool  # the stream signs states (return_state or state_every)
    state_every: int
    end_state: bool
    started: float
    deadline: float | None


class OpenBackoff:
    """When a version's decode process may be started again after failing to open the model:
    whatever failed one child (no memory for the session, the model's copy not to be had)
    likely fails the next, and each is a Python + onnxruntime start. Until the interval has
    passed new streams are refused."""

    def __init__(self) -> None:
        self.failures = 0
        self.until = 0.0  # time.monotonic() before which no child starts
        self.why = ""

    def failed(self, why: str) -> float:
        """A child could not open the model: returns how long new streams are refused."""
        self.failures += 1
        delay = min(OPEN_BACKOFF_S * 2 ** (self.failures - 1), OPEN_BACKOFF_CAP_S)
        self.until, self.why = time.monotonic() + delay, why
        return delay

    def opened(self) -> None:
        self.failures, self.until, self.why = 0, 0.0, ""

    def refusal(self, name: str) -> EngineUnavailable | None:
        """The error for a new stream now, or None when a child may be started."""
        left = self.until - time.monotonic()
        if left <= 0:
            return None
        return EngineUnavailable(
            f"model {name}: its decode process could not open the model ({self.why}); new "
            f"streams are refused for {math.ceil(left)} s more (retry elsewhere)"
        )


class RemoteStream:
    """A stream as the child's decode thread sees it; `done` once the parent cancels it."""

    def __init__(self, sid: int, spec: JoinSpec) -> None:
        self.sid = sid
        self.spec = spec
        self.sampler = spec.sampler
        self.started, self.deadline = spec.started, spec.deadline
        self.snapshots: deque[tuple[int, list[np.ndarray]]] = deque()
        self.done = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def wants_state(self, count: int) -> bool:
        s = self.spec
        return s.signs and wants_state(count, s.state_every, s.end_state, s.max_tokens)


class _Recorder:
    """Stands in for a labelled Prometheus metric in the child: keeps the observations."""

    def __init__(self) -> None:
        self.values: deque[float] = deque()

    def labels(self, **_: str) -> _Recorder:
        return self

    def observe(self, value: float) -> None:
        self.values.append(value)

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def take(self) -> list[float]:
        return [self.values.popleft() for _ in range(len(self.values))]


class _ChildMetrics:
    """The metrics a DecodeLoop records, kept for the parent."""

    def __init__(self) -> None:
        for name in (*SHIPPED, "queue_wait", "live_streams", "generated_tokens"):
            setattr(self, name, _Recorder())

    def take(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).take() for name in SHIPPED}


def _child_main(
    conn: Connection, name: str, image_fd: int, model_args: tuple, config: LoopConfig
) -> None:
    """The decode process: opens the model from the parent's copy of its bytes (the file may
    be gone or other by now), then steps what the parent joins until it says close or goes
    away."""
    try:
        model = OnnxModel(ModelImage.path_in_child(image_fd), *model_args[1:])
    except Exception as exc:  # the parent fails its streams with this
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    finally:
        os.close(image_fd)  # the session holds its weights; the parent keeps the copy
    conn.send(("opened",))  # the parent's backoff starts over
    lock = threading.Lock()
    streams: dict[int, RemoteStream] = {}
    metrics = _ChildMetrics()
    loop: DecodeLoop | None = None

    def send(message: tuple) -> None:
        with lock, contextlib.suppress(OSError):  # the parent gone: recv below ends us
            conn.send(message)

    def deliver(news: list[Handover]) -> None:
        items = []
        for h in news:
            stream = h.stream
            snapshots = [stream.snapshots.popleft() for _ in range(len(stream.snapshots))]
            error = None
            if h.error is not None:
                error = (isinstance(h.error, DeadlineExceeded), str(h.error))
            if h.last:
                streams.pop(stream.sid, None)
            items.append((stream.sid, h.tokens, h.logprobs, h.times, snapshots, error, h.last))
        reported[0] = loop.live if loop else 0
        send(("news", items, reported[0]))

    reported = [0]  # the live count the parent last heard

    def flush() -> None:
        observed, live = metrics.take(), loop.live if loop else 0
        if any(observed.values()) or live != reported[0]:
            reported[0] = live
            send(("metrics", observed, live))

    loop = DecodeLoop(name, model, metrics, config.max_batch, config.stream_interval,
                      config.prefill_chunk, False, deliver, flush,
                      spacing_per_stream=SPACING_PER_STREAM)  # fmt: skip
    try:
        while True:
            message = conn.recv()
            kind = message[0]
            if kind == "join":
                _, sid, spec, state, token, at = message
                stream = streams[sid] = RemoteStream(sid, spec)
                slot = Slot(stream, [], None, spec.budget, count=spec.count, due=spec.due)
                loop.join([(slot, state, token, at)])
            elif kind == "cancel":
                stream = streams.pop(message[1], None)
                if stream is not None:
                    stream.done = True  # the loop drops it by its next step
            elif kind == "close":
                break
    except (EOFError, OSError):
        pass  # the parent went away
    loop.stop()
    conn.close()


def _weakly(method: Callable[[list[Join]], None]) -> Callable[[list[Join]], None]:
    """`method`, called through a weak reference to its object (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(rows: list[Join]) -> None:
        bound = ref()
        if bound is not None:
            bound(rows)

    return call


class DecodeProcess(Admissions):
    """Parent side: prefills here, steps in a child process."""

    def __init__(self, name: str, model: OnnxModel, metrics: Metrics, config: LoopConfig) -> None:
        super().__init__(metrics.live_streams.labels(model=name))
        self.name = name
        self.model = model
        self.config = config
        # the prefill loop reaches this object weakly: a strong link back would make a cycle,
        # and a removed version's ORT sessions would wait for a full garbage collection
        self._prefiller = DecodeLoop(name, model, metrics, config.max_batch,
                                     config.stream_interval, config.prefill_chunk, True,
                                     joins_to=_weakly(self._prefilled),
                                     prefill_batch=config.prefill_batch)  # fmt: skip
        self._metrics = {attr: getattr(metrics, attr).labels(model=name) for attr in SHIPPED}
        self._generated = metrics.generated_tokens.labels(model=name)
        self._sids: dict[int, int] = {}  # id(stream) -> sid, from submit until it leaves
        self._streams: dict[int, Stream] = {}  # sid -> stream, once joined in the child
        self._next_sid = 0
        self._live = 0
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = OpenBackoff()
        self._opening = False  # the child has said neither "opened" nor "failed" yet
        self._closed = False

    # -- the child --------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the child (it opens the model meanwhile; joins queue in the pipe) on the
        bytes the server loaded (`model.image`), whatever the file holds by now."""
        if self._process is not None:
            return
        self._loop = asyncio.get_running_loop()
        image = self.model.image
        assert image is not None, "a decode process needs the model loaded with keep_image"
        self._opening = True
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            cmd = [sys.executable, *SAFE_PATH, "-m", "rnnserve.server.decode.process", str(fd),
                   level]  # fmt: skip
            self._process = subprocess.Popen(cmd, pass_fds=[fd, image.fd])  # never fork gRPC
        self._conn = Connection(ours.detach())
        with contextlib.suppress(OSError):  # it died at once: the reader below sees it end
            self._conn.send(("open", self.name, image.fd, self.model.args, self.config))
        # in an empty context: the reader would otherwise carry the request id (and trace)
        # of the call that happened to start the child into every log line it writes
        contextvars.Context().run(self._loop.add_reader, self._conn.fileno(), self._readable)

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (for its CPU and memory metrics)."""
        return self._process.pid if self._process is not None else None

    @property
    def cannot_open(self) -> bool:
        """A child failed to open the model and none has opened it since: health says the
        version is NOT_SERVING (its new streams are refused or fail)."""
        return self._backoff.failures > 0

    def retry_open(self) -> None:
        """Starts a child to open the model again once the back-off's time has passed;
        health calls it, as no call reaches an unready replica."""
        idle = self.cannot_open and self._process is None and not self._closed
        if idle and self._backoff.refusal(self.name) is None:
            self.start()

    async def close(self) -> None:
        """Stops the prefill thread and asks the child to stop after its current call; lets
        go of the model's sealed bytes, which only a new child would read."""
        self._closed = True  # no retry_open, no new child from here on
        if self.model.image is not None:  # now, not when a GC finds this object's cycles
            self.model.image.close()  # (a running child holds its own descriptor)
        await self._prefiller.close()
        process, conn = self._forget_child()
        if process is None or conn is None:
            return
        self._fail_all(EngineUnavailable("the server is shutting down; retry elsewhere"))
        with contextlib.suppress(OSError):
            conn.send(("close",))
        try:
            await asyncio.to_thread(process.wait, 10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        conn.close()

    def _forget_child(self) -> tuple[subprocess.Popen | None, Connection | None]:
        """Stops reading the child; returns it and its pipe."""
        process, conn = self._process, self._conn
        if conn is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(conn.fileno())
        self._process, self._conn = None, None
        return process, conn

    # -- event loop side --------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Streams in the child's batches, as of its last message."""
        return self._live

    @property
    def pending(self) -> int:
        """Streams submitted and not yet in the child (prefilling, or on the way)."""
        return len(self._sids) - len(self._streams)

    def submit(self, stream: Stream, ids: list[int], state: State | None) -> None:
        """Prefills here, then joins the child's batch; like DecodeLoop.submit."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        refused = self._child_or_refusal()
        if refused is not None:
            raise refused
        sid, self._next_sid = self._next_sid, self._next_sid + 1
        self._sids[id(stream)] = sid
        stream.on_cancel = lambda: self._cancel(stream)
        self._prefiller.submit(stream, ids, state)

    def _prefilled(self, rows: list[Join]) -> None:
        """Prefill thread: rows whose first token went out; the event loop sends them on
        (after that token, and in order with cancels)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
            self._loop.call_soon_threadsafe(self._join, rows)

    def _join(self, rows: list[Join]) -> None:
        for slot, state, token, at in rows:
            stream = slot.stream
            sid = self._sids.get(id(stream))
            if sid is None or stream.done:
                continue  # cancelled, failed or finished meanwhile (no child started for it)
            refused = self._child_or_refusal()  # also after a send below found it gone
            if refused is not None:  # prefilled while a child failed to open the model
                self._forget(stream)
                stream.cancel()
                stream.buffer.fail(refused)
                continue
            spec = JoinSpec(
                sampler=stream.sampler,
                count=slot.count,
                budget=slot.budget,
                due=slot.due,
                max_tokens=stream.stopper.max_tokens,
                signs=stream.signer is not None,
                state_every=stream.state_every,
                end_state=stream.end_state,
                started=stream.started,
                deadline=stream.deadline,
            )
            self._streams[sid] = stream
            self._send(("join", sid, spec, state, token, at))

    def _child_or_refusal(self) -> EngineUnavailable | None:
        """Starts a child unless one runs; the error for a new stream while none may."""
        if self._closed:  # its version was unloaded, or the server stops: its bytes are gone
            return EngineUnavailable(
                f"model {self.name}: its decode process was closed (the version was unloaded, "
                "or the server is stopping); retry"
            )
        if self._process is None:
            refused = self._backoff.refusal(self.name)
            if refused is not None:
                return refused
            self.start()
        return None

    def _cancel(self, stream: Stream) -> None:
        sid = self._sids.pop(id(stream), None)
        if sid is not None and self._streams.pop(sid, None) is not None:
            self._send(("cancel", sid))

    def _send(self, message: tuple) -> None:
        if self._conn is None:
            return  # no child: its streams have failed already
        try:
            self._conn.send(message)
        except OSError:
            self._child_exited()

    def _readable(self) -> None:
        """Event loop: everything the child has sent so far."""
        conn = self._conn
        try:
            while conn is not None and conn is self._conn and conn.poll():
                self._handle(conn.recv())
        except (EOFError, OSError):
            if conn is self._conn:  # not a child started since
                self._child_exited()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "news":
            self._live = message[2]
            self._deliver(message[1])
        elif kind == "metrics":
            self._live = message[2]
            for attr, values in message[1].items():
                observe_many(self._metrics[attr], values)
        elif kind == "opened":
            self._opening = False
            self._backoff.opened()
        elif kind == "failed":
            self._open_failed(message[1])
            # it exits now: let it go before its EOF, or a stream submitted meanwhile would
            # join it (and fail "exited") instead of being refused for the back-off
            self._child_exited()

    def _open_failed(self, why: str) -> None:
        """The child could not open the model: its streams fail, and new ones are refused
        for a while instead of starting a child each."""
        self._opening = False
        delay = self._backoff.failed(why)
        log.error("the decode process of %s could not open the model: %s; new streams are "
                  "refused for %g s", self.name, why, delay)  # fmt: skip
        self._fail_all(EngineUnavailable(f"model {self.name}: {why}"))

    def _deliver(self, items: list) -> None:
        """Like DecodeLoop._deliver: tokens into each stream, in order; the last message of
        finished streams; errors. A stream that ends here (a stop string) is cancelled in the
        child."""
        accepted = 0
        for sid, tokens, logprobs, times, snapshots, error, last in items:
            stream = self._streams.get(sid)
            if stream is None or stream.done:
                continue
            stream.snapshots.extend(snapshots)
            try:
                if tokens:
                    accepted += stream.accept_run(tokens, logprobs, times)
                    if stream.finished:
                        stream.close()
            except Exception as exc:  # fails this stream only, not the others of the batch
                log.exception("handing tokens to a stream of %s failed", self.name)
                self._forget(stream) if last or error is not None else self._cancel(stream)
                stream.cancel()
                stream.buffer.fail(exc)
                continue
            if error is not None and not stream.done:
                deadline, text = error
                self._forget(stream)
                stream.cancel()
                stream.buffer.fail(DeadlineExceeded(text) if deadline else RuntimeError(text))
            if last:
                self._forget(stream)
            elif stream.done:
                self._cancel(stream)
        if accepted:
            self._generated.inc(accepted)

    def _forget(self, stream: Stream) -> None:
        """The child dropped the stream: nothing to cancel there."""
        sid = self._sids.pop(id(stream), None)
        self._streams.pop(sid, None)
        stream.on_cancel = None

    def _child_exited(self) -> None:
        process, conn = self._forget_child()
        if conn is not None:
            conn.close()
        self._live = 0  # nothing steps until a new child reports
        code = process.poll() if process is not None else None
        if self._opening:  # died opening the model (a crash in onnxruntime): same backoff
            self._open_failed(
                "its decode process exited before opening the model (code "
                f"{'not yet known' if code is None else code})"
            )
        if self._streams:
            log.error("the decode process of %s exited (code %s); failing %d streams",
                      self.name, "not yet known" if code is None else code,
                      len(self._streams))  # fmt: skip
        self._fail_all(EngineUnavailable(
            f"the decode process of model {self.name} exited; retry (or resume from a state)"
        ))  # fmt: skip
        if process is not None and code is None:
            _reap(self.name, process)

    def _fail_all(self, error: BaseException) -> None:
        """Fails the streams in the child (those still prefilling join a new one)."""
        streams = list(self._streams.values())
        for stream in streams:
            self._forget(stream)
            if not stream.done:
                stream.cancel()
                stream.buffer.fail(error)


def _reap(name: str, process: subprocess.Popen) -> None:
    """Waits, in a thread, for a child whose pipe closed before it exited, so it leaves no
    zombie (Popen reaps a dropped child only when the next one starts); one that lingers
    with its pipe closed is killed."""

    def wait() -> None:
        try:
            code = process.wait(10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if code:
            log.warning("the decode process of %s (pid %d) exited with code %s", name,
                        process.pid, code)  # fmt: skip

    threading.Thread(target=wait, name=f"reap:{name}", daemon=True).start()


def main(argv: list[str]) -> int:
    """The child's entry: argv[1] is its end of the socketpair, argv[2] the server's log
    level; the first message says what to open (the model's copy it inherited, by fd)."""
    try:
        logs.configure(argv[2] if len(argv) > 2 else "INFO")
    except ValueError:  # a level without a standard name ("Level 25")
        logs.configure("INFO")
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the server drains; "close" or EOF ends us
    conn = Connection(int(argv[1]))
    try:
        kind, name, image_fd, model_args, config = conn.recv()
    except (EOFError, OSError):
        return 1
    assert kind == "open"
    _child_main(conn, name, image_fd, model_args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
