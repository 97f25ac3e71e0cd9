"""Series: the textbook sine, CSV columns with missing values, split and normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnserve.trainer.forecast.series import (
    TEXTBOOK_NOISE_STD,
    Filled,
    Normaliser,
    SeriesError,
    find_spikes,
    load_candidates,
    load_csv,
    load_series,
    split_series,
    tail_split,
    textbook_series,
)

DATA = Path(__file__).resolve().parents[3] / "bench" / "data"


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_textbook_series_is_seeded_sine_plus_normal_noise() -> None:
    x = textbook_series()
    assert x.shape == (1000,) and x.dtype == np.float32
    assert np.array_equal(x, textbook_series())
    assert not np.array_equal(x, textbook_series(seed=1))
    noise = x - np.sin(0.01 * np.arange(1, 1001))
    # the noise's standard deviation is 0.2 (variance 0.04), within sampling error
    assert abs(noise.std() - TEXTBOOK_NOISE_STD) < 0.02
    assert abs(noise.mean()) < 0.03


def test_textbook_split_is_600_400_with_train_only_statistics() -> None:
    s = load_series(None, None, tau=4)
    assert s.num_train == 600 and s.source == "textbook"
    assert s.normaliser.mean == pytest.approx(float(np.mean(s.values[:600])), abs=1e-6)
    assert s.normaliser.std == pytest.approx(float(np.std(s.values[:600])), rel=1e-6)
    z = s.normalised[:600]
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5


def test_test_range_does_not_leak_into_normalisation() -> None:
    x = textbook_series()
    y = x.copy()
    y[600:] += 100.0
    assert split_series(x, 4, "a").normaliser == split_series(y, 4, "b").normaliser


def test_normaliser_round_trip_and_manifest_dict() -> None:
    norm = Normaliser(mean=3.0, std=2.0)
    x = np.array([1.0, 3.0, 7.5], dtype=np.float32)
    assert np.allclose(norm.apply(x), [-1.0, 0.0, 2.25])
    assert np.allclose(norm.undo(norm.apply(x)), x)
    assert norm.manifest_series(4) == {"mean": 3.0, "std": 2.0, "tau": 4, "features": 1}


def test_csv_column_is_read(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "date,temp\n1,2.5\n2,-1\n\n3,4e1\n")
    assert load_csv(path, "temp").tolist() == [2.5, -1.0, 40.0]


def test_missing_values_are_interpolated(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "t,v\n0,NA\n1,1\n2,\n3,?\n4,4\n5,nan\n\n")
    # inner gaps are linear; the empty cells before the first and after the last value are
    # not part of the series
    assert load_csv(path, "v", "interpolate").tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("split", ["tail", "textbook"])
def test_empty_cells_at_either_end_are_not_part_of_the_series(tmp_path: Path, split) -> None:
    """A column that ends before its file does (dates of months still to come, a column
    shorter than another) had its last value repeated into every empty row: `train` scored
    the model on those invented values in its validation tail and refit on them. The series
    now runs from the column's first value to its last, and says what it dropped."""
    rows = [f"2000-{i:03d}," + ("" if i < 3 or i >= 197 else f"{10 + np.sin(0.3 * i):.4f}")
            for i in range(200)]  # fmt: skip
    path = write_csv(tmp_path / "s.csv", "date,sales\n" + "\n".join(rows) + "\n")
    expected = [float(f"{10 + np.sin(0.3 * i):.4f}") for i in range(3, 197)]
    for missing in ("interpolate", "error"):  # outside the series: no gap to refuse
        assert load_csv(path, "sales", missing).tolist() == expected
    series = load_candidates(path, "sales", tau=4, split=split, season=0)[0]
    assert series.values.tolist() == expected
    assert series.filled == Filled(str(path), "sales", leading=3, trailing=3)
    assert series.filled.describe(series.held_out) == (
        f"{path}: ignored 3 empty cells before its first value and 3 empty cells after its "
        "last value in column 'sales': the series runs from its first value to its last"
    )
    assert series.filled.to_manifest() == {
        "column": "sales", "interpolated": 0, "repeated": 0, "leading": 3, "trailing": 3,
    }  # fmt: skip
    # a gap inside the series is still one, refused by its line or filled and counted
    rows[100] = "2000-100,"
    write_csv(path, "date,sales\n" + "\n".join(rows) + "\n")
    with pytest.raises(SeriesError, match=r"s\.csv:102: column 'sales' has a missing value"):
        load_csv(path, "sales", "error")
    filled = load_candidates(path, "sales", tau=4, split=split, season=0)[0].filled
    assert (filled.total, filled.leading, filled.trailing) == (1, 3, 3)


def test_empty_cells_of_a_one_column_file_are_missing_values(tmp_path: Path) -> None:
    # pandas writes NaN in a one-column CSV as an empty line: it is a time step, not a
    # blank line to skip (skipping shifted every later value); trailing blank lines are not
    path = write_csv(tmp_path / "s.csv", "v\n1\n\n3\n\n\n6\n\n\n")
    assert load_csv(path, "v").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with pytest.raises(SeriesError, match=r"s\.csv:3: column 'v' has a missing value"):
        load_csv(path, "v", "error")


