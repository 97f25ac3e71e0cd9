"""Draw a history, its forecast with its prediction interval (when the model has one) and
(optionally) the one-step fitted values to a PNG.

Why: a forecast is judged by eye first. matplotlib is imported lazily with the Agg backend so
the rest of the client works, headless, without it.
"""

from __future__ import annotations

from pathlib import Path

from rnnserve.client.results import ForecastResult


class PlotError(RuntimeError):
    """Plotting is unavailable or the file cannot be written."""


def has_interval(result: ForecastResult) -> bool:
    """Whether the server sent an interval for every step (models without one send none)."""
    n = len(result.forecast)
    return n > 0 and len(result.lower) == n and len(result.upper) == n


def plot_forecast(
    path: str | Path, history: list[float], result: ForecastResult, title: str = ""
) -> Path:
    """Writes the PNG (or the format `path`'s extension names) and returns the file written:
    `path`, with ".png" added when it has no extension. `title` is drawn as written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'rnnserve[client]'") from None
    n = len(history)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(n), history, label="history", color="tab:blue", linewidth=1)
    if result.fitted:
        start = result.fitted_offset
        xs = range(start, start + len(result.fitted))
        ax.plot(xs, result.fitted, label="one-step fitted", color="tab:green", linewidth=1)
    # Join the forecast to the last observed value so the two lines meet.
    xs = range(n - 1, n + len(result.forecast))
    ax.plot(xs, [history[-1], *result.forecast], label="forecast", color="tab:red")
    if has_interval(result):
        # the server's 90% interval per step (ForecastResult.lower/upper), around the forecast
        steps = range(n, n + len(result.forecast))
        ax.fill_between(
            steps, result.lower, result.upper, color="tab:red", alpha=0.2, label="90% interval"
        )
    ax.axvline(n - 1, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    # the title holds the user's model and column names: "$" there is a dollar, not the
    # start of mathtext (which garbled "cost ($M)" and raised on "cost_$^$" after the call)
    ax.set_title(title or f"forecast of {len(result.forecast)} steps", parse_math=False)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib would add one itself: name the file that is written
        path = path.with_name(path.name + ".png")
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path
