"""Read one numeric column of a CSV file as a forecast history.

Why: `rnn-client forecast --history-file` must accept the files people have (with or without
a header, one or many columns) and say exactly which cell is wrong, instead of a traceback.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


class SeriesFileError(ValueError):
    """A CSV history that cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class Series:
    values: list[float]
    column: str  # header name, or "column <index>" when the file has no header


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_series(path: str | Path, column: str | None = None) -> Series:
    """Values of `column` (header name or 0-based index; default: the last column).

    The first row is a header when it has text above numbers (a column of text all the way,
    such as dates, does not count). Empty, NaN or infinite cells are refused: fill them in
    first (the server would refuse them anyway).
    """
    path = Path(path)
    try:
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark, which would
        # otherwise stick to the first cell (a header name nobody can type, or a lost value)
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = _rows_with_lines(f)
    except OSError as exc:
        raise SeriesFileError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SeriesFileError(f"{path} is not a readable CSV file: {exc}") from None
    if not rows:
        raise SeriesFileError(f"{path} has no rows")
    header = None
    if _is_header(rows):
        header = [cell.strip() for cell in rows[0][1]]
        rows = rows[1:]
    width = _width(header if header else [cell.strip() for cell in rows[0][1]])
    index, name = _pick_column(path, header, width, column)
    cells = [(line, row[index].strip() if index < len(row) else "") for line, row in rows]
    # empty cells before the column's first value and after its last are no data (other
    # columns run longer: future dates with no value yet), as `rnn-trainer` reads them
    filled = [i for i, (_, cell) in enumerate(cells) if cell]
    cells = cells[filled[0] : filled[-1] + 1] if filled else []
    values = []
    for line, cell in cells:
        if not cell:
            raise SeriesFileError(f"{path} line {line}: missing value in {name}")
        try:
            value = float(cell)
        except ValueError:
            hint = " (write it without thousands separators)" if _GROUPED.match(cell) else ""
            raise SeriesFileError(
                f"{path} line {line}: {cell!r} in {name} is not a number{hint}"
            ) from None
        if not math.isfinite(value):
            raise SeriesFileError(f"{path} line {line}: {cell!r} in {name} is not finite")
        values.append(value)
    if not values:
        raise SeriesFileError(f"{path} has a header but no values")
    return Series(values, name)


# a spreadsheet's display format, as rnn-trainer's CSV reader words it
_GROUPED = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?([eE][+-]?\d+)?$")  # 1,234.5


def _is_header(rows: list[tuple[int, list[str]]]) -> bool:
    """The first row is a header when one of its cells is text above a column that holds
    numbers further down. A column of text all the way (dates, labels) says nothing, so a
    headerless "2020-01-01,5" keeps its first value instead of naming a column "5"."""
    first = [cell.strip() for cell in rows[0][1]]
    if all(_is_number(cell) for cell in first):
        return False
    if len(rows) == 1:
        return True  # nothing to compare with: text can only be column names
    return any(
        cell
        and not _is_number(cell)
        and any(i < len(row) and _is_number(row[i].strip()) for _, row in rows[1:])
        for i, cell in enumerate(first)
    )


def _width(first: list[str]) -> int:
    """Columns of the first row, less trailing empty ones: a spreadsheet's trailing comma
    ("t,x,") must not make an empty column the default."""
    width = len(first)
    while width > 1 and not first[width - 1]:
        width -= 1
    return width


def _rows_with_lines(f: TextIO) -> list[tuple[int, list[str]]]:
    """Non-blank rows with the file line each ends on, so errors name the line an editor
    shows even after skipped blank lines."""
    reader = csv.reader(f)
    return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]


def _pick_column(
    path: Path, header: list[str] | None, width: int, column: str | None
) -> tuple[int, str]:
    if column is None:
        index = width - 1
    elif header and column in header:
        index = header.index(column)
    elif column.lstrip("-").isdecimal() and -width <= int(column) < width:
        index = int(column) % width
    else:
        known = ", ".join(map(_listed, header[:width])) if header else f"indexes 0..{width - 1}"
        raise SeriesFileError(f"{path}: no column {column!r} (columns: {known})")
    return index, (header[index] if header else f"column {index}")


def _listed(name: str) -> str:
    """A header name as the list of columns shows it: quoted when it holds the list's own
    separator or is empty, so "date, load, kW" cannot hide that `load, kW` is one column."""
    return repr(name) if "," in name or not name else name