def test_missing_values_refused_with_line_number(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "a,v\n1,1\n2,\n3,3\n")
    with pytest.raises(SeriesError, match=r"s\.csv:3: column 'v' has a missing value"):
        load_csv(path, "v", "error")


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("a,b\n1,2\n", "c", r"column 'c' is not in .* \(columns: a, b\)$"),
        ("1.5\n2\n3\n", "v", r"\(columns: 1\.5\); its first row holds numbers.*header row"),
        ("a\n1\nabc\n", "a", r":3: column 'a' holds 'abc', not a finite number"),
        ("a\n1\ninf\n", "a", r"not a finite number"),
        # a spreadsheet's display format: say what to write instead
        (
            'd,a\n1,2\n2,"100,691.17"\n',
            "a",
            r":3: column 'a' holds '100,691\.17', not a finite number: write it without "
            r"thousands separators \(100691\.17\)$",
        ),
        ("a\nNA\n", "a", r"has no numeric values"),
        ("", "a", r"is empty"),
    ],
)
def test_bad_csv_gives_clear_error(tmp_path: Path, text: str, column: str, message: str) -> None:
    with pytest.raises(SeriesError, match=message):
        load_csv(write_csv(tmp_path / "s.csv", text), column)


def test_missing_file_and_bad_policy(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="does not exist"):
        load_csv(tmp_path / "nope.csv", "a")
    with pytest.raises(SeriesError, match="--missing must be one of"):
        load_csv(tmp_path / "nope.csv", "a", "drop")


def test_too_short_and_flat_series_are_refused(tmp_path: Path) -> None:
    short = write_csv(tmp_path / "short.csv", "v\n" + "\n".join(map(str, range(10))) + "\n")
    with pytest.raises(SeriesError, match=r"has 10 values; with --tau 4 .*it needs at least \d+"):
        load_series(short, "v", tau=4)
    flat = write_csv(tmp_path / "flat.csv", "v\n" + "1\n" * 50)
    with pytest.raises(SeriesError, match="constant"):
        load_series(flat, "v", tau=2)
    with pytest.raises(SeriesError, match="--column"):
        load_series(flat, None, tau=2)
    with pytest.raises(SeriesError, match="--column v needs --series"):  # not the sine instead
        load_series(None, "v", tau=2)
    with pytest.raises(SeriesError, match="--tau must be at least 1"):
        load_series(None, None, tau=0)


def test_large_level_keeps_its_small_moves(tmp_path: Path) -> None:
    # float32 spaces values 64 apart at 1e9: the series used to read as constant
    t = np.arange(200)
    text = "v\n" + "\n".join(f"{1e9 + 20 * np.sin(t_ / 3):.3f}" for t_ in t) + "\n"
    values = load_csv(write_csv(tmp_path / "big.csv", text), "v")
    assert values[1] - values[0] == pytest.approx(20 * np.sin(1 / 3), abs=1e-3)
    series = load_series(tmp_path / "big.csv", "v", tau=4, season=0, transform="level")
    assert series.normaliser.std == pytest.approx(float(np.std(values[: series.num_train])))
    norm = series.normaliser
    assert norm.undo(norm.apply(values[:3])) == pytest.approx(values[:3], abs=1e-3)


def test_small_units_are_not_a_constant_series() -> None:
    # the flat test is relative: a series in units of 1e-9 varies like any other
    x = 1e-9 * (np.sin(np.arange(200) / 5) + np.random.default_rng(0).normal(0, 0.3, 200))
    series = tail_split(x, 4, "tiny", season=0, transform="level")
    assert series.normaliser.std == pytest.approx(float(np.std(x[: series.num_train])))


def test_values_too_large_for_the_statistics_are_refused_by_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", "v\n1\n1e300\n2\n")
    with pytest.raises(SeriesError, match=r"s\.csv:3: column 'v' holds '1e300', beyond"):
        load_csv(path, "v")


def test_constant_differences_name_the_flags_not_a_flat_series(tmp_path: Path) -> None:
    period = [f"{np.sin(2 * np.pi * i / 10):.6f}" for i in range(10)]
    path = write_csv(tmp_path / "p.csv", "v\n" + "\n".join(period * 20) + "\n")
    with pytest.raises(SeriesError, match=r"seasonal-diff\(10\) is constant.*--season 0"):
        load_series(path, "v", tau=4)
    assert load_series(path, "v", tau=4, season=0, transform="level").representation.lost == 0


