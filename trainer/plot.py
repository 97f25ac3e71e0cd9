"""Training-curve PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from rnnserve.trainer.plot_path import pyplot


def plot_history(history: list[dict], path: Path, title: str = "training") -> Path:
    """Train and validation perplexity per epoch, with the uniform baseline |V| for scale."""
    plt = pyplot()  # loaded here, at the first plot
    from matplotlib.ticker import LogFormatter, MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_ppl"] for r in history], marker="o", label="train")
    ax.plot(epochs, [r["val_ppl"] for r in history], marker="o", label="validation")
    if history:
        ax.axhline(history[-1]["uniform_ppl"], color="grey", linestyle="--", label="uniform |V|")
    ax.set_xlabel("epoch")
    # whole epochs only (one epoch was drawn at 0.96, 0.98, ...; a few at 1.25, 1.5, ...)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    # plain numbers: the log axis labelled a run between 25 and 31 "2.5×10¹ ... 3.1×10¹"
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
