"""Time series for forecasting: the textbook sine, CSV columns, splits and normalisation.

The built-in series is the one of Dive into Deep Learning (section "Working with Sequences"):
x_t = sin(0.01 t) + eps_t for t = 1..1000, with eps_t drawn i.i.d. from a normal
distribution with mean 0 and *standard deviation* 0.2 (the book's `torch.normal(0, 0.2, ...)`;
variance 0.04), seeded so every run sees the same series. The first 600 steps train, the
rest test. Normalisation statistics come from the training range only, so nothing about the
test range leaks into the model; they travel in manifest.series and the server undoes them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.trainer.errors import TrainerError

TEXTBOOK_LENGTH = 1000
TEXTBOOK_NOISE_STD = 0.2
TEXTBOOK_TRAIN = 600
TRAIN_FRACTION = TEXTBOOK_TRAIN / TEXTBOOK_LENGTH
MISSING_POLICIES = ("interpolate", "error")
MIN_TRAIN_AFTER_WINDOW = 8  # training examples a series must offer beyond the window tau
_MISSING_TEXT = {"", "na", "nan", "null", "none", "n/a", "?", "-"}


class SeriesError(TrainerError):
    """A series that cannot be used; the message names the file, column or value."""


def textbook_series(
    length: int = TEXTBOOK_LENGTH, noise_std: float = TEXTBOOK_NOISE_STD, seed: int = 0
) -> np.ndarray:
    """x_t = sin(0.01 t) + N(0, noise_std^2) for t = 1..length, as float32 [length]."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, length + 1, dtype=np.float64)
    return (np.sin(0.01 * t) + rng.normal(0.0, noise_std, size=length)).astype(np.float32)


def _parse_cell(text: str) -> float | None:
    """A float, or None for a missing cell; raises ValueError for anything else."""
    stripped = text.strip()
    if stripped.lower() in _MISSING_TEXT:
        return None
    value = float(stripped)
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise ValueError("infinite")
    return value


def load_csv(path: Path | str, column: str, missing: str = "interpolate") -> np.ndarray:
    """Read one numeric column of a CSV file with a header row, as float32 [rows].

    Missing cells (empty, NA, NaN, null, ?) are linearly interpolated between their
    neighbours (held constant before the first / after the last known value) when `missing`
    is "interpolate"; with "error" the first one is reported by its line number.
    """
    if missing not in MISSING_POLICIES:
        choices = ", ".join(MISSING_POLICIES)
        raise SeriesError(f"--missing must be one of {choices}, got {missing!r}")
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise SeriesError(f"series file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SeriesError(f"cannot read series file {path}: {exc}") from None
    if not rows:
        raise SeriesError(f"series file {path} is empty")
    header = [h.strip() for h in rows[0]]
    if column not in header:
        raise SeriesError(
            f"column {column!r} is not in {path} (columns: {', '.join(header) or 'none'})"
        )
    index = header.index(column)
    values: list[float | None] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        cell = row[index] if index < len(row) else ""
        try:
            value = _parse_cell(cell)
        except ValueError:
            raise SeriesError(
                f"{path}:{line}: column {column!r} holds {cell.strip()!r}, not a finite number"
            ) from None
        if value is None and missing == "error":
            raise SeriesError(
                f"{path}:{line}: column {column!r} has a missing value "
                "(use --missing interpolate to fill it)"
            )
        values.append(value)
    return _interpolate(values, f"column {column!r} of {path}")


def _interpolate(values: list[float | None], what: str) -> np.ndarray:
    known = np.array([v is not None for v in values], dtype=bool)
    if not known.any():
        raise SeriesError(f"{what} has no numeric values")
    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    positions = np.arange(len(x))
    x[~known] = np.interp(positions[~known], positions[known], x[known])
    return x.astype(np.float32)


@dataclass(frozen=True)
class Normaliser:
    """(x - mean) / std with statistics of the training range; manifest.series holds both."""

    mean: float
    std: float

    @classmethod
    def fit(cls, train: np.ndarray) -> Normaliser:
        std = float(np.std(train))
        if not math.isfinite(std) or std < 1e-8:
            raise SeriesError("the training range is constant: cannot normalise a flat series")
        return cls(mean=float(np.mean(train)), std=std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def undo(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, dtype=np.float64) * self.std + self.mean).astype(np.float32)

    def manifest_series(self, tau: int) -> dict:
        """The manifest.series dict of docs/contracts.md."""
        return {"mean": self.mean, "std": self.std, "tau": int(tau), "features": 1}


@dataclass(frozen=True)
class Series:
    """A raw series with its train/test split point and its normalisation."""

    values: np.ndarray  # float32 [T], raw units
    num_train: int  # values[:num_train] train, values[num_train:] test
    normaliser: Normaliser
    source: str  # "textbook" or "<file>:<column>", recorded in manifest.training

    @property
    def normalised(self) -> np.ndarray:  # float32 [T]
        return self.normaliser.apply(self.values)


def split_series(values: np.ndarray, tau: int, source: str) -> Series:
    """Split 60 % / 40 % (the textbook's 600 / 400) and fit the normaliser on the train part."""
    n = len(values)
    num_train = round(n * TRAIN_FRACTION)
    needed_train = tau + MIN_TRAIN_AFTER_WINDOW
    if num_train < needed_train or n - num_train < 1:
        minimum = math.ceil(needed_train / TRAIN_FRACTION) + 1
        raise SeriesError(
            f"series {source} has {n} values; with --tau {tau} it needs at least {minimum} "
            f"(the first {TRAIN_FRACTION:.0%} train, the rest test)"
        )
    return Series(values, num_train, Normaliser.fit(values[:num_train]), source)


def load_series(
    path: str | Path | None, column: str | None, tau: int, missing: str = "interpolate"
) -> Series:
    """The textbook series (path None; always seed 0) or a CSV column, split and normalised."""
    if tau < 1:
        raise SeriesError(f"--tau must be at least 1, got {tau}")
    if path is None:
        return split_series(textbook_series(), tau, "textbook")
    if not column:
        raise SeriesError("--series needs --column NAME (the CSV column to forecast)")
    return split_series(load_csv(path, column, missing), tau, f"{path}:{column}")