def test_textbook_split_with_a_season_keeps_levels(tmp_path: Path) -> None:
    # --transform unset means levels for the textbook split, with --season too
    walk = np.random.default_rng(0).normal(0, 1, 300).cumsum()
    path = write_csv(tmp_path / "w.csv", "v\n" + "\n".join(f"{v:.4f}" for v in walk) + "\n")
    series = load_series(path, "v", tau=4, split="textbook", season=12)
    assert series.representation.name == "seasonal-diff(12)"
    diffed = load_series(path, "v", tau=4, split="textbook", season=12, transform="auto")
    assert diffed.representation.name == "seasonal-diff(12)+diff"  # the ADF test's call


@pytest.mark.parametrize("split", ["tail", "textbook"])
def test_gaps_before_the_held_out_values_are_not_filled_from_them(tmp_path: Path, split) -> None:
    """Interpolating the whole file filled the last training values from the held-out ones
    (the validation tail, or the textbook split's test part), which then scored a model that
    had seen them."""
    cut = 180 if split == "tail" else 120  # 200 values: a tail of 20; the textbook's 60 %
    values = [f"{0.5 * i + (i % 7):.3f}" for i in range(200)]
    for i in range(cut - 4, cut):
        values[i] = ""
    moved = list(values)
    moved[cut + 2] = "999"
    paths = [write_csv(tmp_path / f"{n}.csv", "v\n" + "\n".join(v) + "\n")
             for n, v in (("a", values), ("b", moved))]  # fmt: skip
    loaded = [load_candidates(p, "v", tau=4, split=split)[0].values for p in paths]
    assert np.array_equal(loaded[0][:cut], loaded[1][:cut])
    assert not np.isnan(loaded[0]).any()


@pytest.mark.parametrize("split", ["tail", "textbook"])
def test_the_filled_cells_are_counted_by_how(tmp_path: Path, split: str) -> None:
    """Gaps were filled without a word: each series now says how many cells were filled and
    how (interpolated before the held-out part, the last value repeated inside it)."""
    rows = [f"{i},{'' if i in (10, 11, 195) else 3 + np.sin(0.05 * i)}" for i in range(200)]
    path = write_csv(tmp_path / "s.csv", "t,level\n" + "\n".join(rows) + "\n")
    candidates = load_candidates(path, "level", tau=4, split=split, season=0)
    for series in candidates:
        assert series.filled == Filled(str(path), "level", interpolated=2, repeated=1)
    part = "validation tail" if split == "tail" else "test part"
    assert candidates[0].filled.describe(candidates[0].held_out) == (
        f"{path}: filled 3 missing cells of column 'level': 2 before the {part} by linear "
        f"interpolation, 1 in the {part} by repeating the last value before it "
        "(--missing error refuses them)"
    )
    whole = write_csv(tmp_path / "whole.csv", "t,level\n" + "\n".join(
        f"{i},{3 + np.sin(0.05 * i)}" for i in range(200)))  # fmt: skip
    assert load_candidates(whole, "level", tau=4, split=split)[0].filled is None


def test_a_season_too_long_for_the_series_says_how_many_values_it_needs() -> None:
    """The message "needs at least two seasons of training values" read as met by 180 values
    and --season 90: the check also counts the window and 8 training examples."""
    values = np.sin(np.arange(200.0)) + 0.01 * np.arange(200.0)
    with pytest.raises(SeriesError, match=(
        r"--season 90 needs at least 196 training values \(two seasons, --tau 8 and 8 more\); "
        r"series s has 180 before its held-out 20 \(--val-size\)$"
    )):  # fmt: skip
        tail_split(values, 8, "s", season=90)
    assert tail_split(values, 8, "s", season=82).season == 82  # 2 * 82 + 8 + 8 = 180


def test_a_lone_huge_value_is_warned_about_by_its_line(tmp_path: Path) -> None:
    """One 1e6 among values near 12 set the normalisation's std, and the GRU then forecast
    408 for a series at 14 (AR(tau) about 5,800 off), with nothing said."""
    values = [f"{12 + np.sin(0.5 * i) + 0.01 * i:.4f}" for i in range(200)]
    values[120] = "1e6"
    path = write_csv(tmp_path / "s.csv", "t,y\n" + "".join(f"{i},{v}\n" for i, v in
                                                          enumerate(values)))  # fmt: skip
    (warning,) = load_candidates(path, "y", tau=4, season=0)[0].warnings
    assert warning.startswith(f"warning: {path}:122: column 'y' jumps to 1e+06 and back (")
    assert "a data error?" in warning
    # a level shift, a trend or a real series' largest moves are no spike
    shifted = [10.0] * 50 + [1e4] * 50
    assert find_spikes(np.array(shifted) + np.sin(np.arange(100.0))) == []
    assert find_spikes(np.exp(np.arange(100.0) / 5)) == []
    for file, column in (("co2.csv", "co2"), ("sunspots.csv", "sunactivity"),
                         ("nile.csv", "volume"), ("macro.csv", "cpi"), ("macro.csv", "unemp"),
                         ("elnino.csv", "temperature")):  # fmt: skip
        assert find_spikes(load_csv(DATA / file, column, keep_gaps=True)) == [], file
