"""Quality benchmark (issues 3 and 15): does `rnn-trainer train` with no tuning flags beat the
best n-gram on books it was not tuned on, and what do the defaults cost and buy?

For each corpus (char level, lowercased letters and spaces) and each of lstm and gru it runs
the real CLI, `rnn-trainer train --arch A [--corpus F] [--val-fraction f]`, as a user would,
timed end to end (corpus, training, ONNX export and its check), once with the default recipe
(no tuning flags) and once with the tuned settings (TUNED: more epochs, no time budget, no
early stopping), and optionally with the previous defaults (OLD_DEFAULTS). Beside them: the
best Laplace n-gram (n <= 5, alpha picked on the validation split). Perplexities are over the
whole validation split as one stream (state carried), like the n-gram's; the CLI's own number
(16 rows, each started cold) is kept as `cli_val_ppl`.

Corpora: the shipped Time Machine with its default 90/10 split and split in halves (train on
the first, validate on the second); the King James Bible (Debian `bible-kjv-text`, decoded by
Debian `bible-kjv`'s own program) and Jane Austen's *Persuasion* (Debian
`r-cran-janeaustenr`), 250,000-character slices, fetched at run time with `apt-get download`
into ~/.cache/rnnserve-bench (a corpus that cannot be fetched is skipped with a message).

Rows are merged into bench/results/quality.json by (corpus, arch, recipe), so parts can be
rerun; each row records the nice value and load average it ran under. `--architectures` also
reruns the per-architecture table (rnn, gru, lstm, 2-layer lstm, bilstm, HMM) on the default
split with the tuned budget; otherwise that table is kept from the last run.

Usage: .venv/bin/python bench/quality.py [--corpora A,B] [--archs lstm,gru]
       [--recipes default,tuned,old-default] [--architectures] [--quick] [--table]
       [--ngram-only]  (the baselines alone, after a change to the n-gram)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rnnserve.artifact.tokenizer import TokenizerConfig  # noqa: E402
from rnnserve.trainer.checkpoint import load_checkpoint, restore  # noqa: E402
from rnnserve.trainer.pipeline import DataConfig, prepare, validation_probe  # noqa: E402
from rnnserve.trainer.train import perplexity  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnserve-bench"
SLICE_CHARS = 250_000
TARGET = 0.8
ALPHAS = (0.001, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0)
TOKENIZER = TokenizerConfig(level="char", letters_only=True)
QUIET = ["--no-progress"]
TUNED = {  # per arch: the best settings found, with no time limit (docs/trainer.md)
    "lstm": ["--layers", "1", "--hidden", "512", "--embed", "64", "--dropout", "0.4", "--lr",
             "0.005", "--lr-decay", "0.9", "--epochs", "24", "--average-from", "13",
             "--batch-size", "16", "--num-steps", "32", "--sampling", "sequential",
             "--patience", "0", "--time-budget", "0"],
    "gru": ["--layers", "2", "--hidden", "320", "--embed", "64", "--dropout", "0.2",
            "--weight-drop", "0.2", "--weight-decay", "0.2", "--lr", "0.003", "--lr-decay", "0.9",
            "--epochs", "24",
            "--average-from", "13", "--batch-size", "16", "--num-steps", "32", "--sampling",
            "sequential", "--patience", "0", "--time-budget", "0"],
}  # fmt: skip
OLD_DEFAULTS = ["--hidden", "128", "--embed", "32", "--dropout", "0", "--lr", "0.01",
                "--lr-decay", "1", "--epochs", "10", "--average-from", "0", "--batch-size", "32",
                "--num-steps", "32", "--sampling", "random", "--patience", "0",
                "--time-budget", "0"]  # fmt: skip
RECIPES = ("default", "tuned", "old-default")


class Unavailable(Exception):
    """A corpus that cannot be fetched here (offline, no apt-get): skipped, not failed."""


# --- corpora ----------------------------------------------------------------------------------


def _apt_download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        if shutil.which("apt-get") is None:
            raise Unavailable("apt-get is not available")
        run = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        found = sorted(into.glob(f"{package}_*.deb"))
        if run.returncode != 0 or not found:
            raise Unavailable(f"apt-get download {package} failed: {run.stderr.strip()[-200:]}")
    unpacked = into / package
    if not unpacked.exists():
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(unpacked)], check=True)
    return unpacked


def kjv_text() -> str:
    """The KJV (public domain) from Debian's bible-kjv-text, decoded by bible-kjv's `bible`."""
    data = _apt_download("bible-kjv-text", CACHE / "debs") / "usr" / "lib"
    program = _apt_download("bible-kjv", CACHE / "debs") / "usr" / "bin" / "bible"
    run = subprocess.run([str(program), "-p", str(data), "-d", "bible.data", "gen1:1-rev22:21"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if run.returncode != 0 or len(run.stdout) < SLICE_CHARS:
        raise Unavailable(f"the bible program did not print the text: {run.stderr[-200:]}")
    lines = []
    for line in run.stdout.splitlines():
        if re.match(r"^\S.* \d+$", line):  # "Genesis 1": chapter headings
            continue
        lines.append(re.sub(r"^\s*\d+ ", "", line))  # verse numbers
    return "\n".join(lines).strip()


def _r_strings(blob: bytes) -> list[str]:
    """The character strings of an R serialization (XDR): CHARSXP = flags, length, bytes."""
    out, pos = [], 0
    marker = re.compile(rb"\x00\x04\x00\x09|\x00\x00\x80\x09|\x00\x00\x00\x09")
    while (m := marker.search(blob, pos)) is not None:
        (length,) = struct.unpack(">i", blob[m.end() : m.end() + 4])
        if not 0 <= length <= 100_000:
            pos = m.end()
            continue
        out.append(blob[m.end() + 4 : m.end() + 4 + length].decode("utf-8", "replace"))
        pos = m.end() + 4 + length
    return out


def persuasion_text() -> str:
    """Jane Austen's Persuasion (1817, public domain) from Debian's r-cran-janeaustenr (MIT
    packaging): the lines of its R lazy-load database, one zlib stream per object."""
    root = _apt_download("r-cran-janeaustenr", CACHE / "debs")
    db = (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    pos = 0
    while pos < len(db):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(db[pos + 4 :])
        pos = len(db) - len(inflater.unused_data)
        lines = _r_strings(blob)
        if lines and lines[0].strip().lower() == "persuasion":
            return "\n".join(lines)
    raise Unavailable("Persuasion not found in janeaustenr's data")


CORPORA = {  # name: (text source or None for the shipped book, validation fraction, note)
    "timemachine": (None, 0.1, "H. G. Wells, The Time Machine (1895, public domain), shipped "
                    "as trainer/data/timemachine.txt; default split (last 10% validation)"),
    "timemachine-halves": (None, 0.5, "the same book, first half train, second half "
                           "validation"),
    "kjv": (kjv_text, 0.1, "King James Bible (1611, public domain), Debian bible-kjv-text "
            "(decoded by bible-kjv), first 250,000 characters (Genesis, Exodus 1-9)"),
    "persuasion": (persuasion_text, 0.1, "Jane Austen, Persuasion (1817, public domain), "
                   "Debian r-cran-janeaustenr (MIT), first 250,000 characters"),
}  # fmt: skip


def corpus_file(name: str) -> Path | None:
    """The text file for --corpus (None: the shipped book), cached; Unavailable if offline."""
    source = CORPORA[name][0]
    if source is None:
        return None
    path = CACHE / f"{name}.txt"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(source()[:SLICE_CHARS], encoding="utf-8")
    return path


# --- runs -------------------------------------------------------------------------------------


def _data(path: Path | None, val_fraction: float) -> DataConfig:
    return DataConfig(str(path) if path else None, TOKENIZER, 1, None, val_fraction)


def ngram_rows(path: Path | None, val_fraction: float) -> list[dict]:
    from rnnserve.trainer.ngram import NOT_TEXT_IDS, NgramConfig, NgramCounts

    prep = prepare(_data(path, val_fraction))
    v = len(prep.vocab)
    rows = []
    for n in range(1, 6):
        started = time.monotonic()
        best = min((float(NgramCounts.fit(prep.train_ids, NgramConfig(vocab_size=v, n=n,
                    alpha=a, excluded=NOT_TEXT_IDS)).perplexity(prep.val_ids)), a)
                   for a in ALPHAS)  # fmt: skip
        rows.append({"model": f"ngram n={n}", "val_ppl": best[0], "alpha": best[1],
                     "seconds": time.monotonic() - started})  # fmt: skip
    return rows


def _flags(recipe: str, arch: str) -> list[str]:
    return {"default": [], "tuned": TUNED[arch], "old-default": OLD_DEFAULTS}[recipe]


def cli_row(arch: str, recipe: str, path: Path | None, val_fraction: float, quick: bool) -> dict:
    """`rnn-trainer train` in a subprocess, timed end to end; the exact validation ppl after."""
    flags = _flags(recipe, arch)
    if quick:
        flags = [*flags, "--epochs", "1", "--hidden", "32", "--max-tokens", "20000"]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", "--arch", arch, "--out", f"{tmp}/m", "--run-dir", f"{tmp}/r", *QUIET]
        if path is not None:
            argv += ["--corpus", str(path)]
        if val_fraction != 0.1:
            argv += ["--val-fraction", str(val_fraction)]
        argv += flags
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "rnnserve.trainer.cli", *argv], cwd=tmp,
                             capture_output=True, text=True)  # fmt: skip
        seconds = time.monotonic() - started
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {run.stderr[-2000:]}")
        log = [json.loads(line) for line in Path(f"{tmp}/r/log.jsonl").read_text().splitlines()]
        checkpoint = load_checkpoint(Path(f"{tmp}/m/{arch}/1/checkpoint.pt"))
        model, config, _vocab, _tok = restore(checkpoint)
        val = validation_probe(checkpoint)
        assert val is not None
        exact = perplexity(model, val, torch.device("cpu"), rows=1)
    last = log[-1]
    return {
        "arch": arch, "recipe": recipe, "command": "rnn-trainer " + " ".join(
            a for a in argv if not a.startswith(tmp) and a not in ("--out", "--run-dir")),
        "val_ppl": exact, "cli_val_ppl": last["val_ppl"], "train_ppl": last["train_ppl"],
        "seconds": seconds, "epochs_run": last["epoch"], "stopped": last.get("stopped"),
        "averaged_epochs": last.get("averaged_epochs"),
        "restored_epoch": last.get("restored_epoch"),
        "train_tokens_per_epoch": last["tokens"], "hidden": config.hidden,
        "dropout": config.dropout, "nice": os.nice(0), "loadavg_1m": [load_before,
                                                                      os.getloadavg()[0]],
    }  # fmt: skip


# --- the per-architecture table (issue 3), default split, tuned budget ------------------------

ARCHITECTURES = {  # name: (arch, layers, bidirectional)
    "rnn": ("rnn", 1, False),
    "gru": ("gru", 1, False),
    "lstm": ("lstm", 1, False),
    "lstm-2layer": ("lstm", 2, False),
    "bilstm (infill)": ("lstm", 1, True),
}


def architecture_rows(quick: bool) -> list[dict]:
    from rnnserve.trainer.hmm import train_hmm
    from rnnserve.trainer.models import ModelConfig, build_model
    from rnnserve.trainer.train import TrainConfig, fit

    prep = prepare(_data(None, 0.1))
    v = len(prep.vocab)
    epochs, hidden = (1, 32) if quick else (24, 512)
    started = time.monotonic()
    hmm = train_hmm(prep.train_ids, v, states=4 if quick else 64, method="em",
                    epochs=2 if quick else 50, seed=0, progress=False)  # fmt: skip
    rows = [{"model": "hmm K=64 (EM)", "val_ppl": float(hmm.perplexity(prep.val_ids)),
             "seconds": time.monotonic() - started}]  # fmt: skip
    cfg = TrainConfig(epochs=epochs, num_steps=32, batch_size=16, lr=0.005, lr_decay=0.9,
                      average_from=min(13, epochs), sampling="sequential", seed=0)  # fmt: skip
    for name, (arch, layers, bi) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch, v, hidden, layers, 64, bi, 0.4))
        started = time.monotonic()
        history = fit(model, prep.train_ids, prep.val_ids, cfg, progress=False,
                      log=lambda *_: None)  # fmt: skip
        seconds = time.monotonic() - started
        rows.append({"model": name, "val_ppl": perplexity(model, prep.val_ids,
                     torch.device("cpu"), rows=1), "train_ppl": history[-1]["train_ppl"],
                     "seconds": seconds, "epochs": epochs, "hidden": hidden,
                     "layers": layers})  # fmt: skip
        print(f"  {name:16s} val ppl {rows[-1]['val_ppl']:.3f} ({seconds:.0f}s)", flush=True)
    return rows


# --- results ----------------------------------------------------------------------------------


def summary(result: dict) -> list[dict]:
    """One row per (corpus, arch, recipe): ratio to the corpus's best n-gram, target met."""
    out = []
    for name, corpus in result["corpora"].items():
        best = min(r["val_ppl"] for r in corpus["ngram"])
        for row in corpus["runs"]:
            ratio = row["val_ppl"] / best
            out.append({"corpus": name, "arch": row["arch"], "recipe": row["recipe"],
                        "val_ppl": row["val_ppl"], "best_ngram_val_ppl": best,
                        "ratio": ratio, "met": ratio <= TARGET, "seconds": row["seconds"],
                        "epochs_run": row["epochs_run"]})  # fmt: skip
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(result)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    labels = [f"{r['corpus']} {r['arch']} {r['recipe']} ({r['seconds']:.0f}s)" for r in rows]
    colors = ["tab:green" if r["met"] else "tab:red" for r in rows]
    ax.barh(labels, [r["ratio"] for r in rows], color=colors)
    ax.axvline(TARGET, color="black", linestyle="--", label=f"target {TARGET}x")
    ax.set_xlabel("validation perplexity / best Laplace n-gram's (lower is better)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The README tables for a results JSON."""
    lines = ["| corpus | arch | recipe | val ppl | best n-gram | ratio | seconds | epochs "
             "| timed |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    runs = {(c, r["arch"], r["recipe"]): r for c, v in result["corpora"].items() for r in v["runs"]}
    for r in summary(result):
        run = runs[(r["corpus"], r["arch"], r["recipe"])]
        mark = "" if r["met"] else " ✗"
        timed = "alone" if run["nice"] == 0 else f"shared, nice {run['nice']}"
        stop = " (budget)" if (run["stopped"] or "").startswith("time") else ""
        lines.append(
            f"| {r['corpus']} | {r['arch']} | {r['recipe']} | {r['val_ppl']:.3f} | "
            f"{r['best_ngram_val_ppl']:.3f} | {r['ratio']:.3f}{mark} | {r['seconds']:.0f} | "
            f"{r['epochs_run']}{stop} | {timed} |"
        )
    models = result.get("architectures", {}).get("models", [])
    if models:
        lines += ["", "| model (timemachine 90/10, issue-3 budget) | val perplexity | train s |",
                  "|---|---|---|"]  # fmt: skip
        for m in models:
            extra = f" (alpha {m['alpha']})" if "alpha" in m else ""
            lines.append(f"| {m['model']}{extra} | {m['val_ppl']:.3f} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def _merge(old: dict, name: str, corpus: dict) -> dict:
    kept = old.get("corpora", {}).get(name, {}).get("runs", [])
    fresh = {(r["arch"], r["recipe"]) for r in corpus["runs"]}
    corpus["runs"] = [r for r in kept if (r["arch"], r["recipe"]) not in fresh] + corpus["runs"]
    order = {r: i for i, r in enumerate(RECIPES)}
    corpus["runs"].sort(key=lambda r: (r["arch"] != "lstm", order.get(r["recipe"], 9)))
    return corpus


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default=",".join(CORPORA))
    parser.add_argument("--archs", default="lstm,gru")
    parser.add_argument("--recipes", default="default,tuned")
    parser.add_argument(
        "--architectures",
        action="store_true",
        help="also rerun the per-architecture table (about 30 minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run into /tmp")
    parser.add_argument("--table", action="store_true", help="print the table of the results")
    parser.add_argument("--results", default=str(RESULTS), help="where quality.json lives")
    parser.add_argument(
        "--merge", default=None, help="only merge the runs of another quality.json into --results"
    )
    parser.add_argument(
        "--ngram-only", action="store_true",
        help="only recompute the n-gram baselines of --corpora (seconds), keeping every run",
    )  # fmt: skip
    args = parser.parse_args()  # fmt: skip
    if args.table:
        print(markdown(json.loads((Path(args.results) / "quality.json").read_text())))
        return 0
    torch.set_num_threads(1)
    out = Path(tempfile.gettempdir()) / "quality-quick" if args.quick else Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    result = _load(out / "quality.json")
    if args.merge:
        for name, corpus in _load(Path(args.merge))["corpora"].items():
            result["corpora"][name] = _merge(result, name, corpus)
        _write(result, out)
        print(markdown(result))
        return 0
    if args.ngram_only:
        for name in args.corpora.split(","):
            _source, val_fraction, _note = CORPORA[name]
            corpus = result["corpora"][name]
            corpus["ngram"] = ngram_rows(corpus_file(name), val_fraction)
            print(f"{name}: best n-gram {min(r['val_ppl'] for r in corpus['ngram']):.3f}")
            if name == "timemachine":  # the architectures table starts with the same rows
                models = result.get("architectures", {}).get("models", [])
                others = [m for m in models if not m["model"].startswith("ngram ")]
                result["architectures"]["models"] = corpus["ngram"] + others
        _write(result, out)
        print(markdown(result))
        return 0
    for name in args.corpora.split(","):
        _source, val_fraction, note = CORPORA[name]
        try:
            path = corpus_file(name)
        except Unavailable as exc:
            print(f"skipping {name}: {exc}")
            continue
        prep = prepare(_data(path, val_fraction))
        corpus = {"source": note, "val_fraction": val_fraction,
                  "train_tokens": len(prep.train_ids), "val_tokens": len(prep.val_ids),
                  "vocab_size": len(prep.vocab), "ngram": ngram_rows(path, val_fraction),
                  "runs": []}  # fmt: skip
        best = min(r["val_ppl"] for r in corpus["ngram"])
        print(f"{name}: train {len(prep.train_ids)} val {len(prep.val_ids)} chars, best n-gram "
              f"{best:.3f}", flush=True)  # fmt: skip
        for arch in args.archs.split(","):
            for recipe in args.recipes.split(","):
                row = cli_row(arch, recipe, path, val_fraction, args.quick)
                corpus["runs"].append(row)
                print(
                    f"  {arch:4s} {recipe:11s} val ppl {row['val_ppl']:.3f} = "
                    f"{row['val_ppl'] / best:.3f}x n-gram  {row['seconds']:.0f}s  "
                    f"{row['epochs_run']} epochs {row['stopped'] or ''}",
                    flush=True,
                )
                result["corpora"][name] = _merge(result, name, dict(corpus))
                _write(result, out)
        result["corpora"][name] = _merge(result, name, corpus)
    if args.architectures:
        result["architectures"] = {
            "models": architecture_rows(args.quick),
            "note": "24 epochs, 90/10 split, the tuned lstm budget",
        }
    _write(result, out)
    print(markdown(result))
    print(f"wrote {out}/quality.json and quality.png")
    return 0


def _load(path: Path) -> dict:
    result = json.loads(path.read_text()) if path.exists() else {}
    if "corpora" not in result:  # the issue-3 layout: keep its table as the architectures'
        result = {"architectures": {"models": result.get("models", []),
                                    "cell_speed": result.get("cell_speed", []),
                                    "note": "issue 3 run, 24 epochs, 90/10 split"}}  # fmt: skip
    result.setdefault("corpora", {})
    return result


def _write(result: dict, out: Path) -> None:
    result["summary"] = summary(result)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cpus": os.cpu_count(), "processor": platform.machine()}  # fmt: skip
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "quality.png")


if __name__ == "__main__":
    sys.exit(main())
