"""Time series for forecasting: the textbook sine, CSV columns, splits and normalisation.

The built-in series is the one of Dive into Deep Learning (section "Working with Sequences"):
x_t = sin(0.01 t) + eps_t for t = 1..1000, with eps_t drawn i.i.d. from a normal
distribution with mean 0 and *standard deviation* 0.2 (the book's `torch.normal(0, 0.2, ...)`;
variance 0.04), seeded so every run sees the same series; its textbook split trains on the
first 600 steps and tests on the rest. A CSV series trains on everything but a small
validation tail (early stopping). The model sees a representation of the levels
(representation.py), normalised with statistics of the training range only, so nothing
held out leaks into the model; both travel in manifest.series and the server undoes them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.detect import candidate_representations, choose_representation
from rnnserve.trainer.forecast.representation import TRANSFORMS, Representation
from rnnserve.trainer.wording import plural

TEXTBOOK_LENGTH = 1000
TEXTBOOK_NOISE_STD = 0.2
TEXTBOOK_TRAIN = 600
TRAIN_FRACTION = TEXTBOOK_TRAIN / TEXTBOOK_LENGTH
MISSING_POLICIES = ("interpolate", "error")
SPLITS = ("tail", "textbook")  # a small validation tail, or the textbook's 60 % / 40 %
MIN_DEFAULT_VAL, MAX_DEFAULT_VAL = 16, 64
MIN_TRAIN_AFTER_WINDOW = 8  # training examples a series must offer beyond the window tau
_MISSING_TEXT = {"", "na", "nan", "null", "none", "n/a", "?", "-"}
MAX_ABS = 1e150  # squares (std, least squares) of larger values overflow float64
RELATIVE_FLAT = 1e-9  # std at most this fraction of the largest |value|: a constant series


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
    """A float, or None for a missing cell; raises ValueError (the reason) for anything else."""
    stripped = text.strip()
    if stripped.lower() in _MISSING_TEXT:
        return None
    try:
        value = float(stripped)
    except ValueError:
        raise ValueError("not a finite number") from None
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise ValueError("not a finite number")
    if abs(value) > MAX_ABS:
        raise ValueError(f"beyond ±{MAX_ABS:g}: the series' statistics would overflow")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv(
    path: Path | str, column: str, missing: str = "interpolate", keep_gaps: bool = False
) -> np.ndarray:
    """Read one numeric column of a CSV file with a header row, as float64 [rows] (float32
    would merge nearby values of a large level: 1e9 + 20 sin(t) would read as constant).

    Missing cells (empty, NA, NaN, null, ?) are linearly interpolated between their
    neighbours (held constant before the first / after the last known value) when `missing`
    is "interpolate"; with "error" the first one is reported by its line number. With
    `keep_gaps` they stay NaN, for a caller that must fill them without looking ahead
    (`fill_without_look_ahead`).
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
        hint = ""
        if header and all(_is_number(h) for h in header):  # the first row was data
            hint = "; its first row holds numbers, not column names: add a header row"
        separators = [sep for sep in ";\t|" if len(header) == 1 and sep in header[0]]
        if separators:  # `t;load` read as one column named "t;load"
            hint = f"; the file is read as comma-separated, and its header holds {separators[0]!r}"
        raise SeriesError(
            f"column {column!r} is not in {path} (columns: {', '.join(header) or 'none'}){hint}"
        )
    if header.count(column) > 1:  # the first one was read, silently
        raise SeriesError(
            f"column {column!r} appears {header.count(column)} times in the header of {path}; "
            "rename all but the one to forecast"
        )
    index = header.index(column)
    # In a one-column file an empty line is an empty cell (pandas writes NaN that way): a
    # time step to fill, unless only blank lines follow. With more columns it has no date.
    blank_is_missing = len(header) == 1
    values: list[float | None] = []
    pending: list[int] = []  # lines of blank rows not yet known to be inside the data
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            if blank_is_missing:
                pending.append(line)
            continue  # blank line
        if pending and missing == "error":
            raise SeriesError(
                f"{path}:{pending[0]}: column {column!r} has a missing value "
                "(use --missing interpolate to fill it)"
            )
        values += [None] * len(pending)
        pending = []
        cell = row[index] if index < len(row) else ""
        try:
            value = _parse_cell(cell)
        except ValueError as exc:
            raise SeriesError(
                f"{path}:{line}: column {column!r} holds {cell.strip()!r}, {exc}"
            ) from None
        if value is None and missing == "error":
            raise SeriesError(
                f"{path}:{line}: column {column!r} has a missing value "
                "(use --missing interpolate to fill it)"
            )
        values.append(value)
    what = f"column {column!r} of {path}"
    if keep_gaps:
        if all(v is None for v in values):
            raise SeriesError(f"{what} has no numeric values")
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return _interpolate(values, what)


