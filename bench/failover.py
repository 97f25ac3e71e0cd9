"""Failover under chaos: replicas killed (kill -9) or restarted (SIGTERM) under streams that
fail over, and what checkpoints cost.

Three `rnn-server` processes share one --state-key. Streams (greedy and seeded-sampled) run
through RnnClient with all three addresses. Chaos: rounds of streams, each round kills one
replica (kill -9, at a random moment after every stream has started, seeded) and starts it
again; then a rolling restart (SIGTERM one replica at a time, --drain-delay) while new streams
keep arriving. Every stream's text is compared with the same request run without failure
(failover off, on a live replica): `lost` counts streams that failed or differ. Cost: tokens/s
of C concurrent streams against one replica with checkpoints every 16 (and 64) tokens vs
none. About 2 minutes on 2 cores.

Usage: python bench/failover.py [--rounds 5] [--streams 12] [--cost-seconds 2]
       [--model-repo models] [--out bench/results/failover.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BIN, ROOT, free_port, machine_info, process_cpu_s
from rnnserve.client import AsyncRnnClient, RnnClient

KEY = "bench-failover-shared-key"
STATE_EVERY = 16  # checkpoints of the chaos streams (more repeated tokens to check than 64)
MODELS = ("lstm", "gru")
PROMPT = "the time traveller "


class Replica:
    """One rnn-server process on a fixed port, so it can be killed and started again there."""

    def __init__(self, repo: Path, log_dir: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.repo, self.extra = repo, extra
        self.log = log_dir / f"replica-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(BIN / "rnn-server"), "--model-repo", str(self.repo), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", "0", "--http-port", "0",
               "--state-key", KEY, "--log-level", "WARNING", *self.extra]  # fmt: skip
        # no preexec_fn: replicas restart while this process runs client threads, and a
        # fork that runs Python in the child can deadlock there (or break gRPC's poller)
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_serving(self, limit_s: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + limit_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    tail = self.log.read_text()[-2000:]
                    code = None if self.proc is None else self.proc.returncode
                    raise RuntimeError(f"rnn-server on {self.port} exited ({code}):\n{tail}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"rnn-server on {self.port} not serving after {limit_s:.0f} s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit code once it drained."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Outcome:
    """One stream as the caller saw it."""

    kwargs: dict
    ids: list[int] = field(default_factory=list)
    text: str = ""
    failovers: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds waited across each failover
    error: str = ""
    request: object = None
    started: threading.Event = field(default_factory=threading.Event)


def stream_kwargs(i: int, max_tokens: int) -> dict:
    """Greedy and seeded-sampled streams, alternating models."""
    kw: dict = {"model": MODELS[i % len(MODELS)], "prompt": PROMPT, "max_tokens": max_tokens}
    if i % 2:
        kw.update(temperature=0.9, top_k=12, seed=1000 + i)
    return kw


def run_stream(client: RnnClient, out: Outcome) -> None:
    try:
        stream = client.generate(**out.kwargs)
        out.request = stream.request
        last, seen = time.perf_counter(), 0
        for event in stream:
            now = time.perf_counter()
            out.started.set()
            if stream.failovers != seen:
                out.gaps.append(now - last)
                seen = stream.failovers
            out.ids += event.token_ids
            last = now
        out.text, out.failovers = stream.text, stream.failovers
    except Exception as exc:  # a lost stream is a result, not a crash
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.started.set()


def check(outcomes: list[Outcome], address: str) -> int:
    """Streams lost: failed, or text differing from the same request without failure."""
    import grpc

    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    lost = 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for out in outcomes:
            if out.error:
                lost += 1
                continue
            msgs = list(stub.Generate(out.request, timeout=120))
            ids = [t for m in msgs for t in m.token_ids]
            text = "".join(m.text for m in msgs)
            lost += (ids, text) != (out.ids, out.text)
    return lost


def start_all(replicas: list[Replica]) -> None:
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_serving()


def chaos_rounds(replicas: list[Replica], rounds: int, streams: int, max_tokens: int,
                 seed: int) -> dict:  # fmt: skip
    """Each round: `streams` streams; once all have started, a random replica is killed
    (kill -9) after a random pause; the round's streams finish elsewhere; it restarts."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    kills = 0
    client = RnnClient([r.address for r in replicas], timeout=120, state_every=STATE_EVERY)
    with client:
        for _ in range(rounds):
            batch = [Outcome(stream_kwargs(i, max_tokens)) for i in range(streams)]
            threads = [threading.Thread(target=run_stream, args=(client, o)) for o in batch]
            for t in threads:
                t.start()
            for o in batch:
                o.started.wait(60)
            time.sleep(rng.uniform(0.0, 0.3))
            victim = rng.choice(replicas)
            victim.kill9()
            kills += 1
            for t in threads:
                t.join(180)
            victim.start()
            victim.wait_serving()
            outcomes += batch
    return summarize(outcomes, kills, replicas[0].address)


