"""CSV files as a new user brought them: a semicolon-separated export and a header naming a
column twice (each test failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.trainer.forecast.series import SeriesError, load_csv


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_file_not_separated_by_commas_says_so(tmp_path: Path, sep: str) -> None:
    """`t;load` was read as one column, and the error listed it as `columns: t;load` alone."""
    path = tmp_path / "s.csv"
    path.write_text(f"t{sep}load\n" + "".join(f"{i}{sep}{i * 1.5}\n" for i in range(20)))
    with pytest.raises(SeriesError) as info:
        load_csv(path, "load")
    assert str(info.value).endswith(
        f"the file is read as comma-separated, and its header holds {sep!r}"
    )


def test_a_column_named_twice_is_refused(tmp_path: Path) -> None:
    """`load,load`: the first column was forecast, silently, whichever the user meant."""
    path = tmp_path / "s.csv"
    path.write_text("load,t,load\n" + "".join(f"{i * 1.5},{i},{i}\n" for i in range(20)))
    with pytest.raises(SeriesError, match=r"column 'load' appears 2 times in the header"):
        load_csv(path, "load")
    assert load_csv(path, "t")[3] == 3.0  # another column still reads
