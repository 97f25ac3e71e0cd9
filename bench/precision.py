"""Precision benchmark (issue 19): what int8 and fp16 cost in quality and buy in speed.

For the zoo's recurrent models and the serving benchmark's 2-layer LSTM (bench-lstm): the
fp32 package, its int8 copy (ONNX Runtime dynamic quantization, per-channel) and its fp16
copy, each made by trainer/precision.py's convert_package with its checks. Per model and
precision: validation perplexity (the whole validation split), package size (model.onnx),
bare step time (time = 1, the state fed back, one intra-op thread; the precisions take turns,
so their ratios hold on a busy machine) at batch 1 and 32, how much a row's log-probabilities
move when other rows share its batch (dynamic quantization scales activations per call), and
an ONNX Runtime profile of the int8 step at batch 32 by op.
Optionally Generate tokens/s under churn at C = 32 from bench/traffic.py (--traffic).

Zoo models missing from --model-repo are trained small (--max-tokens, --epochs) into
--cache. Writes bench/results/precision.json + precision.png.
Usage: python bench/precision.py [--models lstm,bench-lstm] [--traffic] [--markdown]
Takes about 1 min per model to measure (+ ~1-2 min each to train a missing one; --traffic
adds ~1 min per precision).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BIN, ROOT, init_state, machine_info, ort_session
from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.trainer.graph_check import OrtGraph, log_probs
from rnnserve.trainer.precision import convert_package, perplexity, text_rows

ZOO_RECURRENT = {  # name: rnn-trainer train flags (the default zoo preset's shapes)
    "rnn": ["--arch", "rnn", "--hidden", "128", "--embed", "32"],
    "gru": ["--arch", "gru", "--layers", "1", "--hidden", "128", "--embed", "32"],
    "lstm": ["--arch", "lstm", "--hidden", "256", "--embed", "64"],
    "lstm-deep": ["--arch", "lstm", "--layers", "2", "--hidden", "128", "--embed", "32"],
    "bilstm": ["--arch", "lstm", "--task", "infill", "--hidden", "128", "--embed", "32"],
}
BENCH_MODEL = "bench-lstm"
PRECISIONS = ("fp32", "int8", "fp16")
TARGETS = {"speedup_b32": 1.5, "speedup_b1": 1.3, "ppl_change": 0.01}


def _train(name: str, cache: Path, args: argparse.Namespace) -> Path:
    target = cache / name / "1"
    if (target / "model.onnx").exists():
        return target
    cmd = [str(BIN / "rnn-trainer"), "train", *ZOO_RECURRENT[name], "--name", name,
           "--out", str(cache), "--run-dir", str(cache / "runs" / name), "--epochs",
           str(args.epochs), "--max-tokens", str(args.max_tokens), "--num-steps", "64",
           "--batch-size", "32", "--lr", "0.005", "--sampling", "sequential",
           "--no-progress"]  # fmt: skip
    print(f"training {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return target


def _val_ids(package: Path) -> list[int]:
    """The validation split the package was trained with (its corpus read again)."""
    from rnnserve.trainer.checkpoint import load_checkpoint
    from rnnserve.trainer.pipeline import DataConfig, prepare, validation_probe

    if (package / "checkpoint.pt").exists():
        found = validation_probe(load_checkpoint(package / "checkpoint.pt"))
        if found:
            return found
    m = Manifest.load(package)
    record = m.training
    corpus = record.get("corpus")
    corpus = None if not corpus or str(corpus).startswith("builtin:") else corpus
    tok = m.tokenizer or TokenizerConfig()
    fraction = float(record.get("val_fraction", 0.1))
    data = DataConfig(corpus, tok, 1, record.get("max_tokens"), fraction)
    return prepare(data, list(m.vocab or [])).val_ids


def _step_ms(packages: dict[str, Path], batch: int, seconds: float, rounds: int = 6) -> dict:
    """Median ms of one decode step (time = 1, the state fed back, one thread) per package.

    The packages take turns, `rounds` slices each, so a busy spell on the shared machine falls
    on all of them alike and their ratios stay comparable (each figure is the median over all
    its slices)."""
    runs = {}
    for key, package in packages.items():
        sess, m = ort_session(package, threads=1)
        runs[key] = (sess, m, [m.output_name, *(s.output for s in m.state)], init_state(m, batch))
    x = np.full((batch, 1), 5, np.int64)
    times: dict[str, list[float]] = {key: [] for key in packages}
    for _ in range(rounds):
        for key, (sess, m, outputs, state) in runs.items():
            deadline = time.perf_counter() + seconds / rounds
            n = 0
            while time.perf_counter() < deadline or n < 20:
                t0 = time.perf_counter()
                _, *rest = sess.run(outputs, {m.input_name: x, **state})
                times[key].append(time.perf_counter() - t0)
                state = {s.input: v for s, v in zip(m.state, rest, strict=True)}
                n += 1
    return {key: float(np.median(t) * 1e3) for key, t in times.items()}


def _batch_dependence(package: Path, val: list[int]) -> float:
    """Max |log-prob| change of row 0 between running alone and inside a batch of 32 rows."""
    m = Manifest.load(package)
    g = OrtGraph(package / "model.onnx", m.input_name, m.output_name, m.state)
    rows = text_rows(val)[:, :64]
    batch = np.concatenate([rows] * (32 // rows.shape[0] + 1))[:32]
    alone, _ = g.run(batch[:1], list(init_state(m, 1).values()))
    shared, _ = g.run(batch, list(init_state(m, 32).values()))
    return float(np.max(np.abs(log_probs(alone[0]) - log_probs(shared[0]))))


def _profile(package: Path, batch: int = 32, steps: int = 200) -> dict[str, float]:
    """Share of kernel time per op type over `steps` decode steps (ORT's own profiler)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.enable_profiling = 1, True
    m = Manifest.load(package)
    state = init_state(m, batch)
    with tempfile.TemporaryDirectory() as tmp:  # a trace of every run: not left behind
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(package / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        for _ in range(steps):
            sess.run(None, {m.input_name: np.full((batch, 1), 5, np.int64), **state})
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values()) or 1.0
    return {k: round(v / total, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}


def _traffic(repo: Path, name: str, out: Path) -> float | None:
    """Generate tokens/s under churn at C=32 (closed loop), from bench/traffic.py (no server
    variants: only the default server's row is read, and they would add two servers' runs)."""
    cmd = [sys.executable, str(ROOT / "bench" / "traffic.py"), "--model-repo", str(repo),
           "--models", name, "--levels", "32", "--rates", "1x", "--duration", "5",
           "--warmup", "2", "--variants", "", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"traffic.py failed for {name}: {done.stderr.strip()[-400:]}", flush=True)
        return None
    data = json.loads((out / "traffic.json").read_text())
    return _find_tokens_per_s(data, name)


def _find_tokens_per_s(data: dict, name: str) -> float | None:
    """traffic.json: models.<name>.closed_loop.fixed[clients == 32].tokens_per_s."""
    rows = data["models"][name]["closed_loop"].get("fixed", [])
    return next((r["tokens_per_s"] for r in rows if r["clients"] == 32), None)


def measure(name: str, fp32: Path, work: Path, args: argparse.Namespace) -> dict:
    val = _val_ids(fp32)
    source = Manifest.load(fp32)
    row: dict = {"model": name, "architecture": source.architecture,
                 "hyperparameters": source.hyperparameters, "precisions": {}}  # fmt: skip
    packages = {
        precision: fp32 if precision == "fp32" else convert_package(
            fp32, work, name, precision, precision=precision, probe=val,
            probe_source="the validation split", allow_quality_loss=True)
        for precision in PRECISIONS
    }  # fmt: skip
    steps = {batch: _step_ms(packages, batch, args.seconds * len(packages)) for batch in (1, 32)}
    for precision, package in packages.items():
        m = Manifest.load(package)
        g = OrtGraph(package / "model.onnx", m.input_name, m.output_name, m.state)
        entry = {
            "val_perplexity": perplexity(g, text_rows(val), m.task),
            "val_tokens": int(text_rows(val).size),
            "model_onnx_bytes": (package / "model.onnx").stat().st_size,
            "step_ms_b1": steps[1][precision],
            "step_ms_b32": steps[32][precision],
            "batch_dependence_max_abs_logprob": _batch_dependence(package, val),
        }
        if precision != "fp32":
            entry["check"] = m.parity.get("precision", {})
            entry["quantization"] = {k: v for k, v in m.quantization.items() if k != "ops_before"}
        if precision == "int8" and m.state:
            entry["profile_b32"] = _profile(package)
        if precision == "fp32" and m.state:
            entry["profile_b32"] = _profile(package)
        row["precisions"][precision] = entry
        print(f"  {name} {precision}: ppl {entry['val_perplexity']:.4f}  "
              f"{entry['model_onnx_bytes'] / 1e6:.2f} MB  b1 {entry['step_ms_b1']:.3f} ms  "
              f"b32 {entry['step_ms_b32']:.3f} ms", flush=True)  # fmt: skip
    base = row["precisions"]["fp32"]
    for precision in ("int8", "fp16"):
        e = row["precisions"][precision]
        e["speedup_b1"] = base["step_ms_b1"] / e["step_ms_b1"]
        e["speedup_b32"] = base["step_ms_b32"] / e["step_ms_b32"]
        e["ppl_change"] = e["val_perplexity"] / base["val_perplexity"] - 1.0
        e["size_ratio"] = e["model_onnx_bytes"] / base["model_onnx_bytes"]
        e["meets"] = {
            "speedup_b32": e["speedup_b32"] >= TARGETS["speedup_b32"],
            "speedup_b1": e["speedup_b1"] >= TARGETS["speedup_b1"],
            "ppl_change": e["ppl_change"] <= TARGETS["ppl_change"],
        }
    if args.traffic and name == BENCH_MODEL:
        repo = work / "traffic-repo"
        for precision in ("fp32", "int8"):
            src = fp32 if precision == "fp32" else work / name / precision
            label = f"{name}-{precision}"
            shutil.copytree(src, repo / label / "1", dirs_exist_ok=True)
            tps = _traffic(repo, label, work / f"traffic-{precision}")
            row["precisions"][precision]["generate_tokens_per_s_c32"] = tps
            print(f"  {name} {precision}: Generate C=32 {tps} tokens/s", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    xs = np.arange(len(names))
    for i, (key, title) in enumerate((("speedup_b1", "batch 1"), ("speedup_b32", "batch 32"))):
        ax = axes[i]
        for j, precision in enumerate(("int8", "fp16")):
            vals = [r["precisions"][precision][key] for r in rows]
            ax.bar(xs + (j - 0.5) * 0.38, vals, 0.38, label=precision)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGETS[key], color="r", ls="--", lw=0.8, label=f"target {TARGETS[key]}x")
        ax.set_xticks(xs, names, rotation=20)
        ax.set_title(f"decode step speed vs fp32, {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    lines = ["| model | precision | val ppl | Δ ppl | model.onnx | step b1 | step b32 |"
             " × fp32 b1 / b32 | Generate C=32 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        for precision, e in r["precisions"].items():
            change = e.get("ppl_change")
            tps = e.get("generate_tokens_per_s_c32")
            speed = "" if change is None else f"{e['speedup_b1']:.2f} / {e['speedup_b32']:.2f}"
            lines.append(
                f"| {r['model']} | {precision} | {e['val_perplexity']:.3f} | "
                f"{'' if change is None else f'{change:+.2%}'} | "
                f"{e['model_onnx_bytes'] / 1e6:.2f} MB | {e['step_ms_b1']:.3f} ms | "
                f"{e['step_ms_b32']:.3f} ms | "
                f"{speed} | "
                f"{'' if tps is None else f'{tps:.0f} tok/s'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repo", type=Path, default=ROOT / "models")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "precision-models",
                   help="where missing zoo models are trained (small)")  # fmt: skip
    p.add_argument("--models", default=",".join([*ZOO_RECURRENT, BENCH_MODEL]))
    p.add_argument("--epochs", type=int, default=8, help="for zoo models trained here")
    p.add_argument("--max-tokens", type=int, default=60_000, help="for zoo models trained here")
    p.add_argument("--seconds", type=float, default=2.0, help="per step-time measurement")
    p.add_argument("--traffic", action="store_true", help="Generate C=32 via bench/traffic.py")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            existing = args.model_repo / name / "1"
            if (existing / "model.onnx").exists():
                fp32 = existing
            elif name in ZOO_RECURRENT:
                fp32 = _train(name, args.cache, args)
            else:
                print(f"skipping {name}: not in {args.model_repo}", flush=True)
                continue
            rows.append(measure(name, fp32, Path(tmp), args))
    result = {
        "machine": machine_info(),
        "threads": 1,
        "targets": TARGETS,
        "rows": rows,
        "seconds": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    if rows:
        plot(rows, args.out / "precision.png")
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