def rolling_restart(replicas: list[Replica], max_tokens: int, seed: int,
                    spawn_every: tuple[float, float] = (0.02, 0.08)) -> dict:  # fmt: skip
    """SIGTERM each replica in turn (it drains for --grace after --drain-delay) while new
    streams keep arriving (one per `spawn_every` seconds, uniform), then starts it again."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    done = threading.Event()
    threads: list[threading.Thread] = []
    client = RnnClient([r.address for r in replicas], timeout=120, state_every=STATE_EVERY)

    def load() -> None:
        i = 0
        while not done.is_set():
            out = Outcome(stream_kwargs(i, max_tokens))
            outcomes.append(out)
            t = threading.Thread(target=run_stream, args=(client, out))
            t.start()
            threads.append(t)
            i += 1
            time.sleep(rng.uniform(*spawn_every))

    with client:
        feeder = threading.Thread(target=load)
        feeder.start()
        codes = []
        for r in replicas:
            time.sleep(0.3)
            codes.append(r.terminate())
            r.start()
            r.wait_serving()
        done.set()
        feeder.join()
        for t in threads:
            t.join(180)
    result = summarize(outcomes, 0, replicas[0].address)
    result["restarts"], result["exit_codes"] = len(replicas), codes
    return result


def summarize(outcomes: list[Outcome], kills: int, address: str) -> dict:
    gaps = [g for o in outcomes for g in o.gaps]
    return {
        "streams": len(outcomes),
        "kills": kills,
        "resumed": sum(o.failovers for o in outcomes),
        "streams_failed_over": sum(1 for o in outcomes if o.failovers),
        "lost": check(outcomes, address),
        "errors": [o.error for o in outcomes if o.error][:5],
        "failover_wait_ms": {
            "p50": round(1e3 * statistics.median(gaps), 1) if gaps else None,
            "max": round(1e3 * max(gaps), 1) if gaps else None,
        },
    }


async def _tokens_and_seconds(address: str, streams: int, every: int,
                              seconds: float) -> tuple[int, float]:  # fmt: skip
    """Tokens received from `streams` looping greedy streams (256 tokens each), checkpoints
    every `every` tokens (0: none), and the seconds they took; failover off, so only the
    server's cost is measured."""
    count, end = 0, time.monotonic() + seconds

    async def worker(client: AsyncRnnClient, i: int) -> None:
        nonlocal count
        while time.monotonic() < end:
            stream = client.generate("lstm", PROMPT, max_tokens=256, state_every=every,
                                     failover=False, seed=i, temperature=0.9)  # fmt: skip
            async for event in stream:
                count += len(event.token_ids)

    async with AsyncRnnClient(address, timeout=120) as client:
        started = time.monotonic()
        await asyncio.gather(*(worker(client, i) for i in range(streams)))
        return count, time.monotonic() - started


