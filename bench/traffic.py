"""Traffic benchmark: Generate streams that come and go, measured from outside a real
`rnn-server`, beside what bare ONNX Runtime does with the same model and workload on the
server's --intra-op-threads (1 by default: the server's decode and prefill threads use one ORT
thread each, two in all).

Sections (issue 14): closed-loop churn (C clients, streams back to back; fixed and mixed
lengths), open-loop Poisson arrivals swept past saturation (goodput), the bare-ORT ceiling
(single stream, static batches, an ideal in-process churn loop fed the workload's mix; every
ceiling is measured again after the server rows and averaged), Score vs bare ORT, and the
issue's targets as measured ratios. Prompts are real text from the built-in corpus. Bare ORT
and the engine-alone rows follow the server's settings (--server-args and RNNSERVE_* too).
Writes bench/results/traffic.json + traffic.png (or --out); traffic.partial.json holds what a
run measured so far until it ends. A variant server that fails is recorded in the JSON (exit
status 1) and the run goes on. Bounded: every loop stops at its deadline and every RPC has a
timeout; traffic goes to 127.0.0.1 only.
Usage: python bench/traffic.py [--models bench-lstm,lstm] [--quick] [--markdown]
A full run with the defaults takes about 9 minutes per model (plus ~1.5 min to train bench-lstm
once); --quick about 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Server,
    all_cpus,
    init_state,
    machine_busy_s,
    machine_info,
    ort_session,
    own_channel,
    pct,
    pin_to_cpu,
    server_defaults,
)
from rnnserve.artifact.manifest import Manifest  # noqa: E402
from rnnserve.artifact.tokenizer import Tokenizer  # noqa: E402
from rnnserve.artifact.vocab import Vocab  # noqa: E402

BENCH_MODEL = "bench-lstm"
RPC_TIMEOUT_S = 60.0
OPEN_LOOP_CHANNELS = 16
MAX_IN_FLIGHT = 4096  # open loop: arrivals beyond this many unfinished requests are dropped
SLO_TTFT_S, SLO_TPOT_S, GOODPUT_TARGET = 0.050, 0.005, 0.99
FIXED = {"prompt_chars": 16, "output_tokens": 64}
MIXED = {"prompt_chars": (8, 256), "output_tokens": (16, 512), "distribution": "log-uniform",
         "seed": 1}  # fmt: skip
WORKLOAD_SIZE = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workloads -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """(prompt, max_tokens) pairs, cycled by the clients; `spec` says how they were drawn."""

    name: str
    requests: list[tuple[str, int]]
    spec: dict


def corpus_text(m: Manifest) -> str:
    """The built-in corpus as the model's tokenizer sees it, one char per token."""
    from rnnserve.trainer.corpus import default_corpus_text

    if m.tokenizer is None or m.tokenizer.level != "char":
        raise SystemExit(f"error: {m.name} is not a char-level lm; this benchmark needs one")
    text = Tokenizer(m.tokenizer).normalize(default_corpus_text())
    known = set(m.vocab or [])
    return "".join(c if c in known else " " for c in text)


def _slices(text: str, lengths: np.ndarray, rng: np.random.Generator) -> list[str]:
    starts = rng.integers(0, len(text) - int(lengths.max()) - 1, size=len(lengths))
    return [text[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]


def log_uniform(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    return np.rint(np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))).astype(int)


def fixed_workload(text: str, n: int = WORKLOAD_SIZE) -> Workload:
    rng = np.random.default_rng(0)
    prompts = _slices(text, np.full(n, FIXED["prompt_chars"]), rng)
    return Workload("fixed", [(p, FIXED["output_tokens"]) for p in prompts], {**FIXED, "seed": 0})


def mixed_workload(text: str, n: int = WORKLOAD_SIZE) -> Workload:
    rng = np.random.default_rng(MIXED["seed"])
    plen = log_uniform(rng, *MIXED["prompt_chars"], n)
    outs = log_uniform(rng, *MIXED["output_tokens"], n)
    prompts = _slices(text, plen, rng)
    spec = {**MIXED, "mean_prompt_chars": float(plen.mean()),
            "mean_output_tokens": float(outs.mean()),
            "output_tokens_p50": float(np.median(outs))}  # fmt: skip
    spec["prompt_tokens_per_output_token"] = float(plen.sum() / outs.sum())
    return Workload("mixed", list(zip(prompts, outs.tolist(), strict=True)), spec)


def prompt_per_output(pairs: list[tuple[int, int]]) -> float | None:
    """Prompt tokens per output token of (prompt tokens, output tokens) pairs: the mix that sets
    how much of an engine's time goes to prefill (one token per char: char-level models)."""
    out = sum(n for _, n in pairs)
    return sum(p for p, _ in pairs) / out if out else None


def balanced_order(sizes: list[tuple[int, int]], bins: int = 32) -> list[int]:
    """A permutation of (prompt, output) sizes whose every prefix of a few hundred has the mix
    of the whole: the bare churn ceiling sees only the ~200-330 requests it admits in a second,
    and the first ones in workload order had 2.5-5% more prompt per output token than the
    ~3000 the server rows see. Greedy herding on each size's quantile bin (so the prefix keeps
    the distribution's shape, long tails included) and its standardised value at half weight
    (so it keeps the means): each step takes the request that brings the running sum closest
    to the whole's mean. Equal sizes (the fixed workload) keep their order."""
    n = len(sizes)
    x = np.asarray(sizes, dtype=float).reshape(n, -1) if n else np.zeros((0, 2))
    if n == 0 or np.all(x == x[0]):
        return list(range(n))
    cols = []
    for v in x.T:
        edges = np.quantile(v, np.linspace(0, 1, min(bins, n) + 1)[1:-1])
        cols.append(np.eye(min(bins, n))[np.searchsorted(edges, v, side="right")])
        std = v.std()
        cols.append(0.5 * ((v - v.mean()) / (std if std > 0 else 1.0))[:, None])
    z = np.concatenate(cols, axis=1)
    z -= z.mean(axis=0)
    norms = (z * z).sum(axis=1)
    total = np.zeros(z.shape[1])
    used = np.zeros(n, dtype=bool)
    order = []
    for _ in range(n):
        score = z @ (2 * total) + norms  # |total + z_i|^2 less the |total|^2 all share
        score[used] = np.inf
        i = int(np.argmin(score))
        used[i] = True
        total += z[i]
        order.append(i)
    return order


# -- per-request latency (what a client sees) ------------------------------------------------
@dataclass
class Tally:
    """Outcomes of the requests a level sent; only requests started in [w0, w1) are measured."""

    w0: float
    w1: float
    window_tokens: int = 0  # tokens that arrived inside the window, whoever asked for them
    completed: int = 0  # measured-or-not requests that finished OK inside the window
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # message gaps after the first token...
    gap_tokens: list[int] = field(default_factory=list)  # ...and the tokens each one carried
    out_tokens: list[int] = field(default_factory=list)
    good: int = 0  # measured requests within the SLO (TTFT and TPOT)
    measured: int = 0
    errors: Counter = field(default_factory=Counter)  # every request, warm-up included
    window_errors: Counter = field(default_factory=Counter)  # requests started in the window
    prompt_tokens: int = 0  # of the measured requests that ended OK (beside out_tokens)
    dropped: int = 0  # open loop: arrivals not sent (client in-flight bound)

    def drop(self, at: float) -> None:
        """An open-loop arrival the client could not send: inside the window it is a measured
        request that missed the SLO, so goodput's denominator keeps it."""
        self.dropped += 1
        if self.w0 <= at < self.w1:
            self.measured += 1


def tpot_of(first: float, last: float, n: int) -> float | None:
    """vLLM's time per output token: (last - first token time) / (n - 1); None below 2 tokens."""
    return (last - first) / (n - 1) if n > 1 else None


def within_slo(ttft: float | None, tpot: float | None) -> bool:
    return ttft is not None and ttft <= SLO_TTFT_S and (tpot is None or tpot <= SLO_TPOT_S)


