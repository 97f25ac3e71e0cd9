"""HTTP/OpenAI and KServe beside native gRPC, on one server process in one run.

- Generate: gRPC `Generate` streams vs HTTP `/v1/completions` with stream=true (SSE), the
  same prompt, sampling and max_tokens, at concurrency 1 and 32; tokens/s from the tokens
  each protocol reports (gRPC token_ids, the SSE stream's final usage). Target: HTTP >= 0.7x.
- Score: one text per call, sequential: rnnserve.v1 Score vs KServe ModelInfer over gRPC
  (BYTES `text`, raw contents, as tritonclient sends it) and over REST (JSON). Target: the
  KServe gRPC call costs <= 1.5x the native one.

Usage: python bench/protocols.py [--repo models] [--model lstm] [--tokens 1000]
Writes bench/results/protocols.json. Under a minute with the tiny zoo model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import Server, free_port, machine_info, pin_to_cpu, server_defaults  # noqa: E402

PROMPT = "the time traveller "
TEXT = "the time traveller, for so it will be convenient to speak of him, was expounding"


def ensure_model(repo: Path, model: str) -> tuple[Path, str]:
    if (repo / model / "1" / "model.onnx").exists():
        return repo, "given"
    out = Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    print(f"{repo}/{model} missing: building the tiny zoo {model} into {out}", flush=True)
    from rnnserve.trainer.zoo import build_zoo

    build_zoo(out, preset="tiny", only=[model], progress=False)
    return out, "tiny zoo"


# -- Generate -------------------------------------------------------------------------------
async def grpc_stream(stub, pb, model: str, tokens: int, seed: int) -> int:
    req = pb.GenerateRequest(model=model, prompt=PROMPT, max_tokens=tokens,
                             sampling=pb.SamplingParams(temperature=1.0, seed=seed))  # fmt: skip
    count = 0
    async for msg in stub.Generate(req, timeout=300):
        count += len(msg.token_ids)
    return count


async def http_stream(session, url: str, model: str, tokens: int, seed: int) -> int:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    used = 0
    async with session.post(url + "/v1/completions", json=body) as reply:
        assert reply.status == 200, await reply.text()
        async for line in reply.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                used = json.loads(line[6:])["usage"]["completion_tokens"]
    return used


async def level(run, concurrency: int, rounds: int) -> dict:
    """`rounds` waves of `concurrency` streams; tokens/s over the whole wall time."""
    await run(0)  # warm-up
    start, total = time.perf_counter(), 0
    for r in range(rounds):
        got = await asyncio.gather(*[run(r * 1000 + i + 1) for i in range(concurrency)])
        total += sum(got)
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "tokens": total, "wall_s": round(wall, 3),
            "tokens_per_s": round(total / wall, 1)}  # fmt: skip


async def generate(port: int, http_port: int, model: str, tokens: int) -> list[dict]:
    import aiohttp
    import grpc

    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    url = f"http://127.0.0.1:{http_port}"
    rows = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for concurrency, rounds in ((1, 8), (32, 2)):
                for trial in range(3):  # interleaved, so drift hits both protocols alike
                    g = await level(lambda s: grpc_stream(stub, pb, model, tokens, s),
                                    concurrency, rounds)  # fmt: skip
                    h = await level(lambda s: http_stream(session, url, model, tokens, s),
                                    concurrency, rounds)  # fmt: skip
                    rows.append({"trial": trial, "grpc": g, "http": h})
                    ratio = h["tokens_per_s"] / g["tokens_per_s"]
                    print(f"C={concurrency} trial {trial}: gRPC {g['tokens_per_s']:.0f} tok/s, "
                          f"HTTP {h['tokens_per_s']:.0f} tok/s ({ratio:.2f}x)",
                          flush=True)  # fmt: skip
    return rows


# -- Score ----------------------------------------------------------------------------------
async def timed(call, n: int) -> float:
    """Mean seconds per call over n sequential calls (after 20 warm-ups)."""
    for _ in range(20):
        await call()
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n


async def score(port: int, http_port: int, model: str, calls: int) -> dict:
    import aiohttp
    import grpc

    from rnnserve.kserve import grpc_predict_v2_pb2 as kpb
    from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
    from rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    raw = TEXT.encode()
    infer = kpb.ModelInferRequest(model_name=model)
    infer.inputs.add(name="text", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    native_req = pb.ScoreRequest(model=model, texts=[TEXT])
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}
    url = f"http://127.0.0.1:{http_port}/v2/models/{model}/infer"
    out: dict = {"calls": calls, "text_chars": len(TEXT)}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
            aiohttp.ClientSession() as session:  # fmt: skip
        native = pb_grpc.InferenceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)

        async def rest() -> None:
            async with session.post(url, json=body) as reply:
                assert reply.status == 200, await reply.text()
                await reply.read()

        for trial in range(2):
            out[f"native_grpc_us_{trial}"] = 1e6 * await timed(lambda: native.Score(native_req),
                                                               calls)  # fmt: skip
            out[f"kserve_grpc_us_{trial}"] = 1e6 * await timed(lambda: kserve.ModelInfer(infer),
                                                               calls)  # fmt: skip
            out[f"kserve_rest_us_{trial}"] = 1e6 * await timed(rest, calls)
    for name in ("native_grpc", "kserve_grpc", "kserve_rest"):
        out[f"{name}_us"] = round(min(out.pop(f"{name}_us_0"), out.pop(f"{name}_us_1")), 1)
    out["kserve_grpc_over_native"] = round(out["kserve_grpc_us"] / out["native_grpc_us"], 3)
    out["kserve_rest_over_native"] = round(out["kserve_rest_us"] / out["native_grpc_us"], 3)
    return out


def summary(rows: list[dict]) -> dict:
    """Per concurrency: the best trial of each protocol and their ratio (the machine is shared:
    the best trial is the least disturbed), and the median of the trials' own ratios."""
    out = {}
    for c in sorted({r["grpc"]["concurrency"] for r in rows}):
        mine = [r for r in rows if r["grpc"]["concurrency"] == c]
        g = max(r["grpc"]["tokens_per_s"] for r in mine)
        h = max(r["http"]["tokens_per_s"] for r in mine)
        ratios = sorted(r["http"]["tokens_per_s"] / r["grpc"]["tokens_per_s"] for r in mine)
        out[f"c{c}"] = {
            "grpc_tokens_per_s": g,
            "http_tokens_per_s": h,
            "http_over_grpc": round(h / g, 3),
            "http_over_grpc_median_trial": round(ratios[len(ratios) // 2], 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="lstm")
    ap.add_argument("--tokens", type=int, default=1000, help="max_tokens of each stream")
    ap.add_argument("--score-calls", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/protocols.json")
    args = ap.parse_args(argv)
    repo, source = ensure_model(args.repo, args.model)
    pinned = pin_to_cpu(0)
    http_port = free_port()
    server = Server(repo, ["--http-port", str(http_port)])
    started = time.perf_counter()
    try:
        rows = asyncio.run(generate(server.port, http_port, args.model, args.tokens))
        scored = asyncio.run(score(server.port, http_port, args.model, args.score_calls))
    finally:
        server.stop()
    result = {
        "model": args.model,
        "model_source": source,
        "tokens_per_stream": args.tokens,
        "client_pinned_to_cpu0": pinned,
        "generate": summary(rows),
        "generate_trials": rows,
        "score": scored,
        "targets": {"http_over_grpc_min": 0.7, "kserve_grpc_over_native_max": 1.5},
        "server_defaults": server_defaults(),
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"generate": result["generate"], "score": scored}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
