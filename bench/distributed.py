"""Data-parallel benchmark (issue 20): when does DDP pay on this machine?

For every recurrent model size of the zoo's default preset it measures
- training tokens/s through the real `fit` (sequential sampling, the preset's global batch and
  window) for 1 process x 1 thread, 1 process x 2 threads and 2 gloo ranks x 1 thread;
- the per-step cost of the gradient all-reduce: a gloo all_reduce of one tensor the size of the
  model's gradients between the 2 ranks (all these models fit DDP's first 25 MB bucket, so it
  is the same message DDP sends), and of the 2-float loss reduction fit adds per step.
The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT). The
machine has 2 cores shared with other work: the figures are honest for it, not for a quiet box.
Rounds are interleaved and the median is kept. Writes bench/results/distributed.{json,png}.
About 1 minute per round on the shared machine.

Usage: .venv/bin/python bench/distributed.py [--steps N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

from rnnserve.trainer.corpus import build_corpus, read_corpus  # noqa: E402
from rnnserve.trainer.distributed import joined  # noqa: E402
from rnnserve.trainer.models import ModelConfig, build_model  # noqa: E402
from rnnserve.trainer.train import TrainConfig, fit  # noqa: E402
from rnnserve.trainer.zoo import PRESETS, _recurrent  # noqa: E402

MODELS = ("rnn", "gru", "lstm", "lstm-deep", "bilstm")  # the zoo's recurrent models


def zoo_configs(vocab_size: int) -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """The default preset's shapes and batches, exactly as build_zoo trains them."""
    p = PRESETS["default"]
    out = {}
    for name in MODELS:
        arch, layers, bi = _recurrent(name)
        extra = p.lstm if name == "lstm" else {}
        model = ModelConfig(arch, vocab_size, extra.get("hidden", p.hidden), layers,
                            extra.get("embed", p.embed), bi, extra.get("dropout", 0.0))  # fmt: skip
        train = TrainConfig(epochs=1, num_steps=p.num_steps, sampling="sequential",
                            batch_size=extra.get("batch_size", p.batch_size),
                            lr=extra.get("lr", p.lr), device="cpu")  # fmt: skip
        out[name] = (model, train)
    return out


def throughput(model_cfg: ModelConfig, cfg: TrainConfig, ids: list[int], steps: int) -> float:
    """Global training tokens/s over `steps` optimizer steps (after a 2-step warm-up)."""
    span = cfg.batch_size * cfg.num_steps

    def run(n: int) -> float:
        torch.manual_seed(0)
        model = build_model(model_cfg)
        train = ids[: n * span + cfg.num_steps]  # exactly n steps at any offset
        started = time.perf_counter()
        fit(model, train, ids[-200:], cfg, progress=False, log=lambda _line: None)
        return time.perf_counter() - started

    run(2)
    return steps * span / run(steps)


def allreduce_ms(numel: int, reps: int = 20) -> float:
    """Median wall time of one SUM all_reduce of `numel` float32 values."""
    t = torch.zeros(numel)
    for _ in range(3):
        dist.all_reduce(t)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def worker(threads: int, steps: int) -> None:
    """One rank (or the single process): every model; rank 0 prints one JSON line."""
    corpus = build_corpus(read_corpus(None), _tokenizer())
    ids = corpus.vocab.encode(corpus.tokens)
    rows = {}
    with joined("cpu", 120) as cluster:
        for name, (model_cfg, cfg) in zoo_configs(len(corpus.vocab)).items():
            cfg.threads = threads
            row = {"tokens_per_s": throughput(model_cfg, cfg, ids, steps)}
            params = sum(p.numel() for p in build_model(model_cfg).parameters())
            row.update(params=params, global_batch=cfg.batch_size, num_steps=cfg.num_steps)
            if cluster.distributed:
                row["grad_allreduce_ms"] = allreduce_ms(params)
                row["loss_allreduce_ms"] = allreduce_ms(2)
            rows[name] = row
    if cluster.is_main:
        print(json.dumps(rows), flush=True)