async def one_request(stub, req, tally: Tally, scheduled: float | None = None) -> bool:
    """Runs one Generate stream; per message only a clock read, a length and two compares.
    TTFT and latency count from `scheduled` when given (an open-loop arrival's planned time),
    so a client that sends late cannot hide its lag from them (coordinated omission)."""
    import grpc

    t0 = time.perf_counter() if scheduled is None else scheduled
    w0, w1 = tally.w0, tally.w1
    first = last = 0.0
    n = in_window = 0
    gaps: list[float] = []
    weights: list[int] = []
    code = "OK"
    try:
        async for msg in stub.Generate(req, timeout=RPC_TIMEOUT_S):
            k = len(msg.token_ids)
            if k:
                now = time.perf_counter()
                if n:
                    gaps.append(now - last)
                    weights.append(k)
                else:
                    first = now
                last = now
                n += k
                if w0 <= now < w1:
                    in_window += k
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    tally.window_tokens += in_window
    if code != "OK":
        tally.errors[code] += 1
        if w0 <= t0 < w1:
            tally.window_errors[code] += 1
    elif w0 <= last < w1:
        tally.completed += 1
    if w0 <= t0 < w1:
        tally.measured += 1
        if code == "OK" and n:
            tally.prompt_tokens += len(req.prompt) if req is not None else 0  # char-level
            tally.ttft.append(first - t0)
            tpot = tpot_of(first, last, n)
            if tpot is not None:
                tally.tpot.append(tpot)
            tally.latency.append(last - t0)
            tally.out_tokens.append(n)
            tally.gaps += gaps
            tally.gap_tokens += weights
            tally.good += within_slo(first - t0, tpot)
    return code == "OK"


@dataclass
class CpuWindow:
    """CPU seconds used by the client, the server and the machine inside the window."""

    server: Server
    marks: list[tuple[float, float | None, tuple[float, float] | None]] = field(
        default_factory=list
    )

    def mark(self) -> None:
        self.marks.append((time.process_time(), self.server.cpu_s(), machine_busy_s()))

    async def around(self, w0: float, w1: float) -> None:
        await asyncio.sleep(max(0.0, w0 - time.perf_counter()))
        self.mark()
        await asyncio.sleep(max(0.0, w1 - time.perf_counter()))
        self.mark()

    def summary(self, duration: float) -> dict:
        if len(self.marks) < 2:
            return {}
        (c0, s0, m0), (c1, s1, m1) = self.marks[:2]
        out = {"client_cpu_s": c1 - c0, "client_cores": (c1 - c0) / duration}
        if s0 is not None and s1 is not None:
            out["server_cores"] = (s1 - s0) / duration
        if m0 is not None and m1 is not None and m1[1] > m0[1]:
            out["machine_busy_share"] = (m1[0] - m0[0]) / (m1[1] - m0[1])
        return out


def summarize(t: Tally, duration: float) -> dict:
    itl = np.asarray(t.gaps) / np.maximum(1, np.asarray(t.gap_tokens)) if t.gaps else []
    return {
        "tokens_per_s": t.window_tokens / duration,
        "requests_per_s": t.completed / duration,
        "measured_requests": t.measured,
        "errors": dict(t.errors),  # every request, warm-up included (kept for old readers)
        "error_count": sum(t.errors.values()),
        # split: requests started in the measured window (as goodput and percentiles count)
        # and those started in the warm-up before it
        "window_errors": dict(t.window_errors),
        "window_error_count": sum(t.window_errors.values()),
        "warmup_error_count": sum(t.errors.values()) - sum(t.window_errors.values()),
        # the mix the window's requests were: compare with the ceiling's (ceiling.churn)
        "prompt_tokens_per_output_token": (
            t.prompt_tokens / sum(t.out_tokens) if sum(t.out_tokens) else None
        ),
        "mean_output_tokens": float(np.mean(t.out_tokens)) if t.out_tokens else None,
        "ttft_p50_s": pct(t.ttft, 50),
        "ttft_p99_s": pct(t.ttft, 99),
        "tpot_p50_s": pct(t.tpot, 50),
        "tpot_p99_s": pct(t.tpot, 99),
        "itl_p50_s": pct(itl, 50, t.gap_tokens),  # per token: a message's gap / its tokens
        "itl_p99_s": pct(itl, 99, t.gap_tokens),
        "latency_p50_s": pct(t.latency, 50),
        "latency_p99_s": pct(t.latency, 99),
        "tokens_per_message": (sum(t.gap_tokens) / len(t.gap_tokens)) if t.gap_tokens else None,
        "goodput_share": t.good / t.measured if t.measured else None,
        "goodput_requests_per_s": t.good / duration,
    }


def _requests(model: str, workload: Workload) -> list:
    from rnnserve.v1 import rnnserve_pb2 as pb

    return [pb.GenerateRequest(model=model, prompt=p, max_tokens=n) for p, n in workload.requests]


async def closed_loop(server: Server, model: str, clients: int, workload: Workload,
                      warmup: float, duration: float) -> dict:  # fmt: skip
    """`clients` clients, each sending the next request as soon as its last one ends."""
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    reqs = _requests(model, workload)
    channels = [own_channel(server.address) for _ in range(clients)]  # one per client
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    await asyncio.gather(*(c.channel_ready() for c in channels))  # before the clock starts
    await one_request(stubs[0], reqs[0], Tally(0.0, 0.0))
    start = time.perf_counter()
    tally = Tally(start + warmup, start + warmup + duration)
    cpu = CpuWindow(server)

    # Clients start at random moments within the warm-up: started together, equal-length
    # streams would stay in lockstep for the whole run (every client finishing and
    # re-prefilling in the same step), which is a benchmark artefact, not traffic.
    offsets = random.Random(clients).uniform
    stagger = min(1.0, warmup)

    async def client(i: int) -> None:
        j = i
        await asyncio.sleep(offsets(0.0, stagger))
        while time.perf_counter() < tally.w1:
            ok = await one_request(stubs[i % len(stubs)], reqs[j % len(reqs)], tally)
            j += clients
            if not ok:
                await asyncio.sleep(0.01)  # an erroring server is not spun on

    try:
        await asyncio.wait_for(
            asyncio.gather(cpu.around(tally.w0, tally.w1), *[client(i) for i in range(clients)]),
            timeout=warmup + duration + RPC_TIMEOUT_S + 30,
        )
    finally:
        for c in channels:
            await c.close()
    return {"clients": clients, **summarize(tally, duration), **cpu.summary(duration)}


async def open_loop(server: Server, model: str, rate: float, workload: Workload,
                    warmup: float, duration: float, seed: int) -> dict:  # fmt: skip
    """Poisson arrivals at `rate` requests/s (fixed seed), whether or not earlier ones ended."""
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    reqs = _requests(model, workload)
    channels = [own_channel(server.address) for _ in range(OPEN_LOOP_CHANNELS)]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    for stub in stubs:
        await one_request(stub, reqs[0], Tally(0.0, 0.0))
    rng = np.random.default_rng(seed)
    span = warmup + duration
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * span * 1.5) + 16))
    arrivals = arrivals[arrivals < span]
    start = time.perf_counter()
    tally = Tally(start + warmup, start + span)
    cpu = CpuWindow(server)
    watcher = asyncio.ensure_future(cpu.around(tally.w0, tally.w1))
    tasks: set[asyncio.Task] = set()
    lag: list[float] = []
    try:
        for i, at in enumerate(arrivals.tolist()):
            planned = start + at
            delay = planned - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(max(0.0, time.perf_counter() - planned))  # late waking counts too
            if len(tasks) >= MAX_IN_FLIGHT:
                tally.drop(planned)
                continue
            task = asyncio.ensure_future(one_request(stubs[i % len(stubs)], reqs[i % len(reqs)],
                                                     tally, scheduled=planned))  # fmt: skip
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await watcher
        if tasks:
            await asyncio.wait(set(tasks), timeout=RPC_TIMEOUT_S + 5)
    finally:
        for task in list(tasks):
            task.cancel()
        for c in channels:
            await c.close()
    row = {"rate": rate, "sent": len(arrivals) - tally.dropped, "client_dropped": tally.dropped,
           "send_lag_p99_s": pct(lag, 99)}  # fmt: skip
    return {**row, **summarize(tally, duration), **cpu.summary(duration)}


