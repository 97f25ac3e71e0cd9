"""Load test: many concurrent Generate streams mixed with Score and Forecast traffic.

Drives a real rnn-server (started here on a free localhost port, or --address) for --duration
seconds, then reports errors (target 0, every request), p50/p99 latencies (of the requests
started after the warm-up), throughput, and the server's RSS after warm-up and at the end
(target growth < 10%). Bounded: every worker stops at the deadline and the whole run is cut
off at duration + 60 s. Writes bench/results/load.json (+ load.png).
Usage: python bench/load.py [--duration 60] [--streams 128] [--model-repo models] [--address H:P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, own_channel  # noqa: E402

PROMPTS = ["the time traveller ", "it was ", "and then the ", "we ", "a "]


@dataclass
class Tally:
    """Latencies (seconds) and outcomes of one kind of request. Every request counts in `ok`
    and `errors`; the percentiles only take those started at `measure_from` (monotonic) or
    later, so the cold start (first calls, every stream prefilling at once) is not in them."""

    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    measure_from: float = 0.0

    def record(self, start: float, latency: float, first: float | None = None) -> None:
        """One request that succeeded; `first`: seconds to its first token (None: none came)."""
        self.ok += 1
        if start < self.measure_from:
            return
        self.latencies.append(latency)
        if first is not None:
            self.first_token.append(first)

    def summary(self, elapsed: float) -> dict:
        return {
            "ok": self.ok,
            "errors": dict(self.errors),
            "measured": len(self.latencies),
            "p50_s": _pct(self.latencies, 50),
            "p99_s": _pct(self.latencies, 99),
            "first_token_p50_s": _pct(self.first_token, 50),
            "first_token_p99_s": _pct(self.first_token, 99),
            "requests_per_s": self.ok / elapsed,
            "tokens_per_s": self.tokens / elapsed,
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def rss_bytes(pid: int | None) -> int | None:
    """Resident set size from /proc (Linux); None when the server is not ours."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


async def generate_worker(stub, pb, grpc, model: str, deadline: float, seed: int, t: Tally):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        req = pb.GenerateRequest(
            model=model,
            prompt=rng.choice(PROMPTS),
            max_tokens=rng.randint(16, 96),
            sampling=pb.SamplingParams(temperature=0.8, top_k=20, seed=rng.randrange(2**32)),
        )
        start = time.monotonic()
        first = None
        try:
            async for msg in stub.Generate(req, timeout=120):
                if first is None and msg.token_ids:  # a message may carry no token
                    first = time.monotonic() - start
                t.tokens += len(msg.token_ids)
            t.record(start, time.monotonic() - start, first)
        except grpc.RpcError as e:
            t.errors[e.code().name] += 1


async def unary_worker(call, make, deadline: float, seed: int, t: Tally, grpc) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            await call(make(rng), timeout=60)
            t.record(start, time.monotonic() - start)
        except grpc.RpcError as e:
            t.errors[e.code().name] += 1
        await asyncio.sleep(0.01)  # mixed traffic, not a tight unary flood


