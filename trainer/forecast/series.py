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
import re
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
_GROUPED = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?([eE][+-]?\d+)?$")  # 1,234.5
MAX_ABS = 1e150  # squares (std, least squares) of larger values overflow float64
SPIKE_STEPS = 100  # a jump and a return this many typical steps: a data error, most likely
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
        if _GROUPED.match(stripped):  # "100,691.17": a spreadsheet's display format
            plain = stripped.replace(",", "")
            raise ValueError(f"not a finite number: write it without thousands separators "
                             f"({plain})") from None  # fmt: skip
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


@dataclass(frozen=True)
class CsvColumn:
    """One CSV column as read: NaN where an inner cell is missing. Empty cells before its
    first number and after its last are not part of the series (a column that starts late
    or ends early in a file with other columns, or rows of dates still to come): they are
    dropped and counted, where filling them invented a flat run that the validation tail
    scored and the refit trained on."""

    values: np.ndarray  # float64, first and last values finite
    leading: int = 0  # empty cells dropped before the first value
    trailing: int = 0  # empty cells dropped after the last value
    spikes: tuple[str, ...] = ()  # a warning per isolated spike (find_spikes), by file line


def read_csv_column(path: Path | str, column: str, missing: str = "interpolate") -> CsvColumn:
    """The column's values from the first number to the last, NaN for missing cells among
    them (`missing` "error": the first such cell is refused with its line number)."""
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
    lines: list[int] = []  # the file line of each value
    pending: list[int] = []  # lines of blank rows not yet known to be inside the data
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            if blank_is_missing:
                pending.append(line)
            continue  # blank line
        values += [None] * len(pending)
        lines += pending
        pending = []
        cell = row[index] if index < len(row) else ""
        try:
            value = _parse_cell(cell)
        except ValueError as exc:
            raise SeriesError(
                f"{path}:{line}: column {column!r} holds {cell.strip()!r}, {exc}"
            ) from None
        values.append(value)
        lines.append(line)
    known = [i for i, v in enumerate(values) if v is not None]
    if not known:
        raise SeriesError(f"column {column!r} of {path} has no numeric values")
    first, last = known[0], known[-1]
    inside = values[first : last + 1]
    if missing == "error" and None in inside:
        raise SeriesError(
            f"{path}:{lines[first + inside.index(None)]}: column {column!r} has a missing value "
            "(use --missing interpolate to fill it)"
        )
    array = np.array([np.nan if v is None else v for v in inside], dtype=np.float64)
    spikes = tuple(
        f"warning: {path}:{lines[first + i]}: column {column!r} jumps to {array[i]:.6g} and "
        f"back ({array[i - 1]:.6g} before, {array[i + 1]:.6g} after: {ratio:.2g} times a "
        "typical step); a data error? Every model and AR(tau) fit it as a value (an empty "
        "cell there would be interpolated)"
        for i, ratio in find_spikes(array)
    )
    return CsvColumn(array, first, len(values) - 1 - last, spikes)


def find_spikes(values: np.ndarray, limit: int = 3) -> list[tuple[int, float]]:
    """(index, size) of the first `limit` values that jump at least SPIKE_STEPS typical
    steps away from both neighbours and back: a step is a first difference, typical its
    median absolute deviation (scaled to a standard deviation). Why: one such value (1e6 in a
    series of 10s) sets the normalisation's std, and the models and AR(tau) then forecast
    hundreds off the level, with nothing said; real series move at most ~16 typical steps
    (the benchmark's and statsmodels' macro series). NaN gaps are skipped."""
    x = np.asarray(values, dtype=np.float64)
    steps = np.diff(x)
    known = steps[np.isfinite(steps)]
    if len(known) < 3:
        return []
    centre = float(np.median(known))
    spread = np.abs(known - centre)
    typical = 1.4826 * float(np.median(spread)) or float(np.mean(spread))
    if not typical > 0:
        return []
    up, down = steps[:-1] - centre, steps[1:] - centre  # into x[i] and out of it, i = 1..
    size = np.minimum(np.abs(up), np.abs(down)) / typical
    spiked = (up * down < 0) & (size >= SPIKE_STEPS)  # NaN compares False: a gap is no spike
    return [(int(i) + 1, float(size[i])) for i in np.flatnonzero(spiked)[:limit]]