async def score_pair(server: Server, bare: Bare, model: str, texts: list[str],
                     rounds: int = 2) -> dict:  # fmt: skip
    """Score tokens/s through gRPC (one text per call, back to back) and of bare ORT on the
    same text, call by call in turns: both see the same moment of a noisy VM, so their ratio
    is steadier than two runs minutes apart (it spread 0.81-0.92 that way)."""
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    async with own_channel(server.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        await stub.Score(pb.ScoreRequest(model=model, texts=texts[:1]), timeout=RPC_TIMEOUT_S)
        grpc_s = bare_s = 0.0
        tokens = 0
        for _ in range(rounds):
            for text in texts:
                t = time.perf_counter()
                bare_score(bare, [text])
                t2 = time.perf_counter()
                res = await stub.Score(pb.ScoreRequest(model=model, texts=[text]),
                                       timeout=RPC_TIMEOUT_S)  # fmt: skip
                grpc_s += time.perf_counter() - t2
                bare_s += t2 - t
                tokens += res.results[0].num_tokens
    return {"grpc_tokens_per_s": tokens / grpc_s, "bare_tokens_per_s": tokens / bare_s}


async def transport_floor(server: Server, calls: int = 300) -> float:
    """p50 of an empty unary RPC (health Check) from this client: what any call costs the
    Python gRPC stack on this machine before the server does any work."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        times = []
        for i in range(calls + 30):
            t = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
            if i >= 30:  # after the connection warmed up
                times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50))


# -- the engine alone: the server's decode loop in this process, no gRPC -----------------------
def server_settings(server_args: str):
    """The Settings the benchmarked server runs with: its defaults, the RNNSERVE_* environment
    it inherits and `--server-args`, so the engine-alone rows and the bare ceiling's thread
    count follow an A/B run's flags (bad flags exit here, before minutes of ceilings)."""
    from rnnserve.server.settings import settings_from_args

    return settings_from_args(shlex.split(server_args))


def bare_threads(explicit: int | None, settings) -> tuple[int, str]:
    """Bare ORT's intra-op threads and where the number came from: --bare-threads, else the
    server's own (an A/B run's --intra-op-threads moves the ceiling with the server)."""
    if explicit is not None:
        return explicit, "--bare-threads"
    return settings.intra_op_threads, "server --intra-op-threads"


# what the engine-alone rows take from the server's settings; the rest they do not model
ENGINE_SETTINGS = (
    "intra_op_threads",
    "providers",
    "max_batch",
    "max_streams",
    "prefill_chunk",
    "prefill_batch",
    "prefill_thread",
    "stream_interval_us",
    "decode_head",
)
NOT_IN_ENGINE = ("decode_process", "workers", "executor_threads")


def engine_settings(s) -> dict:
    """The settings an engine-alone row ran with, and the server flags it does not model (a
    decode process, more workers, the executor) where they differ from the defaults."""
    from rnnserve.server.settings import Settings

    default = Settings()
    out = {k: getattr(s, k) for k in ENGINE_SETTINGS}
    out["not_modelled"] = {k: getattr(s, k) for k in NOT_IN_ENGINE
                           if getattr(s, k) != getattr(default, k)}  # fmt: skip
    return out


async def engine_closed_loop(package: Path, clients: int, workload: Workload, warmup: float,
                             duration: float, settings=None) -> dict:  # fmt: skip
    """The closed loop of `closed_loop`, through the server's own Generator and DecodeLoop
    (the server's settings: `server_settings`) in this process: what the engine does when no
    RPC is in the way."""
    from rnnserve.server.decode.limiter import StreamLimiter
    from rnnserve.server.decode.loop import DecodeLoop
    from rnnserve.server.generation import GenerateParams, Generator
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import ModelVersion
    from rnnserve.server.resume import StateSigner
    from rnnserve.server.runtime import OnnxModel, resolve_providers
    from rnnserve.server.settings import Settings

    s = settings or Settings()
    m = Manifest.load(package)
    model = OnnxModel(package / "model.onnx", m, resolve_providers(s.providers),
                      s.intra_op_threads, bool(s.decode_head))  # fmt: skip
    entry = ModelVersion(name=BENCH_MODEL, version="1", path=package, manifest=m, model=model)
    metrics = Metrics()
    loop = DecodeLoop(entry.name, model, metrics, s.max_batch, s.stream_interval_us * 1e-6,
                      s.prefill_chunk, bool(s.prefill_thread),
                      prefill_batch=s.prefill_batch)  # fmt: skip
    gen = Generator(entry, loop, StreamLimiter(s.max_streams), StateSigner("bench"), s, metrics)
    start = time.perf_counter()
    tally = Tally(start + warmup, start + warmup + duration)
    offsets = random.Random(clients).uniform

    async def one(prompt: str, n: int) -> None:
        t0 = time.perf_counter()
        first = last = 0.0
        count = in_window = 0
        async for chunk in gen.run(GenerateParams(prompt=prompt, max_tokens=n), None):
            k = len(chunk.token_ids)
            if k:
                now = time.perf_counter()
                first = first or now
                last, count = now, count + k
                in_window += k if tally.w0 <= now < tally.w1 else 0
        tally.window_tokens += in_window
        if tally.w0 <= t0 < tally.w1 and count:
            tally.measured += 1
            tally.ttft.append(first - t0)
            tpot = tpot_of(first, last, count)
            if tpot is not None:
                tally.tpot.append(tpot)

    async def client(i: int) -> None:
        j = i
        await asyncio.sleep(offsets(0.0, min(1.0, warmup)))
        while time.perf_counter() < tally.w1:
            await one(*workload.requests[j % len(workload.requests)])
            j += clients

    try:
        await asyncio.gather(*[client(i) for i in range(clients)])
    finally:
        await loop.close()
    return {"clients": clients, "tokens_per_s": tally.window_tokens / duration,
            "ttft_p50_s": pct(tally.ttft, 50), "tpot_p50_s": pct(tally.tpot, 50)}  # fmt: skip


# -- the ceiling: bare onnxruntime, in process ------------------------------------------------
class Bare:
    """The model in a plain ORT session (the server's thread count), greedy with numpy."""

    def __init__(self, package: Path, threads: int) -> None:
        self.threads = threads
        self.sess, self.m = ort_session(package, threads)
        self.names = [o.name for o in self.sess.get_outputs()]
        self.vocab = Vocab(self.m.vocab or [])
        self.tokenizer = Tokenizer(self.m.tokenizer)
        self._encoded: dict[str, list[tuple[np.ndarray, int]]] = {}

    def ids(self, texts: list[str]) -> np.ndarray:
        rows = [self.vocab.encode(self.tokenizer.tokenize(t)) for t in texts]
        return np.asarray(rows, dtype=np.int64)

    def encoded(self, workload: Workload) -> list[tuple[np.ndarray, int]]:
        """The whole workload as (ids [1, T], max_tokens), in `balanced_order`: the churn
        ceilings admit them in this order, so the few hundred a 1-second loop reaches have
        the mix of all of them, which is what the server rows are fed (encoded once)."""
        if workload.name not in self._encoded:
            order = balanced_order([(len(p), n) for p, n in workload.requests])
            self._encoded[workload.name] = [(self.ids([workload.requests[i][0]]),
                                             workload.requests[i][1]) for i in order]  # fmt: skip
        return self._encoded[workload.name]

    def run(self, x: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        got = dict(zip(self.names, self.sess.run(None, {self.m.input_name: x, **state}),
                       strict=True))  # fmt: skip
        nxt = np.argmax(got[self.m.output_name][:, -1], axis=-1).astype(np.int64)[:, None]
        return nxt, {s.input: got[s.output] for s in self.m.state}

    def put_row(self, state: dict, row: int, one: dict) -> None:
        for s in self.m.state:
            index = [slice(None)] * state[s.input].ndim
            index[s.batch_axis] = row
            state[s.input][tuple(index)] = np.take(one[s.input], 0, axis=s.batch_axis)


def bare_single(bare: Bare, prompts: list[str], min_s: float) -> dict:
    """One stream: prefill time of the fixed prompts, and one decode step, at batch 1."""
    ids = [bare.ids([p]) for p in prompts[:256]]
    zero = init_state(bare.m, 1)  # built once: the ceiling times the ORT call alone
    times: list[float] = []
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline or len(times) < 50:
        for x in ids:
            t = time.perf_counter()
            bare.run(x, zero)
            times.append(time.perf_counter() - t)
    prefill = times
    x, state = bare.run(ids[0], init_state(bare.m, 1))
    steps = _step_times(bare, x, state, min_s, at_least=500)
    return {"prompt_chars": len(prompts[0]), "prefill_p50_s": pct(prefill, 50),
            "prefill_p99_s": pct(prefill, 99), "step_p50_s": pct(steps, 50),
            "step_p99_s": pct(steps, 99)}  # fmt: skip


def _step_times(bare: Bare, x: np.ndarray, state: dict, min_s: float, at_least: int) -> list:
    """Seconds of each decode step (the state fed back) for `min_s`, and at least `at_least`."""
    steps: list[float] = []
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline or len(steps) < at_least:
        t = time.perf_counter()
        x, state = bare.run(x, state)
        steps.append(time.perf_counter() - t)
    return steps


def bare_static(bare: Bare, prompts: list[str], batch: int, tokens: int, min_s: float) -> dict:
    """Static batch: prefill `batch` prompts together, then argmax steps to `tokens` each."""
    rounds: list[float] = []
    deadline, r = time.perf_counter() + min_s, 0
    while time.perf_counter() < deadline or len(rounds) < 3:
        x = bare.ids(prompts[(r * batch) % len(prompts) :][:batch] or prompts[:batch])
        if len(x) < batch:
            x = bare.ids(prompts[:batch])
        t = time.perf_counter()
        nxt, state = bare.run(x, init_state(bare.m, batch))
        for _ in range(tokens - 1):
            nxt, state = bare.run(nxt, state)
        rounds.append(time.perf_counter() - t)
        r += 1
    per_round = float(np.median(rounds))
    return {"batch": batch, "tokens_per_s": batch * tokens / per_round,
            "requests_per_s": batch / per_round, "round_p50_s": per_round}  # fmt: skip


def bare_steps_only(bare: Bare, prompts: list[str], batch: int, min_s: float) -> dict:
    """The two-thread bound: decode steps at `batch` alone, as if every prefill ran free on a
    second thread (the server's decode and prefill threads use one ORT thread each). An upper
    bound for an engine with those two threads, so a ratio to it is conservative."""
    x, state = bare.run(bare.ids((prompts * batch)[:batch]), init_state(bare.m, batch))
    step = pct(_step_times(bare, x, state, min_s, at_least=50), 50)
    return {"batch": batch, "step_p50_s": step, "tokens_per_s": batch / step}


def bare_churn(bare: Bare, workload: Workload, slots: int, min_s: float) -> dict:
    """An ideal engine under churn: `slots` rows always busy; a finished row is refilled at once
    by a batch-1 prefill of the next request written into that row (no other overhead).
    TTFT: from the moment a row frees to its next request's first token (the prefills of rows
    that free together run one after another). Requests come in `Bare.encoded` order; the
    row records the mix of those admitted while timed (prompt tokens per output token)."""
    reqs = bare.encoded(workload)
    state = init_state(bare.m, slots)
    x = np.zeros((slots, 1), dtype=np.int64)
    left = np.zeros(slots, dtype=int)
    j = tokens = 0
    ttft: list[float] = []
    sample: list[tuple[int, int]] = []

    def admit(row: int, freed: float) -> None:
        nonlocal j, tokens
        ids, n = reqs[j % len(reqs)]
        j += 1
        sample.append((ids.shape[1], n))
        nxt, one = bare.run(ids, init_state(bare.m, 1))
        ttft.append(time.perf_counter() - freed)
        bare.put_row(state, row, one)
        x[row, 0] = nxt[0, 0]
        left[row] = n - 1
        tokens += 1

    for row in range(slots):
        admit(row, time.perf_counter())
    tokens, admitted, ttft = 0, j, []
    sample.clear()
    start = time.perf_counter()
    while time.perf_counter() - start < min_s:
        steps = int(left.min())  # until the next row finishes: no per-step bookkeeping
        for _ in range(steps):
            x, state = bare.run(x, state)
        tokens += slots * steps
        left -= steps
        freed = time.perf_counter()
        for row in np.flatnonzero(left <= 0).tolist():
            admit(row, freed)
    wall = time.perf_counter() - start
    return {"slots": slots, "tokens_per_s": tokens / wall,
            "requests_per_s": (j - admitted) / wall, "ttft_p50_s": pct(ttft, 50),
            "prompt_tokens_per_output_token": prompt_per_output(sample),
            "requests_sampled": len(sample)}  # fmt: skip


def bare_churn_in_step(bare: Bare, workload: Workload, slots: int, min_s: float) -> dict:
    """bare_churn with the other way to admit a recurrent stream (issue 14 item 3): no prefill
    call; a new request takes the freed row at once and is fed its prompt one token a step
    inside the batched step (forced steps, outputs ignored) until its last prompt token gives
    its first token. Same rows, model, thread and request order; TTFT as in bare_churn."""
    reqs = [(ids[0], n) for ids, n in bare.encoded(workload)]
    state = init_state(bare.m, slots)
    fresh = init_state(bare.m, 1)
    x = np.zeros((slots, 1), dtype=np.int64)
    prompt: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * slots
    fed = np.zeros(slots, dtype=int)  # prompt tokens fed so far
    left = np.zeros(slots, dtype=int)  # tokens still to make
    freed_at = np.zeros(slots)
    j = 0
    sample: list[tuple[int, int]] = []

    def admit(row: int, freed: float) -> None:
        nonlocal j
        ids, n = reqs[j % len(reqs)]
        j += 1
        sample.append((len(ids), n))
        bare.put_row(state, row, fresh)
        prompt[row], fed[row], left[row], freed_at[row] = ids, 0, n, freed
        x[row, 0] = ids[0]

    def run(seconds: float) -> tuple[int, list[float], int, float]:
        sample.clear()
        tokens, ttft, admitted, start = 0, [], j, time.perf_counter()
        while time.perf_counter() - start < seconds:
            nxt, new_state = bare.run(x, state)
            state.update(new_state)
            now = time.perf_counter()
            for row in range(slots):
                if fed[row] < len(prompt[row]):  # a prompt token went in
                    fed[row] += 1
                    if fed[row] < len(prompt[row]):
                        x[row, 0] = prompt[row][fed[row]]
                        continue
                    ttft.append(now - freed_at[row])  # its output is the first token
                tokens += 1
                left[row] -= 1
                x[row, 0] = nxt[row, 0]
                if left[row] <= 0:
                    admit(row, now)
        return tokens, ttft, j - admitted, time.perf_counter() - start

    for row in range(slots):
        admit(row, time.perf_counter())
    run(min(1.0, min_s))  # past the start, where every row is in its prompt at once
    tokens, ttft, requests, wall = run(min_s)
    return {"slots": slots, "tokens_per_s": tokens / wall, "requests_per_s": requests / wall,
            "ttft_p50_s": pct(ttft, 50), "prompt_tokens_per_output_token":
            prompt_per_output(sample), "requests_sampled": len(sample)}  # fmt: skip


def bare_score(bare: Bare, texts: list[str]) -> float:
    """tokens/s of one ORT call per text (time = text length), log-softmax included."""
    start, tokens = time.perf_counter(), 0
    for text in texts:
        ids = bare.ids([text])
        logits = bare.sess.run([bare.m.output_name],
                               {bare.m.input_name: ids, **init_state(bare.m, 1)})[0]  # fmt: skip
        z = logits - logits.max(-1, keepdims=True)
        _ = z - np.log(np.exp(z).sum(-1, keepdims=True))
        tokens += ids.shape[1] - 1
    return tokens / (time.perf_counter() - start)


# The ceiling figures the targets divide by; measured twice, before and after the server rows,
# as are the churn ceilings (PASS_CEILINGS: every figure a server row is divided by).
TARGET_CEILINGS = ("single", "static", "steps_only")
PASS_CEILINGS = (*TARGET_CEILINGS, "churn", "prompt_in_step")


def target_ceiling(bare: Bare, fixed: list[str], levels: list[int], min_s: float) -> dict:
    """One pass of the figures the targets divide by: batch-1 prefill and step, the static
    batch of every C and the two-thread bound."""
    out = {"single": bare_single(bare, fixed, min_s)}
    log(f"  bare single: prefill p50 {out['single']['prefill_p50_s'] * 1e3:.3f} ms, "
        f"step p50 {out['single']['step_p50_s'] * 1e3:.3f} ms")  # fmt: skip
    out["static"] = []
    for b in levels:
        out["static"].append(bare_static(bare, fixed, b, FIXED["output_tokens"], min_s))
        log(f"  bare static batch {b}: {out['static'][-1]['tokens_per_s']:.0f} tok/s")
    out["steps_only"] = []
    for b in levels:
        out["steps_only"].append(bare_steps_only(bare, fixed, b, min_s))
        log(f"  bare steps alone, batch {b}: {out['steps_only'][-1]['tokens_per_s']:.0f} tok/s")
    return out


def mean_of_passes(passes: list[dict]) -> dict:
    """The pass ceilings averaged over passes, field by field (rows matched by position)."""

    def mean(values: list):
        if any(v is None for v in values):
            return None  # a percentile of no samples in some pass
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], list):
            return [mean(list(rows)) for rows in zip(*values, strict=True)]
        if isinstance(values[0], float):
            return float(np.mean(values))
        if isinstance(values[0], int) and len(set(values)) > 1:
            return float(np.mean(values))  # requests_sampled: per pass, on average
        return values[0]  # labels (batch, slots, prompt_chars) agree across passes

    return {k: mean([p[k] for p in passes]) for k in PASS_CEILINGS if k in passes[0]}


