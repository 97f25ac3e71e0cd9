"""Token statistics: the most frequent uni-, bi- and trigrams, and Zipf's law as a plot (PNG).

`rnn-trainer stats [--corpus PATH] [--level char|word] [--keep-case] [--letters-only]
[--top 10] [--plot zipf.png]` tokenizes with the same tokenizer the models use
(artifact.tokenizer); with the settings a model was trained with (`rnn-trainer train` maps
non-letters to spaces unless --keep-punctuation: --letters-only here) the numbers describe
exactly what that model sees. Zipf's law says frequency ∝ rank^(-s): a straight line on
log-log axes; we print the fitted exponent s for each order.
"""

from __future__ import annotations

import argparse
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rnnserve.artifact.tokenizer import LEVELS, Tokenizer, TokenizerConfig
from rnnserve.trainer import plot_path
from rnnserve.trainer.corpus import read_corpus
from rnnserve.trainer.errors import TrainerError

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "timemachine.txt"
ORDERS = (1, 2, 3)
NAMES = {1: "unigrams", 2: "bigrams", 3: "trigrams"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `rnn-trainer stats`."""
    parser.add_argument(
        "--corpus", type=Path, default=None, help="UTF-8 text file (default: built-in Time Machine)"
    )
    parser.add_argument("--level", choices=LEVELS, default="char", help="token level")
    parser.add_argument("--keep-case", action="store_true", help="do not lowercase")
    parser.add_argument(
        "--letters-only",
        action="store_true",
        help="map runs of characters outside a-z/A-Z (accented letters too) to one space, "
        "as `rnn-trainer train` does without --keep-punctuation",
    )
    parser.add_argument("--top", type=int, default=10, help="rows per n-gram table (default 10)")
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("zipf.png"),
        help="Zipf plot file, PNG (or SVG/PDF by its suffix .svg/.pdf) (default zipf.png)",
    )


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of every run of n consecutive tokens."""
    return Counter(zip(*(tokens[i:] for i in range(n)), strict=False))


def zipf_exponent(counts: Counter) -> float:
    """Least-squares slope s of log(freq) = c - s log(rank); nan with fewer than 2 ranks."""
    freqs = np.array(sorted(counts.values(), reverse=True), dtype=np.float64)
    if len(freqs) < 2:
        return math.nan
    if freqs[0] == freqs[-1]:  # flat: exactly 0, where the fit prints "-0.000"
        return 0.0
    ranks = np.arange(1, len(freqs) + 1, dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(freqs), 1)[0]
    return float(-slope)


def _show(gram: tuple[str, ...], level: str) -> str:
    """A readable n-gram: char n-grams quoted with spaces visible (a leading combining mark,
    which would sit on the opening quote, escaped), words joined by spaces."""
    if level == "char":
        quoted = repr("".join(gram))
        if unicodedata.combining(quoted[1]):
            quoted = f"{quoted[0]}\\u{ord(quoted[1]):04x}{quoted[2:]}"
        return quoted
    return " ".join(gram)


def _columns(text: str) -> int:
    """Terminal columns of text: wide (CJK) characters take two, combining marks none; padding
    by len() pushed every row holding 日本 two columns per character out of line."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def _pad(text: str, width: int) -> str:
    """text left-aligned in `width` terminal columns."""
    return text + " " * max(0, width - _columns(text))


def format_table(counts: Counter, n: int, level: str, top: int) -> str:
    """A fixed-width table of the `top` most frequent n-grams (ties by text, stable)."""
    total = sum(counts.values())
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    shown = [_show(g, level) for g, _ in rows]
    width = max([len(NAMES[n]), *map(_columns, shown)])
    lines = [f"{'rank':>4}  {_pad(NAMES[n], width)}  {'count':>8}  {'freq':>7}"]
    for rank, (text, (_, count)) in enumerate(zip(shown, rows, strict=True), start=1):
        lines.append(f"{rank:>4}  {_pad(text, width)}  {count:>8}  {count / total:>7.4f}")
    return "\n".join(lines)


def plot_format(path: Path) -> str:
    """The format --plot is written in, checked before any counting (trainer/plot_path.py)."""
    return plot_path.plot_format(path, "--plot", "zipf.png")


def plot_zipf(all_counts: dict[int, Counter], path: Path, title: str) -> None:
    """log-log frequency vs rank for each order, in the format of the file's suffix
    (plot_format; matplotlib Agg)."""
    plt = plot_path.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, counts in all_counts.items():
        freqs = sorted(counts.values(), reverse=True)
        ax.loglog(range(1, len(freqs) + 1), freqs, label=NAMES[n])
    ax.set_xlabel("rank")
    ax.set_ylabel("frequency")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=plot_format(path))
    except OSError as exc:
        raise TrainerError(f"cannot write plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Prints the n-gram tables and Zipf exponents, writes the plot; returns 0."""
    top = getattr(args, "top", 10)
    if top < 1:
        raise TrainerError(f"--top must be >= 1, got {top}")
    level = getattr(args, "level", "char") or "char"
    plot = getattr(args, "plot", None)
    if plot is not None:
        plot_format(Path(plot))
    corpus = getattr(args, "corpus", None)
    text = read_corpus(corpus)
    config = TokenizerConfig(
        level=level,
        lowercase=not getattr(args, "keep_case", False),
        letters_only=getattr(args, "letters_only", False),
    )
    tokens = Tokenizer(config).tokenize(text)
    if not tokens:
        raise TrainerError(f"corpus {corpus or DEFAULT_CORPUS} has no tokens at {level} level")
    name = Path(corpus).name if corpus else DEFAULT_CORPUS.name
    print(f"corpus {name}: {len(tokens)} {level} tokens, {len(set(tokens))} distinct")
    all_counts = {n: ngram_counts(tokens, n) for n in ORDERS}
    for n, counts in all_counts.items():
        if not counts:
            print(f"\n{NAMES[n]}: none (corpus shorter than {n} tokens)")
            continue
        s = zipf_exponent(counts)
        print(f"\n{NAMES[n]}: {sum(counts.values())} total, {len(counts)} distinct, zipf s={s:.3f}")
        print(format_table(counts, n, level, top))
    if plot is not None:
        title = f"Zipf: {name} ({level} level)"
        plot_zipf({n: c for n, c in all_counts.items() if c}, Path(plot), title)
        print(f"\nwrote {plot}")
    return 0
