"""Where a plot goes: its format, by the file's suffix, checked before the work that draws it;
and matplotlib itself, loaded at the first plot (`pyplot`).

Shared by `stats --plot` and the forecasting plots: a directory, a file in the way of the
folder, or an unknown suffix failed only after the counting or the training was done, `.svg`
got PNG bytes, and a name with no suffix was written with matplotlib's `.png` added.
"""

from __future__ import annotations

from pathlib import Path

from rnnserve.trainer.errors import TrainerError

PLOT_FORMATS = ("png", "svg", "pdf")  # by the file's suffix; none: png


def plot_format(path: Path, flag: str = "--plot", example: str = "plot.png") -> str:
    """The format `path` is written in; TrainerError (naming `flag`) when it cannot be."""
    path = Path(path)
    if path.is_dir():
        raise TrainerError(f"{flag} {path} is a directory; give a file name such as {example}")
    for parent in path.parents:  # the nearest existing folder above it must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise TrainerError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in PLOT_FORMATS:
        raise TrainerError(f"{flag} {path}: unknown image suffix .{fmt}; use .png, .svg or .pdf")
    return fmt


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), loaded at the first plot: every
    `rnn-trainer` process would otherwise pay its 0.3-0.4 s import before checking its flags.
    A missing matplotlib is a TrainerError saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise TrainerError("plotting needs matplotlib: pip install 'rnnserve[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