def ceiling(bare: Bare, work: dict[str, Workload], levels: list[int], min_s: float) -> dict:
    """The first pass of every ceiling, with the thread count bare ORT used."""
    return {"threads": bare.threads, **ceiling_pass(bare, work, levels, min_s)}


def ceiling_pass(bare: Bare, work: dict[str, Workload], levels: list[int], min_s: float) -> dict:
    """One pass of every ceiling a server row divides by: the target ceilings and the churn
    loops (prefill call, and prompt fed in the step) of each workload."""
    fixed = [p for p, _ in work["fixed"].requests]
    out = target_ceiling(bare, fixed, levels, min_s)
    out["churn"] = {}
    for name, w in work.items():
        out["churn"][name] = []
        for c in levels:
            r = bare_churn(bare, w, c, min_s)
            out["churn"][name].append(r)
            mix = r["prompt_tokens_per_output_token"]
            log(f"  bare churn {name} {c}: {r['tokens_per_s']:.0f} tok/s, "
                f"{r['requests_sampled']} requests, {mix or 0:.3f} prompt/output")  # fmt: skip
    # prefill call vs prompt fed inside the step (item 3: measure which wins), both ideal
    out["prompt_in_step"] = {}
    for name, w in work.items():
        out["prompt_in_step"][name] = []
        for c in [c for c in levels if 1 < c <= 32]:  # C = 1 has no batch to step in
            r = bare_churn_in_step(bare, w, c, min_s)
            out["prompt_in_step"][name].append(r)
            log(f"  bare churn {name} {c}, prompts fed in the step: {r['tokens_per_s']:.0f} "
                f"tok/s, ttft p50 {r['ttft_p50_s'] * 1e3:.2f} ms")  # fmt: skip
    return out