def load_csv(
    path: Path | str, column: str, missing: str = "interpolate", keep_gaps: bool = False
) -> np.ndarray:
    """Read one numeric column of a CSV file with a header row, as float64 [rows] (float32
    would merge nearby values of a large level: 1e9 + 20 sin(t) would read as constant).

    The series runs from the column's first number to its last (empty cells outside are
    dropped: read_csv_column). Missing cells (empty, NA, NaN, null, ?) among them are
    linearly interpolated between their neighbours when `missing` is "interpolate"; with
    "error" the first one is reported by its line number. With `keep_gaps` they stay NaN,
    for a caller that must fill them without looking ahead (`fill_without_look_ahead`).
    """
    values = read_csv_column(path, column, missing).values
    if keep_gaps:
        return values
    return _interpolate([None if math.isnan(v) else float(v) for v in values],
                        f"column {column!r} of {path}")  # fmt: skip


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
    """The missing cells of a CSV column a run filled, by how, and the empty cells it
    dropped at either end: said in one line and recorded in manifest.training
    (`missing_filled`), where they used to be filled silently."""

    file: str
    column: str
    interpolated: int = 0  # before the held-out values, linearly (at an end: the nearest value)
    repeated: int = 0  # among the held-out values: the last value before each (no look-ahead)
    leading: int = 0  # empty cells before the first value: not part of the series
    trailing: int = 0  # empty cells after the last value: not part of the series

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
        said = []
        if how:
            said.append(
                f"{self.file}: filled {plural(self.total, 'missing cell')} of column "
                f"{self.column!r}: "
                + ", ".join(how)
                + f" (--missing error refuses {'it' if self.total == 1 else 'them'})"
            )
        if self.leading or self.trailing:
            said.append(describe_dropped(self.file, self.column, self.leading, self.trailing))
        return "; ".join(said)

    def to_manifest(self) -> dict[str, object]:
        entry: dict[str, object] = {"column": self.column, "interpolated": self.interpolated,
                                    "repeated": self.repeated}  # fmt: skip
        if self.leading or self.trailing:  # absent when the column fills the file
            entry.update(leading=self.leading, trailing=self.trailing)
        return entry


def describe_dropped(file: str, column: str, leading: int, trailing: int) -> str:
    """`s.csv: ignored 5 empty cells of column 'v' after its last value ...`."""
    where = []
    if leading:
        where.append(f"{plural(leading, 'empty cell')} before its first value")
    if trailing:
        where.append(f"{plural(trailing, 'empty cell')} after its last value")
    return (
        f"{file}: ignored {' and '.join(where)} in column {column!r}: the series runs from "
        "its first value to its last"
    )


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
    warnings: tuple[str, ...] = ()  # what the CSV holds that looks wrong (find_spikes)

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
        needed = 2 * season + tau + MIN_TRAIN_AFTER_WINDOW
        raise SeriesError(
            f"--season {season} needs at least {needed} training values (two seasons, --tau "
            f"{tau} and {MIN_TRAIN_AFTER_WINDOW} more); series {source} has {num_train} before "
            f"its held-out {val} (--val-size)"
        )
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
    leading = trailing = 0  # empty cells dropped at the column's ends (read_csv_column)
    warnings: tuple[str, ...] = ()
    if path is None:
        values, source = textbook_series(), "textbook"
    elif not column:
        raise SeriesError("--series needs --column NAME (the CSV column to forecast)")
    else:
        read = read_csv_column(path, column, missing)
        values, source = read.values, f"{path}:{column}"
        leading, trailing, warnings = read.leading, read.trailing, read.spikes
    split = split or ("textbook" if path is None else "tail")
    if split not in SPLITS:
        raise SeriesError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    filled = None
    if leading or trailing:
        filled = Filled(str(path), str(column), leading=leading, trailing=trailing)
    gaps = np.isnan(values)
    if gaps.any():  # gaps filled without looking past the held-out boundary
        n = len(values)
        held = default_val_size(n) if val_size is None else val_size
        cut = min(max(n - held if split == "tail" else round(n * TRAIN_FRACTION), 1), n)
        values = fill_without_look_ahead(values, cut, source)
        filled = Filled(str(path), str(column), int(gaps[:cut].sum()), int(gaps[cut:].sum()),
                        leading, trailing)  # fmt: skip
    if split == "tail":
        found = tail_candidates(values, tau, source, val_size, transform or "auto", season)
    else:
        rep = None
        if transform not in (None, "level") or season:
            rep = choose_representation(
                values[: round(len(values) * TRAIN_FRACTION)], transform or "level", season
            )  # --season alone keeps the textbook's levels (no first differences)
        found = [split_series(values, tau, source, rep)]
    return [replace(series, filled=filled, warnings=warnings) for series in found]