def _tokenizer():
    from rnnserve.artifact.tokenizer import TokenizerConfig

    return TokenizerConfig(level="char", letters_only=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, threads: int, steps: int) -> dict:
    """Runs `worker` in `world` processes (torchrun's environment) and returns rank 0's rows."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}  # fmt: skip
        if world == 1:
            env.pop("WORLD_SIZE")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--threads", str(threads),
             "--steps", str(steps)],
            env=env, stdout=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def _medians(rounds: list[dict]) -> dict:
    """Per model, the median of each measured number over the rounds."""
    return {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
        for name in rounds[0]
    }


def paired_speedup(rounds: list[dict], name: str, run: str, base: str) -> float:
    """Median over the rounds of `run`'s tokens/s over `base`'s in the same round.

    Why paired: the rounds are interleaved so that a burst of other work hits every
    configuration of a round alike; a ratio of the two medians would divide figures taken in
    different rounds (on this machine rounds differ by up to 5x) and lose that pairing."""
    return statistics.median(
        r[run][name]["tokens_per_s"] / r[base][name]["tokens_per_s"] for r in rounds
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(names))]
        left.bar(xs, [result["models"][n][run]["tokens_per_s"] for n in names], width, label=run)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    left.set_ylabel("training tokens/s (global)")
    left.set_title("throughput on 2 shared cores")
    left.legend(fontsize=8)
    by_size = sorted(names, key=lambda n: result["models"][n]["params"])
    params = [result["models"][n]["params"] for n in by_size]
    comm = [result["models"][n]["grad_allreduce_ms"] for n in by_size]
    step = [result["models"][n]["step_ms_1x1"] for n in by_size]
    right.plot(params, comm, "o", label="gradient all-reduce (gloo, 2 ranks)")
    right.plot(params, step, "s", label="one step, 1 process x 1 thread")
    for n, x, y in zip(by_size, params, comm, strict=True):
        right.annotate(n, (x, y), fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("parameters")
    right.set_ylabel("ms per step")
    right.set_title("communication vs compute per step")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per model")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.threads, args.steps)
        return 0
    started = time.monotonic()
    runs = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2),
            "2 ranks x 1 thread": (2, 1)}  # fmt: skip
    load_before = os.getloadavg()[0]
    rounds = [  # interleaved, so a burst of other work hits every configuration alike
        {run: launch(world, threads, args.steps) for run, (world, threads) in runs.items()}
        for _ in range(args.repeats)
    ]
    measured = {run: _medians([r[run] for r in rounds]) for run in runs}
    two = measured["2 ranks x 1 thread"]
    models = {}
    for name in MODELS:
        one = measured["1 process x 1 thread"][name]
        step_ms = 1000 * one["global_batch"] * one["num_steps"] / one["tokens_per_s"]
        models[name] = {
            **{run: {"tokens_per_s": round(m[name]["tokens_per_s"]),
                     "rounds": [round(r[run][name]["tokens_per_s"]) for r in rounds]}
               for run, m in measured.items()},
            "params": one["params"], "global_batch": one["global_batch"],
            "num_steps": one["num_steps"], "step_ms_1x1": round(step_ms, 2),
            "grad_allreduce_ms": round(two[name]["grad_allreduce_ms"], 3),
            "loss_allreduce_ms": round(two[name]["loss_allreduce_ms"], 3),
            "speedup_2_ranks_vs_1x1": round(paired_speedup(
                rounds, name, "2 ranks x 1 thread", "1 process x 1 thread"), 2),
        }  # fmt: skip
    result = {
        "what": "zoo default-preset recurrent models, real fit(), sequential sampling, fp32 CPU",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, shared with other work",
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "torch": torch.__version__,
        "steps_timed": args.steps,
        "repeats": args.repeats,
        "runs": list(runs),
        "models": models,
        "seconds": round(time.monotonic() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "distributed.png")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