# -- targets (issue 14 item 2) ----------------------------------------------------------------
def _target(name: str, measured, reference, bound: float, upper: bool) -> dict:
    """measured / reference against `bound` (upper: ratio must be <= bound; else >=)."""
    if measured is None or reference is None or reference == 0:
        return {"name": name, "measured": measured, "reference": reference, "ratio": None,
                "bound": bound, "met": None}  # fmt: skip
    ratio = measured / reference
    met = ratio <= bound if upper else ratio >= bound
    return {"name": name, "measured": measured, "reference": reference, "ratio": ratio,
            "bound": bound, "met": bool(met)}  # fmt: skip


def targets(result: dict) -> list[dict]:
    """The targets of issue 14 item 2, from one model's rows of this run."""
    rows = {r["clients"]: r for r in result["closed_loop"].get("fixed", [])}
    static = {r["batch"]: r for r in result["ceiling"]["static"]}
    single = result["ceiling"]["single"]

    def at(c: int, key: str):
        return rows[c][key] if c in rows else None

    steps = {r["batch"]: r for r in result["ceiling"].get("steps_only", [])}
    out = [_target("churn C=32 tokens/s >= 0.6 x bare static batch 32 (one thread)",
                   at(32, "tokens_per_s"), static.get(32, {}).get("tokens_per_s"), 0.6,
                   upper=False),
           _target("churn C=32 tokens/s >= 0.6 x two-thread bound (batch-32 steps alone)",
                   at(32, "tokens_per_s"), steps.get(32, {}).get("tokens_per_s"), 0.6,
                   upper=False)]  # fmt: skip
    for c in (64, 128):
        t = _target(f"churn C={c} tokens/s >= C=32, 0 errors", at(c, "tokens_per_s"),
                    at(32, "tokens_per_s"), 1.0, upper=False)  # fmt: skip
        if t["met"] is not None:
            t["errors"] = rows[c]["error_count"]
            t["met"] = t["met"] and rows[c]["error_count"] == 0
        out.append(t)
    out += [
        _target("TTFT p50 C=1 <= 2 x bare prefill", at(1, "ttft_p50_s"),
                single["prefill_p50_s"], 2.0, upper=True),
        _target("TPOT p50 C=1 <= 2 x bare step", at(1, "tpot_p50_s"), single["step_p50_s"],
                2.0, upper=True),
        _target("TTFT p50 C=32 <= 10 x bare prefill", at(32, "ttft_p50_s"),
                single["prefill_p50_s"], 10.0, upper=True),
        _target("Score tokens/s >= 0.9 x bare", result["score"]["grpc_tokens_per_s"],
                result["score"]["bare_tokens_per_s"], 0.9, upper=False),
    ]  # fmt: skip
    return out


def max_good_rate(rows: list[dict]) -> float | None:
    """Highest swept rate with goodput >= 99% such that every lower rate also met it."""
    best = None
    for r in sorted(rows, key=lambda r: r["rate"]):
        if (r["goodput_share"] or 0.0) < GOODPUT_TARGET:
            break
        best = r["rate"]
    return best


def add_ratios(result: dict) -> None:
    """Every server figure beside its ceiling: the static batch (fixed) or ideal churn (both)."""
    static = {r["batch"]: r["tokens_per_s"] for r in result["ceiling"]["static"]}
    steps = {r["batch"]: r["tokens_per_s"] for r in result["ceiling"].get("steps_only", [])}
    single = result["ceiling"]["single"]
    for r in [
        *result["closed_loop"].get("fixed", []),
        *result.get("engine", []),
        *[r for rows in result.get("variants", {}).values() for r in rows],
    ]:
        r["vs_two_thread"] = _ratio(r["tokens_per_s"], steps.get(r["clients"]))  # fmt: skip
    for name, rows in result["closed_loop"].items():
        churn = {r["slots"]: r["tokens_per_s"] for r in result["ceiling"]["churn"][name]}
        for r in rows:
            c = r["clients"]
            r["vs_bare_churn"] = r["tokens_per_s"] / churn[c] if c in churn else None
            if name == "fixed":
                r["vs_bare_static"] = r["tokens_per_s"] / static[c] if c in static else None
            r["ttft_p50_vs_bare_prefill"] = _ratio(r["ttft_p50_s"], single["prefill_p50_s"])
            r["tpot_p50_vs_bare_step"] = _ratio(r["tpot_p50_s"], single["step_p50_s"])
    top = max(static.values()) if static else None
    for r in result.get("open_loop", {}).get("rows", []):
        r["vs_best_bare_static"] = _ratio(r["tokens_per_s"], top)
        r["ttft_p50_vs_bare_prefill"] = _ratio(r["ttft_p50_s"], single["prefill_p50_s"])
        r["tpot_p50_vs_bare_step"] = _ratio(r["tpot_p50_s"], single["step_p50_s"])
    for r in [r for rows in result.get("variants", {}).values() for r in rows]:
        r["vs_bare_static"] = _ratio(r["tokens_per_s"], static.get(r["clients"]))
        r["ttft_p50_vs_bare_prefill"] = _ratio(r["ttft_p50_s"], single["prefill_p50_s"])
        r["tpot_p50_vs_bare_step"] = _ratio(r["tpot_p50_s"], single["step_p50_s"])
    for r in result.get("engine", []):
        r["vs_bare_static"] = _ratio(r["tokens_per_s"], static.get(r["clients"]))
        r["ttft_p50_vs_bare_prefill"] = _ratio(r["ttft_p50_s"], single["prefill_p50_s"])
        r["tpot_p50_vs_bare_step"] = _ratio(r["tpot_p50_s"], single["step_p50_s"])
    s = result["score"]
    s["ratio"] = _ratio(s["grpc_tokens_per_s"], s["bare_tokens_per_s"])


