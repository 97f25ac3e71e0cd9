"""`--plot` of a forecast run and `--out-dir` of a backtest, as a new user gave them: a path
that cannot take the picture is said before training, and the file written is the one named
(each test failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.trainer.cli import main
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast import plot


def test_a_plot_without_a_suffix_is_written_where_it_is_named(tmp_path: Path) -> None:
    """`--plot out` wrote out.png (matplotlib adds the suffix) and said "wrote out"."""
    plt = plot.pyplot()
    fig, _ax = plt.subplots()
    written = plot._save(fig, plt, tmp_path / "out")
    assert written == tmp_path / "out"
    assert (tmp_path / "out").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("pic.txt", "unknown image suffix .txt; use .png, .svg or .pdf"),
        ("notes.txt/pic.png", "notes.txt is a file, not a directory"),
        ("folder", "is a directory; give a file name such as forecast.png"),
    ],
)
def test_a_plot_path_that_cannot_take_the_picture_is_refused_before_training(
    tmp_path: Path, capsys, name: str, why: str
) -> None:
    """`train --task forecast --plot pic.txt` trained, published the package, then failed
    with "Format 'txt' is not supported" (exit 2, so a script took the model for lost)."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "models"
    argv = ["train", "--task", "forecast", "--arch", "mlp", "--epochs", "1", "--no-progress",
            "--out", str(out), "--plot", str(tmp_path / name)]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --plot ") and why in captured.err, captured.err
    assert captured.out == "" and not out.exists()


def test_plot_format_reads_the_suffix(tmp_path: Path) -> None:
    assert plot.plot_format(tmp_path / "a.SVG") == "svg"
    assert plot.plot_format(tmp_path / "new" / "dirs" / "a") == "png"
    with pytest.raises(TrainerError, match=r"unknown image suffix \.jpgx"):
        plot.plot_format(tmp_path / "a.jpgx")


def test_a_backtest_out_dir_that_is_a_file_is_named_as_a_file(tmp_path: Path, capsys) -> None:
    """`backtest --out-dir results.txt` (a file) said "cannot write results.txt: File exists"."""
    series = tmp_path / "s.csv"
    series.write_text("x\n" + "".join(f"{i % 7 + i * 0.1}\n" for i in range(80)))
    (tmp_path / "results.txt").write_text("x")
    argv = ["backtest", "--series", str(series), "--column", "x", "--arch", "mlp",
            "--out-dir", str(tmp_path / "results.txt")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("results.txt is a file, not a directory\n") and "File exists" not in err
