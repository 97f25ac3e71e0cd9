"""Quality benchmark (issue 3 item 8): validation perplexity of every text model, same budget.

Char level (letters and spaces, lowercased) on ../shared/data/timemachine.txt, first 90% for
training, last 10% for validation. Every neural model gets the same budget (epochs x windows,
optimizer, learning rate); the n-gram picks its best alpha on the validation split (reported).
The bidirectional model's number is an *infill* perplexity (it sees both sides), not
comparable to the left-to-right ones. Also measures training tokens/s of the scratch cells
(textbook Python loop) against torch.nn. Writes bench/results/quality.{json,png}.

Usage: .venv/bin/python bench/quality.py [--epochs N] [--hidden H] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rnnserve.artifact.tokenizer import TokenizerConfig  # noqa: E402
from rnnserve.trainer.corpus import build_corpus, read_corpus, split_ids  # noqa: E402
from rnnserve.trainer.models import ModelConfig, build_model  # noqa: E402
from rnnserve.trainer.scratch import scratch_lm  # noqa: E402
from rnnserve.trainer.train import TrainConfig, fit, perplexity  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"
RESULTS = ROOT / "bench" / "results"
NEURAL = {  # name: (arch, layers, bidirectional)
    "rnn": ("rnn", 1, False),
    "gru": ("gru", 1, False),
    "lstm": ("lstm", 1, False),
    "lstm-2layer": ("lstm", 2, False),
    "bilstm (infill)": ("lstm", 1, True),
}
ALPHAS = (0.001, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0)


def ngram_rows(train: list[int], val: list[int], v: int) -> list[dict]:
    from rnnserve.trainer.ngram import NgramConfig, NgramCounts

    rows = []
    for n in range(1, 6):
        best = None
        for alpha in ALPHAS:
            started = time.monotonic()
            counts = NgramCounts.fit(train, NgramConfig(vocab_size=v, n=n, alpha=alpha))
            ppl = float(counts.perplexity(val))  # sparse counts: n=5 is too big to export
            if best is None or ppl < best["val_ppl"]:
                best = {"model": f"ngram n={n}", "val_ppl": ppl, "alpha": alpha,
                        "seconds": time.monotonic() - started}  # fmt: skip
        assert best is not None
        rows.append(best)
        print(f"{best['model']:18s} val ppl {best['val_ppl']:.3f} (alpha {best['alpha']})")
    return rows


def hmm_row(train: list[int], val: list[int], v: int, states: int, epochs: int) -> dict:
    from rnnserve.trainer.hmm import train_hmm

    started = time.monotonic()
    model = train_hmm(train, v, states=states, method="em", epochs=epochs, seed=0, progress=False)
    row = {"model": f"hmm K={states} (EM)", "val_ppl": float(model.perplexity(val)),
           "seconds": time.monotonic() - started, "epochs": epochs}  # fmt: skip
    print(f"{row['model']:18s} val ppl {row['val_ppl']:.3f}")
    return row


def neural_rows(train: list[int], val: list[int], v: int, args) -> list[dict]:
    rows = []
    cfg = TrainConfig(epochs=args.epochs, num_steps=args.num_steps, batch_size=args.batch_size,
                      lr=args.lr, lr_decay=args.lr_decay, average_from=args.average_from,
                      sampling="sequential", seed=0)  # fmt: skip
    for name, (arch, layers, bi) in NEURAL.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch, v, args.hidden, layers, args.embed, bi, args.dropout))
        started = time.monotonic()
        history = fit(model, train, val, cfg, progress=False, log=lambda *_: None)
        seconds = time.monotonic() - started
        # the whole validation split as one stream (like the n-gram), after the last epoch
        exact = perplexity(model, val, torch.device("cpu"), rows=1)
        row = {"model": name, "val_ppl": exact,
               "train_ppl": history[-1]["train_ppl"], "seconds": seconds,
               "epochs": args.epochs, "hidden": args.hidden, "layers": layers,
               "train_tokens_per_s": history[-1]["tokens"] * args.epochs / seconds}  # fmt: skip
        print(f"{name:18s} val ppl {row['val_ppl']:.3f}  ({seconds:.0f}s)")
        rows.append(row)
    return rows


def cell_speed(v: int, hidden: int, batches: int = 8) -> list[dict]:
    """Training tokens/s, scratch (Python loop over time) vs torch.nn, same sizes."""
    rows = []
    x = torch.randint(0, v, (32, 32))  # [batch, time]
    for arch in ("rnn", "gru", "lstm"):
        for kind in ("scratch", "torch.nn"):
            torch.manual_seed(0)
            config = ModelConfig(arch, v, hidden, 1, 32)
            model = scratch_lm(config) if kind == "scratch" else build_model(config)
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            started = time.monotonic()
            for _ in range(batches):
                logits, *_ = model(x, *model.initial_state(32))
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, v), x.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            rate = batches * x.numel() / (time.monotonic() - started)
            rows.append({"arch": arch, "cell": kind, "train_tokens_per_s": rate})
            print(f"{arch:5s} {kind:9s} {rate:10.0f} tokens/s")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["model"] for r in rows]
    ax.barh(names, [r["val_ppl"] for r in rows], color="tab:blue")
    ax.set_xlabel("validation perplexity (char level; lower is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The README/docs table for a results JSON."""
    lines = ["| model | val perplexity | train s |", "|---|---|---|"]
    for r in result["models"]:
        extra = f" (alpha {r['alpha']})" if "alpha" in r else ""
        lines.append(f"| {r['model']}{extra} | {r['val_ppl']:.3f} | {r['seconds']:.0f} |")
    t = result["target"]
    lines.append("")
    met = "met" if t["met"] else "not met"
    lines.append(f"Uniform baseline |V| = {result['vocab_size']}. LSTM / best n-gram = "
                 f"{t['ratio']:.3f} (target < 0.8: {met}).")  # fmt: skip
    lines += ["", "| cell | scratch tokens/s | torch.nn tokens/s |", "|---|---|---|"]
    speed = {(r["arch"], r["cell"]): r["train_tokens_per_s"] for r in result["cell_speed"]}
    for arch in ("rnn", "gru", "lstm"):
        lines.append(
            f"| {arch} | {speed[(arch, 'scratch')]:.0f} | {speed[(arch, 'torch.nn')]:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--average-from", type=int, default=13, help="SWA from this epoch")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--lr-decay", type=float, default=0.9)
    parser.add_argument("--hmm-states", type=int, default=64)
    parser.add_argument("--hmm-epochs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, small models")
    parser.add_argument("--table", action="store_true", help="print the table of the results")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads((RESULTS / "quality.json").read_text())))
        return 0
    if args.quick:
        args.epochs, args.hidden, args.hmm_states, args.hmm_epochs = 1, 32, 4, 2
        args.average_from = 1
    torch.set_num_threads(1)
    text = read_corpus(CORPUS if CORPUS.exists() else None)
    corpus = build_corpus(text, TokenizerConfig(level="char", letters_only=True))
    train, val = split_ids(corpus.ids, 0.1)
    v = len(corpus.vocab)
    print(f"corpus {len(corpus.ids)} chars, |V| = {v}, train {len(train)}, val {len(val)}")
    rows = ngram_rows(train, val, v)
    rows.append(hmm_row(train, val, v, args.hmm_states, args.hmm_epochs))
    rows += neural_rows(train, val, v, args)
    speed = cell_speed(v, args.hidden)
    best_ngram = min(r["val_ppl"] for r in rows if r["model"].startswith("ngram"))
    lstm = next(r["val_ppl"] for r in rows if r["model"] == "lstm")
    result = {
        "corpus": str(CORPUS.relative_to(ROOT.parent)) if CORPUS.exists() else "builtin",
        "tokenizer": "char, lowercase, letters and spaces only",
        "vocab_size": v, "train_tokens": len(train), "val_tokens": len(val),
        "uniform_ppl": float(v),
        "budget": {"epochs": args.epochs, "hidden": args.hidden, "embed": args.embed,
                   "dropout": args.dropout, "num_steps": args.num_steps,
                   "batch_size": args.batch_size, "optimizer": "adam", "lr": args.lr,
                   "lr_decay": args.lr_decay, "average_from": args.average_from, "clip": 1.0,
                   "sampling": "sequential"},
        "models": rows,
        "cell_speed": speed,
        "target": {"lstm_val_ppl": lstm, "best_ngram_val_ppl": best_ngram,
                   "ratio": lstm / best_ngram, "met": lstm < 0.8 * best_ngram},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": 1, "processor": platform.machine()},
        "quick": args.quick,
    }  # fmt: skip
    out = Path(tempfile.gettempdir()) if args.quick else RESULTS  # smoke runs: not committed
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "quality.png")
    print(f"lstm / best n-gram = {lstm / best_ngram:.3f} (target < 0.8)")
    print(f"wrote {out}/quality.json and quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