def _ratio(a, b):
    return a / b if a is not None and b else None


# -- report -----------------------------------------------------------------------------------
def _ms(v) -> str:
    return "–" if v is None else f"{v * 1e3:.2f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}×"


def window_errors(row: dict) -> int:
    """Errors of the requests started in the measured window (the tables' column); results
    written before the split counted the warm-up too and have only that total."""
    return row.get("window_error_count", row["error_count"])


def _errors(row: dict) -> str:
    return f"errors {window_errors(row)} (+{row.get('warmup_error_count', 0)} in warm-up)"


def mix_line(res: dict) -> str | None:
    """The mixed workload's prompt tokens per output token: what the server rows are fed, the
    ceiling's samples and the server rows' windows, so a reader sees they agree."""
    fed = res.get("workloads", {}).get("mixed", {}).get("prompt_tokens_per_output_token")
    key = "prompt_tokens_per_output_token"

    def span(rows: list[dict]) -> str:
        got = [r[key] for r in rows if r.get(key) is not None]
        return "–" if not got else f"{min(got):.3f}–{max(got):.3f}"

    ceiling = res["ceiling"].get("churn", {}).get("mixed", [])
    server = res.get("closed_loop", {}).get("mixed", [])
    if fed is None or not any(key in r for r in [*ceiling, *server]):
        return None
    return (f"Mixed workload, prompt tokens per output token: {fed:.3f} fed to the server "
            f"rows; {span(ceiling)} in the ideal churn ceiling's samples; {span(server)} in "
            "the requests the server rows' windows measured.")  # fmt: skip