def checkpoint_cost(replica: Replica, streams: int, intervals: list[int], seconds: float) -> dict:
    """Tokens/s and the server's CPU time per token, without checkpoints and with each
    interval, after a warm-up; the settings alternate three times (none, every N, ..., none,
    ...) so drift hits all alike. CPU per token is the steadier figure on a shared machine."""
    assert replica.proc is not None
    pid = replica.proc.pid
    asyncio.run(_tokens_and_seconds(replica.address, streams, 0, min(seconds, 2.0)))  # warm-up
    names = ["none", *(f"every_{n}" for n in intervals)]
    rates: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(3):
        for name, n in zip(names, (0, *intervals), strict=True):
            before = process_cpu_s(pid) or 0.0
            tokens, took = asyncio.run(_tokens_and_seconds(replica.address, streams, n, seconds))
            rates[name].append(tokens / took)
            cpu[name].append(1e6 * ((process_cpu_s(pid) or 0.0) - before) / max(tokens, 1))
    return {"concurrency": streams, "seconds_per_run": seconds, **cost_summary(rates, cpu)}


def cost_summary(rates: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict:
    """Medians per setting, and each setting's ratio to "none" as the median of its ratios
    within a round: the rounds alternate the settings so that a busy spell hits a round's
    runs alike, and tokens/s swings by +-40% between rounds here; a ratio of two medians
    would divide runs of different rounds."""
    names = [k for k in rates if k != "none"]

    def paired(runs: dict[str, list[float]], name: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[name], runs["none"], strict=True))

    return {
        "tokens_per_s_median": {k: round(statistics.median(v)) for k, v in rates.items()},
        "server_cpu_us_per_token_median": {
            k: round(statistics.median(v), 2) for k, v in cpu.items()
        },
        "tokens_per_s_runs": {k: [round(x) for x in v] for k, v in rates.items()},
        "server_cpu_us_per_token_runs": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "throughput_ratio_to_none": {k: round(paired(rates, k), 3) for k in names},
        "cpu_ratio_to_none": {k: round(paired(cpu, k), 3) for k in names},
    }


def model_repo(path: Path) -> Path:
    """A repository holding only the benchmark's models (replicas restart faster)."""
    from bench.load import ensure_models

    source = ensure_models(path, list(MODELS))
    out = Path(tempfile.mkdtemp(prefix="bench-failover-models-"))
    for name in MODELS:
        (out / name).symlink_to((source / name).resolve())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="kill -9 rounds")
    p.add_argument("--streams", type=int, default=12, help="streams per round")
    p.add_argument("--max-tokens", type=int, default=1500)
    p.add_argument("--cost-seconds", type=float, default=2.0, help="0 skips the cost runs")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--server-args", nargs="*", default=[], help="extra rnn-server flags")
    p.add_argument("--model-repo", type=Path, default=ROOT / "models")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/failover.json")
    args = p.parse_args(argv)

    repo = model_repo(args.model_repo)
    logs = Path(tempfile.mkdtemp(prefix="bench-failover-logs-"))
    extra = ["--max-tokens", str(max(args.max_tokens, 2048)), "--drain-delay", "0.3",
             "--grace", "2", *args.server_args]  # fmt: skip
    replicas = [Replica(repo, logs, extra) for _ in range(3)]
    started = time.monotonic()
    try:
        start_all(replicas)
        result = {
            "kill9": chaos_rounds(replicas, args.rounds, args.streams, args.max_tokens, args.seed),
            "rolling_restart": rolling_restart(replicas, args.max_tokens, args.seed),
        }
        if args.cost_seconds > 0:
            result["checkpoint_cost"] = checkpoint_cost(
                replicas[0], args.concurrency, [16, 64], args.cost_seconds
            )
    finally:
        for r in replicas:
            r.stop()
        shutil.rmtree(repo, ignore_errors=True)
    result["setup"] = {
        "replicas": 3,
        "models": list(MODELS),
        "max_tokens": args.max_tokens,
        "state_every": STATE_EVERY,
        "seed": args.seed,
        "retry": "RetryPolicy() defaults: 4 attempts in a row; the first move to another "
        "replica at once, then 0.1 s backoff doubling, jittered",
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "setup"}, indent=2))
    lost = result["kill9"]["lost"] + result["rolling_restart"]["lost"]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
