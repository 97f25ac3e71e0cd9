"""Serving benchmark: Generate at several concurrencies, batching on vs --max-batch 1 (and one
message per step at one stream), and Score tokens/s vs a bare onnxruntime loop.

Starts real `rnn-server` processes on free localhost ports (bounded: a few minutes at most),
drives them with a grpc.aio client, and writes bench/results/serve.json + serve.png.
Usage: python bench/serve.py [--model-repo models] [--model lstm] [--profile] [--client-cpu 0]
When the model package is missing it builds the tiny zoo `lstm` into a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rnnserve.artifact.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, init_state, ort_session, own_channel  # noqa: E402

MAX_STREAMS = ["--max-streams", "1024"]  # the waves' 256 streams and more, never refused


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- bare onnxruntime ---------------------------------------------------------------------------
def bare_step_time(package: Path, steps: int = 3000) -> dict[str, float]:
    """p50/p99 of one [1, 1] ORT call with state carried — the floor for inter-token latency."""
    sess, m = ort_session(package)
    state, names = init_state(m, 1), [o.name for o in sess.get_outputs()]
    x, times = np.asarray([[5]], dtype=np.int64), []
    for _ in range(steps):
        t = time.perf_counter()
        got = dict(zip(names, sess.run(None, {m.input_name: x, **state}), strict=True))
        state = {s.input: got[s.output] for s in m.state}
        x = np.asarray([[int(np.argmax(got[m.output_name][0, -1]))]], dtype=np.int64)
        times.append(time.perf_counter() - t)
    return {"p50_s": _pct(times, 50), "p99_s": _pct(times, 99)}


def score_texts(m: Manifest, n: int, length: int) -> list[str]:
    rng = np.random.default_rng(0)
    letters = [t for t in m.vocab[4:] if len(t) == 1]
    return ["".join(rng.choice(letters, size=length)) for _ in range(n)]


def bare_score(package: Path, texts: list[str]) -> float:
    """tokens/s of one ORT call per text, log-softmax included, doing the server's work: a
    text of n tokens scores tokens 2..n, so its last token predicts nothing and is not fed
    (server/scoring.py): time = n - 1, the steps the server runs."""
    sess, m = ort_session(package)
    vocab = {t: i for i, t in enumerate(m.vocab)}
    # one untimed call first, as grpc_score makes: a fresh session's first run allocates
    warm = np.asarray([[vocab.get(c, 0) for c in texts[0][:-1]]], dtype=np.int64)
    sess.run([m.output_name], {m.input_name: warm, **init_state(m, 1)})
    start, tokens = time.perf_counter(), 0
    for text in texts:
        fed = np.asarray([[vocab.get(c, 0) for c in text[:-1]]], dtype=np.int64)
        logits = sess.run([m.output_name], {m.input_name: fed, **init_state(m, 1)})[0]
        z = logits - logits.max(-1, keepdims=True)
        _ = z - np.log(np.exp(z).sum(-1, keepdims=True))
        tokens += fed.shape[1]  # one scored token per step
    return tokens / (time.perf_counter() - start)


# -- through gRPC --------------------------------------------------------------------------------
async def _stream(stub, pb, model: str, prompt: str, tokens: int, seed: int) -> dict:
    req = pb.GenerateRequest(model=model, prompt=prompt, max_tokens=tokens,
                             sampling=pb.SamplingParams(temperature=1.0, seed=seed))  # fmt: skip
    start = last = time.perf_counter()
    ttft, gaps, count, messages = None, [], 0, 0
    async for msg in stub.Generate(req, timeout=300):
        messages += 1
        now = time.perf_counter()
        n = len(msg.token_ids)
        if n:
            if ttft is None:
                ttft = now - start
            else:
                gaps.extend([(now - last) / n] * n)
            last = now
            count += n
    return {"ttft": ttft, "gaps": gaps, "tokens": count, "messages": messages}


async def generate_level(port: int, model: str, concurrency: int, tokens: int) -> dict:
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    # own_channel: channels to one address would otherwise share one connection
    channels = [own_channel(f"127.0.0.1:{port}") for _ in range(max(1, concurrency // 32))]
    stubs = [pb_grpc.InferenceStub(c) for c in channels]
    prompt = "the time traveller "
    # warm-up: every channel connected (a channel connects at its first call: the wave's
    # streams on channels 1.. would otherwise wait for TCP and HTTP/2 set-up, those of
    # channel 0 not) and one stream run
    await asyncio.gather(*(c.channel_ready() for c in channels))
    await _stream(stubs[0], pb, model, prompt, 8, 0)
    rounds = 8 if concurrency == 1 else 1
    results, start, by_round = [], time.perf_counter(), []
    for r in range(rounds):
        got = await asyncio.gather(*[
            _stream(stubs[i % len(stubs)], pb, model, prompt, tokens, r * 1000 + i)
            for i in range(concurrency)
        ])  # fmt: skip
        by_round.append(_pct([g for x in got for g in x["gaps"]], 50))
        results += got
    wall = time.perf_counter() - start
    for c in channels:
        await c.close()
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    total = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "tokens": total,
        "wall_s": wall,
        "tokens_per_s": total / wall,
        "ttft_p50_s": _pct(ttfts, 50),
        "ttft_p99_s": _pct(ttfts, 99),
        "itl_p50_s": _pct(gaps, 50),
        "itl_p99_s": _pct(gaps, 99),
        "tokens_per_message": total / max(1, sum(r["messages"] for r in results)),
        "itl_p50_by_round_s": by_round,  # one stream after another at concurrency 1
    }


async def grpc_score(port: int, model: str, texts: list[str]) -> float:
    import grpc

    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        await stub.Score(pb.ScoreRequest(model=model, texts=texts[:1]))
        start, tokens = time.perf_counter(), 0
        for text in texts:
            res = await stub.Score(pb.ScoreRequest(model=model, texts=[text]))
            tokens += res.results[0].num_tokens
        return tokens / (time.perf_counter() - start)


def targets(batched: list[dict], bare_step_s: float) -> dict:
    """The waves' targets from the batched rows. Each needs the 1-stream row (and the speedup
    a higher level): without it the ratio and its verdict are None, never a made-up pass."""
    rows = {r["concurrency"]: r for r in batched}
    higher = [c for c in rows if c > 1]
    c_hi = 64 if 64 in rows else max(higher, default=None)
    speedup = itl_ratio = None
    if 1 in rows and c_hi is not None:
        speedup = rows[c_hi]["tokens_per_s"] / rows[1]["tokens_per_s"]
    if 1 in rows and math.isfinite(rows[1]["itl_p50_s"]) and bare_step_s > 0:
        itl_ratio = rows[1]["itl_p50_s"] / bare_step_s
    return {
        f"speedup_c{c_hi or 64}_vs_c1": speedup, "speedup_target": 8.0,
        "speedup_met": None if speedup is None else speedup >= 8,
        "itl_p50_over_bare_step": itl_ratio, "itl_target": 3.0,
        "itl_met": None if itl_ratio is None else itl_ratio <= 3,
    }  # fmt: skip


def ensure_model(repo: Path, model: str) -> Path:
    if (repo / model / "1" / "model.onnx").exists():
        return repo
    out = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    print(f"{repo}/{model} missing: building the tiny zoo {model} into {out}")
    from rnnserve.trainer.zoo import build_zoo

    build_zoo(out, preset="tiny", only=[model], progress=False)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, rows in results["generate"].items():
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["tokens_per_s"] for r in rows], marker="o", label=mode)
        b.plot(c, [r["itl_p50_s"] * 1e3 for r in rows], marker="o", label=f"{mode} p50")
        b.plot(c, [r["itl_p99_s"] * 1e3 for r in rows], marker="x", ls="--", label=f"{mode} p99")
    b.axhline(results["bare_step"]["p50_s"] * 1e3, color="gray", ls=":", label="bare ORT step")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.legend()
    a.set_ylabel("aggregate tokens/s")
    b.set_ylabel("inter-token latency (ms)")
    b.set_yscale("log")
    fig.suptitle(f"rnn-server Generate, model {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    lines = ["| mode | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
             "| tokens/msg |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for mode, rows in results["generate"].items():
        for r in rows:
            lines.append(
                f"| {mode} | {r['concurrency']} | {r['tokens_per_s']:.0f} | "
                f"{r['ttft_p50_s'] * 1e3:.2f} | {r['ttft_p99_s'] * 1e3:.2f} | "
                f"{r['itl_p50_s'] * 1e3:.3f} | {r['itl_p99_s'] * 1e3:.3f} | "
                f"{r.get('tokens_per_message', float('nan')):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repo", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="lstm")
    p.add_argument("--concurrency", default="1,8,32,64,128")
    p.add_argument("--tokens", type=int, default=512, help="tokens per stream")
    p.add_argument("--score-texts", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--profile", action="store_true", help="also profile the server at 1 stream")
    p.add_argument("--client-cpu", type=int, default=0,
                   help="pin this client to one CPU (-1: none); servers use every CPU")  # fmt: skip
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    repo = ensure_model(args.model_repo, args.model)
    package = repo / args.model / "1"
    manifest = Manifest.load(package)
    texts = score_texts(manifest, args.score_texts, 512)
    results: dict = {
        "model": args.model,
        "hyperparameters": manifest.hyperparameters,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg(),
        },
        "server_defaults": _server_defaults(),
        "bare_step": bare_step_time(package),
        "generate": {},
    }
    if args.client_cpu >= 0 and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        # after the bare-ORT loop, before any server starts (they inherit the mask otherwise):
        # on a 2-core box an unpinned client is sometimes scheduled onto the server's ORT
        # thread's core, which then runs at half speed for the whole round
        results["client_cpu"] = args.client_cpu
        os.sched_setaffinity(0, {args.client_cpu})
    results["score"] = {"bare_ort_tokens_per_s": bare_score(package, texts)}
    modes = [
        ("batched", [], levels),
        ("max_batch_1", ["--max-batch", "1"], levels),
        ("message_per_step", ["--stream-interval-us", "0"], [1]),  # what the interval buys
    ]
    for mode, extra, mode_levels in modes:
        server = Server(repo, [*MAX_STREAMS, *extra])
        try:
            rows = []
            for c in mode_levels:
                row = asyncio.run(generate_level(server.port, args.model, c, args.tokens))
                print(f"{mode:12s} c={c:4d} {row['tokens_per_s']:9.0f} tok/s "
                      f"itl p50 {row['itl_p50_s'] * 1e3:.3f} ms", flush=True)  # fmt: skip
                rows.append(row)
            results["generate"][mode] = rows
            if mode == "batched":
                tps = asyncio.run(grpc_score(server.port, args.model, texts))
                results["score"]["grpc_tokens_per_s"] = tps
        finally:
            server.stop()
    results["targets"] = targets(results["generate"]["batched"], results["bare_step"]["p50_s"])
    args.out.mkdir(parents=True, exist_ok=True)  # cProfile writes its stats there
    if args.profile:
        prof = args.out / "serve.profile"
        server = Server(repo, MAX_STREAMS, profile=prof)
        try:
            asyncio.run(generate_level(server.port, args.model, 1, 512))
        finally:
            server.stop()
        results["profile_top"] = _profile_top(prof)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "serve.png")
    print(table(results))
    print(json.dumps({"score": results["score"], "bare_step": results["bare_step"],
                      "targets": results["targets"]}, indent=2))  # fmt: skip
    return 0


def _server_defaults() -> dict:
    """The scheduler settings both servers ran with (the flags not given are defaults)."""
    from rnnserve.server.settings import Settings

    d = Settings()
    keys = ("prefill_chunk", "stream_interval_us", "decode_head", "max_batch", "intra_op_threads")
    return {k: getattr(d, k) for k in keys}


def _profile_top(path: Path, n: int = 25) -> list[str]:
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("tottime").print_stats(n)
    path.unlink(missing_ok=True)
    return [line for line in buf.getvalue().splitlines() if line.strip()][: n + 8]


if __name__ == "__main__":
    sys.exit(main())