def fill_without_look_ahead(values: np.ndarray, cut: int, what: str) -> np.ndarray:
    """Fills the NaN gaps of a series evaluated after `cut` with nothing from later on.

    Before `cut` (what models and baselines train on) gaps are interpolated from the values
    before `cut` alone; from `cut` on each gap repeats the last value before it, so the
    history of a forecast origin never holds a hint of what follows it. Interpolating the
    whole file first would fill the training part's last gaps from the test window."""
    head = [None if math.isnan(v) else float(v) for v in values[:cut]]
    filled = np.concatenate([_interpolate(head, f"{what} (before the held-out values)"),
                             values[cut:].astype(np.float64)])  # fmt: skip
    for i in range(cut, len(filled)):
        if math.isnan(filled[i]):
            filled[i] = filled[i - 1]
    return filled


def _interpolate(values: list[float | None], what: str) -> np.ndarray:
    known = np.array([v is not None for v in values], dtype=bool)
    if not known.any():
        raise SeriesError(f"{what} has no numeric values")
    x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    positions = np.arange(len(x))
    x[~known] = np.interp(positions[~known], positions[known], x[known])
    return x


@dataclass(frozen=True)
class Normaliser:
    """(x - mean) / std with statistics of the training range; manifest.series holds both."""

    mean: float
    std: float

    @classmethod
    def fit(cls, train: np.ndarray) -> Normaliser:
        with np.errstate(over="ignore", invalid="ignore"):
            std = float(np.std(train))
        if not math.isfinite(std):
            raise SeriesError("the training range's values are too large to normalise")
        if _is_flat(train):
            raise SeriesError("the training range is constant: cannot normalise a flat series")
        return cls(mean=float(np.mean(train)), std=std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def undo(self, z: np.ndarray) -> np.ndarray:
        """float64: in float32 a large mean would round the levels (to 64 at 1e9)."""
        return np.asarray(z, dtype=np.float64) * self.std + self.mean

    def manifest_series(self, tau: int) -> dict:
        """The manifest.series dict of docs/contracts.md."""
        return {"mean": self.mean, "std": self.std, "tau": int(tau), "features": 1}


@dataclass(frozen=True)
class Filled:
    """The missing cells of a CSV column a run filled, by how: said in one line and recorded
    in manifest.training (`missing_filled`), where they used to be filled silently."""

    file: str
    column: str
    interpolated: int = 0  # before the held-out values, linearly (at an end: the nearest value)
    repeated: int = 0  # among the held-out values: the last value before each (no look-ahead)

    @property
    def total(self) -> int:
        return self.interpolated + self.repeated

    def describe(self, held_out: str) -> str:
        """`s.csv: filled 3 missing cells of column 'level': ...` (`held_out`: "test" or
        "validation", as Series.held_out)."""
        part = "validation tail" if held_out == "validation" else "test part"
        how = []
        if self.interpolated:  # at either end of the part, the nearest value (np.interp)
            how.append(f"{self.interpolated} before the {part} by linear interpolation")
        if self.repeated:
            how.append(f"{self.repeated} in the {part} by repeating the last value before it")
        return (
            f"{self.file}: filled {plural(self.total, 'missing cell')} of column "
            f"{self.column!r}: "
            + ", ".join(how)
            + f" (--missing error refuses {'it' if self.total == 1 else 'them'})"
        )

    def to_manifest(self) -> dict[str, object]:
        return {"column": self.column, "interpolated": self.interpolated,
                "repeated": self.repeated}  # fmt: skip


@dataclass(frozen=True)
class Series:
    """A raw series, where its held-out part starts, its representation and normalisation.

    The model reads `normalised`: the representation (representation.py) of the levels,
    standardised with statistics of the training range, 0 where it is undefined."""

    values: np.ndarray  # [T], raw units (float64 from a CSV)
    num_train: int  # values[:num_train] fit the model, values[num_train:] are held out
    normaliser: Normaliser  # of the representation over the training range
    source: str  # "textbook" or "<file>:<column>", recorded in manifest.training
    representation: Representation = field(default_factory=Representation)
    held_out: str = "test"  # "test" (the textbook split) or "validation" (a tail split)
    filled: Filled | None = None  # missing CSV cells filled before the split (None: none)

    @property
    def normalised(self) -> np.ndarray:  # float32 [T]
        z = self.normaliser.apply(self.representation.apply(self.values))
        z[: self.representation.lost] = 0.0
        return z

    @property
    def season(self) -> int:
        return self.representation.season

    def manifest_series(self, window: int) -> dict:
        """manifest.series: normalisation, the representation, and `tau`, the shortest
        history a forecast needs (the model's window plus the values differencing uses)."""
        entry = self.normaliser.manifest_series(window + self.representation.lost)
        entry["representation"] = self.representation.to_manifest()
        return entry


def make_series(
    values: np.ndarray,
    num_train: int,
    source: str,
    representation: Representation | None = None,
    held_out: str = "test",
) -> Series:
    """Fits the normaliser on the representation of values[:num_train]."""
    rep = representation or Representation()
    train_rep = rep.apply(values[:num_train])[rep.lost :]
    if len(train_rep) < 2:
        raise SeriesError(f"series {source}: too few training values for {rep.name}")
    if rep.lost and _is_flat(train_rep) and not _is_flat(values[:num_train]):
        # the levels vary, but not their differences: "constant series" would mislead
        raise SeriesError(
            f"series {source}: its {rep.name} is constant over the training range (the series "
            "repeats a season or a straight line exactly); set --season 0 and --transform level"
        )
    return Series(values, num_train, Normaliser.fit(train_rep), source, rep, held_out)


def _is_flat(values: np.ndarray) -> bool:
    """std at most RELATIVE_FLAT of the largest |value| (relative: units of 1e-9 still vary)."""
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.std(x) <= RELATIVE_FLAT * np.max(np.abs(x)))