async def run_load(address: str, args, pid: int | None) -> dict:
    import grpc

    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    channels = [own_channel(address) for _ in range(4)]  # four connections, not one shared
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    start = time.monotonic()
    deadline = start + args.duration
    warm = min(10.0, max(1.0, args.duration / 6))
    measure_after = min(warm, args.duration / 2)  # a short run still has a measured half
    gen, score, fc = (Tally(measure_from=start + measure_after) for _ in range(3))

    def texts(rng):
        return pb.ScoreRequest(model=args.model, texts=[rng.choice(PROMPTS) * 3])

    def history(rng):
        h = [float(math.sin(0.3 * i + rng.random())) for i in range(64)]
        return pb.ForecastRequest(model=args.forecast_model, history=h, horizon=16)

    tasks = [
        generate_worker(stubs[i % 4], pb, grpc, args.model, deadline, i, gen)
        for i in range(args.streams)
    ]
    tasks += [
        unary_worker(stubs[i % 4].Score, texts, deadline, 1000 + i, score, grpc)
        for i in range(args.unary)
    ]
    tasks += [
        unary_worker(stubs[i % 4].Forecast, history, deadline, 2000 + i, fc, grpc)
        for i in range(args.unary)
    ]

    samples: list[tuple[float, int | None]] = []

    async def sampler():
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - start, rss_bytes(pid)))
            await asyncio.sleep(0.5)

    async def rss_after_warmup():
        await asyncio.sleep(warm)
        return rss_bytes(pid)

    warm_task = asyncio.ensure_future(rss_after_warmup())
    await asyncio.wait_for(asyncio.gather(*tasks, sampler()), timeout=args.duration + 60)
    elapsed = time.monotonic() - start
    rss_warm, rss_end = await warm_task, rss_bytes(pid)
    for c in channels:
        await c.close()
    growth = (rss_end / rss_warm - 1) if rss_warm and rss_end else None
    errors = sum(sum(t.errors.values()) for t in (gen, score, fc))
    return {
        "duration_s": args.duration,
        "elapsed_s": elapsed,
        "streams": args.streams,
        "unary_workers_each": args.unary,
        "model": args.model,
        "forecast_model": args.forecast_model,
        "errors": errors,
        "latencies_from_s": measure_after,  # percentiles: requests started after warm-up
        "generate": gen.summary(elapsed),
        "score": score.summary(elapsed),
        "forecast": fc.summary(elapsed),
        "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "rss_growth": growth,
        "rss_growth_ok": None if growth is None else growth < 0.10,
        "rss_samples": samples,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = [(t, r / 2**20) for t, r in res["rss_samples"] if r]
    if pts:
        a.plot(*zip(*pts, strict=True))
    a.set(xlabel="seconds", ylabel="server RSS (MiB)", title="RSS under load")
    names = ["generate", "score", "forecast"]
    p50 = [(res[n]["p50_s"] or 0) * 1e3 for n in names]
    p99 = [(res[n]["p99_s"] or 0) * 1e3 for n in names]
    x = range(len(names))
    b.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    b.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    b.set_xticks(list(x), names)
    b.set(ylabel="latency (ms)", title=f"{res['streams']} streams, errors={res['errors']}")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)


def ensure_models(repo: Path, names: list[str]) -> Path:
    if all((repo / n / "1" / "model.onnx").exists() for n in names):
        return repo
    import tempfile

    from rnnserve.trainer.zoo import build_zoo

    out = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(f"models missing under {repo}: building tiny {names} into {out}")
    build_zoo(out, preset="tiny", only=names, progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--streams", type=int, default=128, help="concurrent Generate streams")
    p.add_argument("--unary", type=int, default=4, help="Score and Forecast workers, each")
    p.add_argument("--model", default="lstm")
    p.add_argument("--forecast-model", default="sine-gru")
    p.add_argument("--model-repo", type=Path, default=ROOT / "models")
    p.add_argument("--address", help="host:port of a running server (no RSS figures then)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.streams < 1 or args.unary < 0:
        p.error("--duration must be > 0, --streams >= 1, --unary >= 0")
    server = None
    if args.address:
        address, pid = args.address, None
    else:
        repo = ensure_models(args.model_repo, [args.model, args.forecast_model])
        server = Server(repo, ["--max-streams", str(args.streams + 2 * args.unary + 16)])
        address, pid = f"127.0.0.1:{server.port}", server.proc.pid
    try:
        res = asyncio.run(run_load(address, args, pid))
    finally:
        if server is not None:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_plot:
        plot(res, args.out.with_suffix(".png"))
    g = res["generate"]
    print(
        f"errors={res['errors']} generate ok={g['ok']} p50={g['p50_s']} p99={g['p99_s']} "
        f"tokens/s={g['tokens_per_s']:.0f} rss growth={res['rss_growth']}"
    )
    print(f"wrote {args.out}")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
