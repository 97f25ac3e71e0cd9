"""Reading forecast histories from CSV: headers, column choice, and clear refusals."""

from __future__ import annotations

import pytest

from rnnserve.client.series_csv import SeriesFileError, read_series


def write(tmp_path, text: str):
    path = tmp_path / "s.csv"
    path.write_text(text)
    return path


def test_header_and_default_last_column(tmp_path) -> None:
    s = read_series(write(tmp_path, "t,x\n1,0.5\n2,1.5\n"))
    assert (s.values, s.column) == ([0.5, 1.5], "x")


def test_column_by_name_and_by_index(tmp_path) -> None:
    path = write(tmp_path, "t,x\n1,0.5\n2,1.5\n")
    assert read_series(path, "t").values == [1.0, 2.0]
    assert read_series(path, "0").values == [1.0, 2.0]


def test_no_header_single_column_and_blank_lines(tmp_path) -> None:
    s = read_series(write(tmp_path, "1\n\n2.5\n-3e-1\n"))
    assert (s.values, s.column) == ([1.0, 2.5, -0.3], "column 0")


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("t,x\n1,4\n2,\n3,4\n", None, "line 3: missing value in x"),
        ("t,x\n1,abc\n", None, "line 2: 'abc' in x is not a number"),
        ("x\n1\nnan\n", None, "line 3: 'nan' in x is not finite"),
        ("t,x\n1,2\n", "y", "no column 'y' (columns: t, x)"),
        ("t,x\n", None, "has a header but no values"),
        ("", None, "has no rows"),
    ],
)
def test_bad_files_are_refused_with_the_place(tmp_path, text, column, message) -> None:
    with pytest.raises(SeriesFileError, match=r"s\.csv") as info:
        read_series(write(tmp_path, text), column)
    assert message in str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(SeriesFileError, match="cannot read"):
        read_series(tmp_path / "absent.csv")


def test_line_numbers_count_the_blank_lines_skipped(tmp_path) -> None:
    """The refusal names the line an editor shows, not the index among non-blank rows."""
    with pytest.raises(SeriesFileError, match=r"line 6: 'abc' in x is not a number"):
        read_series(write(tmp_path, "x\n0.1\n\n0.2\n\nabc\n"))
    with pytest.raises(SeriesFileError, match=r"line 5: missing value in x"):
        read_series(write(tmp_path, '\nt,x\n"1\n2",0.5\n3,\n4,1\n'))


def test_utf8_byte_order_mark_is_not_part_of_the_first_cell(tmp_path) -> None:
    """Spreadsheets save "CSV UTF-8" with a BOM: the header stays selectable by name and a
    headerless file keeps its first value."""
    path = tmp_path / "bom.csv"
    path.write_text("x\n1.5\n2.5\n", encoding="utf-8-sig")
    assert read_series(path, "x") == read_series(path) and read_series(path).column == "x"
    path.write_text("1.5\n2.5\n", encoding="utf-8-sig")
    assert read_series(path).values == [1.5, 2.5]


@pytest.mark.parametrize(
    "text",
    ["2020-01-01,5\n2020-01-02,6\n2020-01-03,7\n", "a,5\nb,6\nc,7\n", 'x,5\n"y",6\nz,7\n'],
)
def test_a_headerless_file_with_a_text_column_keeps_its_first_row(tmp_path, text) -> None:
    """Dates or labels beside the values are not column names: the first row was read as a
    header, its value lost without a word and the column named "5"."""
    s = read_series(write(tmp_path, text))
    assert (s.values, s.column) == ([5.0, 6.0, 7.0], "column 1")


def test_a_header_above_a_text_column_is_still_a_header(tmp_path) -> None:
    s = read_series(write(tmp_path, "date,value\n2020-01-01,5\n2020-01-02,6\n"))
    assert (s.values, s.column) == ([5.0, 6.0], "value")
    with pytest.raises(SeriesFileError, match="has a header but no values"):
        read_series(write(tmp_path, "date,value\n"))


def test_trailing_empty_column_is_not_the_default(tmp_path) -> None:
    """A spreadsheet's trailing comma made the default column an empty one: every row was
    refused as "missing value in " (no name)."""
    assert read_series(write(tmp_path, "t,x,\n1,2,\n2,3,\n")) == read_series(
        write(tmp_path, "t,x\n1,2\n2,3\n")
    )
    assert read_series(write(tmp_path, "1,2,\n2,3,\n")).values == [2.0, 3.0]
    with pytest.raises(SeriesFileError, match=r"no column '2' \(columns: t, x\)"):
        read_series(write(tmp_path, "t,x,\n1,2,\n"), "2")


def test_the_columns_listed_for_an_unknown_one_are_told_apart(tmp_path) -> None:
    """Names were joined with ", ": a file with the columns `date` and `load, kW` listed
    "date, load, kW", so `--column load` was refused with a list that seemed to hold it."""
    path = write(tmp_path, 'date,"load, kW",\n1,2,\n')
    with pytest.raises(SeriesFileError, match=r"\(columns: date, 'load, kW'\)$"):
        read_series(path, "load")
    with pytest.raises(SeriesFileError, match=r"\(columns: t, '', x\)$"):
        read_series(write(tmp_path, "t,,x\n1,2,3\n"), "y")


@pytest.mark.parametrize("column", ["²", "-¹"])
def test_a_column_of_digit_like_characters_is_an_unknown_name(tmp_path, column) -> None:
    """str.isdigit takes "²" for a digit but int() does not: the refusal was int()'s own
    "invalid literal for int() with base 10", naming neither the file nor the columns."""
    with pytest.raises(SeriesFileError, match=r"no column .* \(columns: t, x\)$"):
        read_series(write(tmp_path, "t,x\n1,2\n"), column)


def test_empty_cells_around_the_columns_values_are_no_data(tmp_path) -> None:
    """Other columns run longer (dates with no value yet): rnn-trainer reads such a file, so
    `rnn-client forecast --history-file` must too; an empty cell between values is refused."""
    path = write(tmp_path, "t,x\n1,\n2,0.5\n3,1.5\n4,\n5,\n")
    assert read_series(path, "x").values == [0.5, 1.5]
    with pytest.raises(SeriesFileError, match="line 3: missing value in x"):
        read_series(write(tmp_path, "t,x\n1,0.5\n2,\n3,1.5\n"), "x")


def test_a_number_with_thousands_separators_is_said_so(tmp_path) -> None:
    path = write(tmp_path, 't,x\n1,"100,691.17"\n')
    with pytest.raises(SeriesFileError, match=r"not a number \(write it without thousands"):
        read_series(path, "x")