def split_series(
    values: np.ndarray, tau: int, source: str, representation: Representation | None = None
) -> Series:
    """Split 60 % / 40 % (the textbook's 600 / 400) and fit the normaliser on the train part."""
    n = len(values)
    num_train = round(n * TRAIN_FRACTION)
    lost = representation.lost if representation else 0
    needed_train = tau + lost + MIN_TRAIN_AFTER_WINDOW
    if num_train < needed_train or n - num_train < 1:
        minimum = math.ceil(needed_train / TRAIN_FRACTION) + 1
        raise SeriesError(
            f"series {source} has {n} values; with --tau {tau} it needs at least {minimum} "
            f"(the first {TRAIN_FRACTION:.0%} train, the rest test)"
        )
    return make_series(values, num_train, source, representation, "test")


def default_val_size(length: int) -> int:
    """10 % of the series, at least 16 and at most 64 values, and never over a quarter."""
    wanted = min(MAX_DEFAULT_VAL, max(MIN_DEFAULT_VAL, round(length * 0.1)))
    return int(max(1, min(wanted, length // 4)))


def tail_split(*args, **kwargs) -> Series:
    """All but the last `val_size` values train; the tail validates (early stopping). The
    representation is chosen on the training part (detect.py) unless given by flags.
    Same arguments as tail_candidates; its first series."""
    return tail_candidates(*args, **kwargs)[0]


def tail_candidates(
    values: np.ndarray,
    tau: int,
    source: str,
    val_size: int | None = None,
    transform: str = "auto",
    season: int | None = None,
) -> list[Series]:
    """tail_split's series under every candidate representation (detect.py), the automatic
    choice first; select.py trains each and keeps the one that validates best."""
    n = len(values)
    val = default_val_size(n) if val_size is None else val_size
    if val < 1:
        raise SeriesError(f"--val-size must be at least 1, got {val}")
    num_train = n - val
    if transform not in TRANSFORMS:
        raise SeriesError(f"--transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    if season is not None and (season < 0 or season == 1):
        raise SeriesError(f"--season must be auto, 0 (none) or a period >= 2, got {season}")
    if season and 2 * season + tau + MIN_TRAIN_AFTER_WINDOW > num_train:
        raise SeriesError(f"--season {season} needs at least two seasons of training values")
    if num_train < tau + MIN_TRAIN_AFTER_WINDOW + 1:
        raise SeriesError(
            f"series {source} has {n} values; with --tau {tau} and --val-size {val} it needs "
            f"at least {tau + MIN_TRAIN_AFTER_WINDOW + 1 + val}"
        )
    reps = candidate_representations(values[:num_train], transform, season)
    if num_train < tau + reps[0].lost + MIN_TRAIN_AFTER_WINDOW:
        raise SeriesError(f"series {source}: too few training values for {reps[0].name}")
    return [make_series(values, num_train, source, rep, "validation") for rep in reps]


def load_series(*args, **kwargs) -> Series:
    """load_candidates' first series (same arguments): the automatic choice of
    representation."""
    return load_candidates(*args, **kwargs)[0]


def load_candidates(
    path: str | Path | None,
    column: str | None,
    tau: int,
    missing: str = "interpolate",
    split: str | None = None,
    val_size: int | None = None,
    transform: str | None = None,
    season: int | None = None,
) -> list[Series]:
    """The textbook series (path None; always seed 0) or a CSV column, split and represented
    (one series per candidate representation, the automatic choice first).

    `split` None picks the textbook's 600/400 for the built-in series and a validation tail
    for a CSV; `transform` None is "level" for the textbook split (the textbook experiment
    learns levels) and "auto" otherwise."""
    if tau < 1:
        raise SeriesError(f"--tau must be at least 1, got {tau}")
    if path is None and column:  # a forgotten --series would train on the sine instead
        raise SeriesError(f"--column {column} needs --series FILE.csv (the file to read it from)")
    if path is None:
        values, source = textbook_series(), "textbook"
    elif not column:
        raise SeriesError("--series needs --column NAME (the CSV column to forecast)")
    else:
        values, source = load_csv(path, column, missing, keep_gaps=True), f"{path}:{column}"
    split = split or ("textbook" if path is None else "tail")
    if split not in SPLITS:
        raise SeriesError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    filled = None
    gaps = np.isnan(values)
    if gaps.any():  # gaps filled without looking past the held-out boundary
        n = len(values)
        held = default_val_size(n) if val_size is None else val_size
        cut = min(max(n - held if split == "tail" else round(n * TRAIN_FRACTION), 1), n)
        values = fill_without_look_ahead(values, cut, source)
        filled = Filled(str(path), str(column), int(gaps[:cut].sum()), int(gaps[cut:].sum()))
    if split == "tail":
        found = tail_candidates(values, tau, source, val_size, transform or "auto", season)
    else:
        rep = None
        if transform not in (None, "level") or season:
            rep = choose_representation(
                values[: round(len(values) * TRAIN_FRACTION)], transform or "level", season
            )  # --season alone keeps the textbook's levels (no first differences)
        found = [split_series(values, tau, source, rep)]
    return [replace(series, filled=filled) for series in found]