def markdown(results: dict) -> str:
    out = []
    for model, res in results["models"].items():
        single = res["ceiling"]["single"]
        passes = len(res.get("ceiling_passes", [])) or 1
        threads = res["ceiling"]["threads"]
        out += [f"**{model}** — bare ORT ({threads} thread{'' if threads == 1 else 's'}"
                + (f"; mean of {passes} passes, before and after the server rows" if passes > 1
                   else "") + "): prefill "
                f"{_ms(single['prefill_p50_s'])} ms ({single['prompt_chars']} chars), step "
                f"{_ms(single['step_p50_s'])} ms; static batch "
                + ", ".join(f"{r['batch']}: {r['tokens_per_s'] / 1e3:.1f}k"
                            for r in res["ceiling"]["static"]) + " tokens/s"
                + ("; two-thread bound (steps alone) "
                   + ", ".join(f"{r['batch']}: {r['tokens_per_s'] / 1e3:.1f}k"
                               for r in res["ceiling"]["steps_only"])
                   if res["ceiling"].get("steps_only") else ""), "",
                "| workload | C | tokens/s | × bare | × 2-thread | req/s | TTFT p50/p99 ms | "
                "TPOT p50/p99 ms | ITL p50/p99 ms | errors (window) | client cores |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        note = (
            "× bare: tokens/s over bare ORT's static batch of C (fixed) or its ideal churn "
            "loop at C slots (mixed), one thread; × 2-thread: over batch-C steps alone, as if "
            "prefill were free on a second thread (the server's two threads' bound); ITL: per "
            "token, amortised over a message; errors (window): failed requests among those "
            "started in the measured window, as the percentiles and goodput count (the JSON "
            "also has the warm-up's); client cores: CPU the benchmark client itself used"
        )
        for name, rows in res["closed_loop"].items():
            for r in rows:
                ref = r.get("vs_bare_static") if name == "fixed" else r.get("vs_bare_churn")
                out.append(
                    f"| {name} | {r['clients']} | {r['tokens_per_s']:.0f} | {_x(ref)} | "
                    f"{_x(r.get('vs_two_thread'))} | {r['requests_per_s']:.0f} | "
                    f"{_ms(r['ttft_p50_s'])} / {_ms(r['ttft_p99_s'])}"
                    f" | {_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p99_s'])} | {_ms(r['itl_p50_s'])}"
                    f" / {_ms(r['itl_p99_s'])} | {window_errors(r)} | "
                    f"{r.get('client_cores', 0):.2f} |"
                )
        out += ["", note]
        mix = mix_line(res)
        if mix:
            out += ["", mix]
        ol = res.get("open_loop")
        if ol:
            out += ["", f"open loop (fixed workload, Poisson; base {ol['base_rps']:.0f} req/s = "
                    f"C={ol['base_clients']} closed loop): highest rate with goodput ≥ 99%: "
                    + (f"{ol['max_rate_goodput_99']:.0f} req/s" if ol["max_rate_goodput_99"]
                       else "none") , "",
                    "| req/s | tokens/s | TTFT p50/p99 ms | TPOT p50/p99 ms | goodput | "
                    "errors (window) |",
                    "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in ol["rows"]:
                share = r["goodput_share"]
                out.append(
                    f"| {r['rate']:.0f} | {r['tokens_per_s']:.0f} | {_ms(r['ttft_p50_s'])} / "
                    f"{_ms(r['ttft_p99_s'])} | {_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p99_s'])} | "
                    f"{'–' if share is None else f'{share:.1%}'} | {window_errors(r)} |"
                )
        out += ["", "| target | ratio | against the ceiling before / after the server rows "
                "| met |", "|---|---:|---:|---|"]  # fmt: skip
        for t in res["targets"]:
            met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
            passes = t.get("ratio_per_pass")
            each = " / ".join(_x(r) for r in passes) if passes else "–"
            out.append(f"| {t['name']} | {_x(t['ratio'])} | {each} | {met} |")
        failures = res.get("variant_failures", {})
        for name, rows in res.get("variants", {}).items():
            out += ["", f"With `{VARIANTS[name][0]}` (fixed workload; {VARIANTS[name][1]}):", ""]
            if name in failures:
                out += [f"**failed** after {len(rows)} level(s): {failures[name]['error']}", ""]
            if not rows:
                continue
            out += ["| C | tokens/s | × bare static | TTFT p50 ms | TPOT p50 ms | "
                    "errors (window) |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in rows:
                out.append(
                    f"| {r['clients']} | {r['tokens_per_s']:.0f} | {_x(r['vs_bare_static'])} | "
                    f"{_ms(r['ttft_p50_s'])} | {_ms(r['tpot_p50_s'])} | {window_errors(r)} |"
                )
        floor = res.get("transport_floor_s")
        if res.get("engine") or floor:
            skipped = res.get("engine_settings", {}).get("not_modelled")
            out += ["", "What limits it: the same engine without gRPC (its Generator and decode "
                    "loop in the benchmark's process, same workload), and the p50 of an empty "
                    "unary RPC from the same client (the transport floor"
                    + (f": {_ms(floor)} ms" if floor else "") + ")."
                    + (" The engine alone does not model "
                       + ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in skipped.items())
                       + "." if skipped else ""), "",
                    "| engine alone | tokens/s | × bare static | × 2-thread | TTFT p50 ms | "
                    "× bare prefill | TPOT p50 ms | × bare step |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in res.get("engine", []):
                out.append(
                    f"| C={r['clients']} | {r['tokens_per_s']:.0f} | {_x(r['vs_bare_static'])} | "
                    f"{_x(r.get('vs_two_thread'))} | "
                    f"{_ms(r['ttft_p50_s'])} | {_x(r['ttft_p50_vs_bare_prefill'])} | "
                    f"{_ms(r['tpot_p50_s'])} | {_x(r['tpot_p50_vs_bare_step'])} |"
                )
        in_step = res["ceiling"].get("prompt_in_step", {})
        if any(in_step.values()):
            out += ["", "Two ways to admit a prompt, in bare ORT's ideal churn loop (one thread): "
                    "a prefill call per new stream (as the server does, there in a thread of "
                    "its own), or its prompt fed one token a step inside the batched step.", "",
                    "| workload | C | prefill call: tokens/s | TTFT p50 ms | prompt in the step: "
                    "tokens/s | TTFT p50 ms |",
                    "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            for name, rows in in_step.items():
                calls = {r["slots"]: r for r in res["ceiling"]["churn"][name]}
                for r in rows:
                    c = calls.get(r["slots"], {})
                    out.append(
                        f"| {name} | {r['slots']} | {c.get('tokens_per_s', 0):.0f} | "
                        f"{_ms(c.get('ttft_p50_s'))} | {r['tokens_per_s']:.0f} | "
                        f"{_ms(r['ttft_p50_s'])} |"
                    )
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for (model, res), (a, b) in zip(models, axes, strict=True):
        colors = {"fixed": "tab:blue", "mixed": "tab:green"}
        for name, rows in res["closed_loop"].items():
            c = [r["clients"] for r in rows]
            a.plot(c, [r["tokens_per_s"] for r in rows], marker="o", color=colors.get(name),
                   label=f"server, {name}")  # fmt: skip
            bare = res["ceiling"]["churn"][name]
            a.plot([r["slots"] for r in bare], [r["tokens_per_s"] for r in bare], ls=":",
                   marker=".", color=colors.get(name),
                   label=f"bare ORT ideal churn, {name}")  # fmt: skip
        for (name, rows), color in zip(res.get("variants", {}).items(),
                                       ["tab:purple", "tab:orange"], strict=False):  # fmt: skip
            a.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], marker="s",
                   color=color, label=f"server, fixed, {VARIANTS[name][0]}")  # fmt: skip
        static = res["ceiling"]["static"]
        a.plot([r["batch"] for r in static], [r["tokens_per_s"] for r in static], ls="--",
               color="gray", label="bare ORT static batch, fixed")  # fmt: skip
        a.set_xscale("log", base=2)
        a.set_xticks([r["batch"] for r in static], [str(r["batch"]) for r in static])
        a.set_xlabel("concurrent clients (closed loop)")
        a.set_ylabel("tokens/s")
        a.set_title(f"{model}: closed-loop churn")
        a.legend(fontsize=8)
        rows = res.get("open_loop", {}).get("rows", [])
        if rows:
            rates = [r["rate"] for r in rows]
            b.plot(rates, [100 * (r["goodput_share"] or 0) for r in rows], marker="o",
                   color="tab:green", label="goodput %")  # fmt: skip
            b.axhline(100 * GOODPUT_TARGET, color="tab:green", ls=":", lw=0.8)
            b.set_ylabel("goodput (% within TTFT 50 ms, TPOT 5 ms)")
            b.set_ylim(0, 105)
            b2 = b.twinx()
            b2.plot(rates, [(r["ttft_p99_s"] or float("nan")) * 1e3 for r in rows], marker="x",
                    color="tab:red", label="TTFT p99")  # fmt: skip
            b2.set_yscale("log")
            b2.set_ylabel("TTFT p99 (ms)")
            b.legend(loc="lower left", fontsize=8)
            b2.legend(loc="center left", fontsize=8)
        b.set_xlabel("offered load (requests/s, Poisson)")
        b.set_title(f"{model}: open loop, fixed workload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------------
BENCH_SHAPE = {"arch": "lstm", "layers": 2, "embed": 128, "hidden": 256}


def ensure_bench_model(repo: Path) -> None:
    """Trains the issue's model (2-layer char LSTM, embed 128, hidden 256) when missing; a
    cached one of another shape is an error, not a silent change of what is measured."""
    package = repo / BENCH_MODEL / "1"
    if (package / "model.onnx").exists():
        hp = Manifest.load(package).hyperparameters
        if any(hp.get(k) != v for k, v in BENCH_SHAPE.items()):
            raise SystemExit(f"error: {package} is not a {BENCH_SHAPE} model; remove it")
        return
    from rnnserve.trainer.models import ModelConfig
    from rnnserve.trainer.pipeline import DataConfig, train_recurrent
    from rnnserve.trainer.train import TrainConfig

    epochs = 6  # speed does not depend on it; a few epochs make the text (and greedy paths) real
    log(f"{package} missing: training it ({epochs} epochs, ~{13 * epochs} s on a quiet core)")
    repo.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in BENCH_SHAPE.items() if k != "arch"}
    train_recurrent(
        ModelConfig(BENCH_SHAPE["arch"], 1, **shape),
        TrainConfig(epochs=epochs, num_steps=64, batch_size=64, lr=0.005, sampling="sequential",
                    seed=0, threads=1),
        DataConfig(), out=repo, name=BENCH_MODEL, progress=False, log=log,
    )  # fmt: skip


def parse_rates(spec: str, base: float) -> list[float]:
    """'0.5x,1x' are multiples of the measured capacity `base`; plain numbers are requests/s."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        out.append(float(part[:-1]) * base if part.endswith("x") else float(part))
    return [r for r in out if r > 0]


def run_model(model: str, repo: Path, args, levels: list[int], settings=None,
              save=lambda result: None) -> dict:  # fmt: skip
    """Every section for one model; `save(result)` after each, so a run that dies later keeps
    what it measured (main writes it to traffic.partial.json)."""
    settings = settings or server_settings(args.server_args)
    package = repo / model / "1"
    m = Manifest.load(package)
    text = corpus_text(m)
    work = {"fixed": fixed_workload(text), "mixed": mixed_workload(text)}
    rng = np.random.default_rng(2)
    texts = _slices(text, np.full(args.score_texts, args.score_tokens + 1), rng)
    log(f"[{model}] bare ONNX Runtime ceiling")
    all_cpus()  # bare ORT may use any CPU, as the server may
    bare = Bare(package, args.bare_threads)
    result: dict = {
        "hyperparameters": m.hyperparameters,
        "workloads": {k: w.spec for k, w in work.items()},
        "ceiling": ceiling(bare, work, levels, args.bare_s),
        "engine_settings": engine_settings(settings),
        "engine": [],
    }
    save(result)
    for c in [c for c in (1, 32) if c in levels]:  # every CPU, as the server has
        row = asyncio.run(engine_closed_loop(package, c, work["fixed"], args.warmup,
                                             args.duration, settings))  # fmt: skip
        result["engine"].append(row)
        save(result)
        log(f"[{model}] engine alone C={c:<3d} {row['tokens_per_s']:8.0f} tok/s ttft p50 "
            f"{_ms(row['ttft_p50_s'])} ms tpot p50 {_ms(row['tpot_p50_s'])} ms")  # fmt: skip
    pinned = pin_to_cpu(args.client_cpu)  # after the bare loops, before the server starts
    server_log = Path(tempfile.gettempdir()) / f"bench-traffic-{model}-{os.getpid()}.log"
    try:
        server = Server(repo, shlex.split(args.server_args), log=server_log)
    except SystemExit:
        log(f"[{model}] server log {server_log}:\n{server_log.read_text()[-3000:]}")
        raise
    try:
        result["server_cmd"], result["client_pinned_cpu"] = server.cmd, pinned
        result["transport_floor_s"] = asyncio.run(transport_floor(server))
        result["closed_loop"] = {}
        for name, w in work.items():
            rows = result["closed_loop"][name] = []
            for c in levels:
                row = asyncio.run(closed_loop(server, model, c, w, args.warmup, args.duration))
                rows.append(row)
                log(f"[{model}] closed {name:5s} C={c:<4d} {row['tokens_per_s']:8.0f} tok/s "
                    f"{row['requests_per_s']:7.1f} req/s ttft p50 {_ms(row['ttft_p50_s'])} ms "
                    f"tpot p50 {_ms(row['tpot_p50_s'])} ms {_errors(row)} "
                    f"client {row.get('client_cores', 0):.2f} cores")  # fmt: skip
            save(result)
        fixed = {r["clients"]: r for r in result["closed_loop"]["fixed"]}
        base_c = 32 if 32 in fixed else max(fixed, key=lambda c: fixed[c]["requests_per_s"])
        base = fixed[base_c]["requests_per_s"]
        ol = result["open_loop"] = {
            "base_rps": base,
            "base_clients": base_c,
            "rows": [],
            "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
        }
        for i, rate in enumerate(parse_rates(args.rates, base)):
            row = asyncio.run(open_loop(server, model, rate, work["fixed"], args.warmup,
                                        args.duration, seed=100 + i))  # fmt: skip
            ol["rows"].append(row)
            share = row["goodput_share"]
            log(
                f"[{model}] open {rate:8.1f} req/s {row['tokens_per_s']:8.0f} tok/s ttft p99 "
                f"{_ms(row['ttft_p99_s'])} ms goodput "
                f"{'-' if share is None else f'{share:.1%}'} {_errors(row)}"
            )
        ol["max_rate_goodput_99"] = max_good_rate(ol["rows"])
        save(result)
        result["score"] = {
            **asyncio.run(score_pair(server, bare, model, texts)),
            "texts": len(texts),
            "tokens_per_text": args.score_tokens,
        }
    finally:
        server.stop()
    save(result)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    result["variants"] = {}
    for name in chosen:  # one that fails is recorded; the others and the rest still run
        rows, failure = variant_rows(model, repo, args, levels, work["fixed"], name)
        result["variants"][name] = rows
        if failure:
            result.setdefault("variant_failures", {})[name] = failure
            log(f"[{model}] variant {name} FAILED after {len(rows)} of {len(levels)} levels: "
                f"{failure['error']}")  # fmt: skip
        save(result)
    server_log.unlink(missing_ok=True)  # kept only when the run failed
    # The VM drifts over the ~8 minutes of server rows: the target ceilings are measured again
    # after them, every ratio divides by the mean of the two passes, and each target also shows
    # its ratio to either pass, so a reader sees how far the drift alone moves it.
    all_cpus()
    log(f"[{model}] bare ONNX Runtime ceiling again, after the server rows")
    passes = [{k: result["ceiling"][k] for k in PASS_CEILINGS},
              ceiling_pass(bare, work, levels, args.bare_s)]  # fmt: skip
    result["ceiling_passes"] = passes
    result["ceiling"].update(mean_of_passes(passes))
    add_ratios(result)
    result["targets"] = targets(result)
    for i, t in enumerate(result["targets"]):
        per_pass = [targets({**result, "ceiling": {**result["ceiling"], **p}})[i]["ratio"]
                    for p in passes]  # fmt: skip
        t["ratio_per_pass"] = per_pass if per_pass != [t["ratio"]] * len(passes) else None
    return result


# Server configurations measured beside the defaults (fixed closed loop): flags, what they do.
VARIANTS = {
    "decode_process": ("--decode-process 1", "decode steps in a child process"),
    "workers_2": ("--workers 2", "two server processes sharing the port, each its own batch"),
}


def variant_rows(model: str, repo: Path, args, levels: list[int], workload: Workload,
                 name: str) -> tuple[list[dict], dict | None]:  # fmt: skip
    """The fixed closed loop again on a server started with a variant's flags: the trade it
    makes on this machine, beside the defaults. Returns the rows measured and, when the
    server would not start or a level failed, what went wrong (error, server log tail): one
    variant must not throw away the minutes of results before it."""
    flags = [*shlex.split(args.server_args), *shlex.split(VARIANTS[name][0])]
    server_log = Path(tempfile.gettempdir()) / f"bench-traffic-{model}-{name}-{os.getpid()}.log"
    rows: list[dict] = []
    try:
        server = Server(repo, flags, log=server_log)
    except (Exception, SystemExit) as exc:  # SystemExit: the server exited or never served
        return rows, _failure(exc, server_log)
    try:
        for c in levels:
            row = asyncio.run(closed_loop(server, model, c, workload, args.warmup, args.duration))
            rows.append(row)
            log(f"[{model}] {name} C={c:<4d} {row['tokens_per_s']:8.0f} tok/s ttft p50 "
                f"{_ms(row['ttft_p50_s'])} ms tpot p50 {_ms(row['tpot_p50_s'])} ms "
                f"{_errors(row)}")  # fmt: skip
    except (Exception, SystemExit) as exc:
        return rows, _failure(exc, server_log)
    finally:
        server.stop()
    server_log.unlink(missing_ok=True)
    return rows, None


def _failure(exc: BaseException, server_log: Path) -> dict:
    """A failed section for the JSON: the error, and the end of its server's log (kept)."""
    tail = server_log.read_text(errors="replace")[-3000:] if server_log.exists() else ""
    return {"error": f"{type(exc).__name__}: {exc}", "server_log": str(server_log),
            "server_log_tail": tail}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model-repo",
        type=Path,
        default=ROOT / "models",
        help="models dir (created; bench-lstm is trained into it when missing)",
    )
    p.add_argument(
        "--models",
        default=f"{BENCH_MODEL},lstm",
        help="comma list; a model other than bench-lstm is skipped when absent",
    )
    p.add_argument("--levels", default=None, help="closed-loop clients (default 1,8,32,64,128)")
    p.add_argument(
        "--rates",
        default=None,
        help="open-loop requests/s; 'Nx' = N x the C=32 closed-loop requests/s "
        "(default 0.25x,0.5x,0.75x,1x,1.25x,1.5x)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds measured per level (15)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before each level (3)")
    p.add_argument("--server-args", default="", help="extra rnn-server flags, one string")
    p.add_argument("--bare-threads", type=int, default=None,
                   help="bare ORT intra-op threads (default: the server's --intra-op-threads, "
                        "--server-args and RNNSERVE_INTRA_OP_THREADS included)")  # fmt: skip
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma list of server variants to also run the fixed closed loop on, of "
        f"{', '.join(VARIANTS)} (empty: none)",
    )
    p.add_argument("--score-texts", type=int, default=16)
    p.add_argument("--score-tokens", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="smoke run: short levels, few of them")
    p.add_argument("--markdown", action="store_true", help="print the README tables")
    p.add_argument(
        "--client-cpu",
        type=int,
        default=0,
        help="pin this client to one CPU (-1: none); the server uses every CPU",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)  # fmt: skip
    q = args.quick
    args.duration = args.duration or (1.5 if q else 15.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 3.0)
    args.rates = args.rates or ("0.5x,1x" if q else "0.25x,0.5x,0.75x,1x,1.25x,1.5x")
    args.bare_s = 0.2 if q else 1.0
    settings = server_settings(args.server_args)  # what the server will run with
    args.bare_threads, args.bare_threads_from = bare_threads(args.bare_threads, settings)
    if q:
        args.score_texts, args.score_tokens = min(args.score_texts, 4), min(args.score_tokens, 128)
    levels = [int(c) for c in (args.levels or ("1,8" if q else "1,8,32,64,128")).split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.1f}: the machine is not quiet; numbers will be low")
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    if BENCH_MODEL in models:
        ensure_bench_model(args.model_repo)
    present = [m for m in models if (args.model_repo / m / "1" / "model.onnx").exists()]
    for missing in sorted(set(models) - set(present)):
        log(
            f"skipping {missing}: not in {args.model_repo} "
            f"(the zoo's lstm: rnn-trainer zoo --only lstm --out {args.model_repo})"
        )
    if not present:
        raise SystemExit(f"error: none of {models} in {args.model_repo}")
    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                  | {"levels": levels, "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S},
                     "rpc_timeout_s": RPC_TIMEOUT_S},
        "server": {"extra_args": shlex.split(args.server_args), "defaults": server_defaults(),
                   "effective": {k: getattr(settings, k) for k in server_defaults()}},
        "machine": machine_info(),
        "client": {"pin_cpu": args.client_cpu, "connections": "one per closed-loop client",
                   "open_loop_channels": OPEN_LOOP_CHANNELS, "max_in_flight": MAX_IN_FLIGHT},
        "models": {},
    }  # fmt: skip
    partial = args.out / "traffic.partial.json"

    def save(model: str, result: dict) -> None:
        """What is measured so far, after each section: a run that dies keeps it."""
        results["models"][model] = result
        results["wall_s"] = time.monotonic() - started
        write_json(partial, {**results, "complete": False})

    try:
        for model in present:
            results["models"][model] = run_model(
                model, args.model_repo, args, levels, settings, lambda r, m=model: save(m, r)
            )
    except BaseException:
        if partial.exists():
            log(f"the run failed; what it measured is in {partial}")
        raise
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - started
    results["complete"] = True
    write_json(args.out / "traffic.json", results)
    partial.unlink(missing_ok=True)
    plot(results, args.out / "traffic.png")
    if args.markdown:
        print(markdown(results))
    for model, res in results["models"].items():
        for t in res["targets"]:
            met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            log(f"[{model}] target {t['name']}: {_x(t['ratio'])} -> {met}")
    log(f"wrote {args.out / 'traffic.json'} and traffic.png in {results['wall_s']:.0f} s")
    failed = [f"{m}/{v}" for m, res in results["models"].items()
              for v in res.get("variant_failures", {})]  # fmt: skip
    if failed:
        log(f"error: variant(s) failed, recorded in the JSON: {', '.join(failed)}")
        return 1
    return 0


def write_json(path: Path, results: dict) -> None:
    """Written whole to a temporary name, then renamed: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
