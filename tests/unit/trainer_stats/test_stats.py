"""`rnn-trainer stats`: n-gram tables and the Zipf plot, through add_arguments/run."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from rnnserve.trainer import stats
from rnnserve.trainer.errors import TrainerError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stats.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_ngram_counts_and_zipf_exponent() -> None:
    tokens = list("abcab")
    assert stats.ngram_counts(tokens, 1) == Counter({("a",): 2, ("b",): 2, ("c",): 1})
    assert stats.ngram_counts(tokens, 2)[("a", "b")] == 2
    assert stats.ngram_counts(tokens, 3) == Counter(
        {("a", "b", "c"): 1, ("b", "c", "a"): 1, ("c", "a", "b"): 1}
    )
    # frequencies exactly 1/rank give s = 1
    zipf = Counter({str(r): round(10000 / r) for r in range(1, 21)})
    assert stats.zipf_exponent(zipf) == pytest.approx(1.0, abs=0.01)


def test_word_level_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat . the cat ran .\n", encoding="utf-8")
    plot = tmp_path / "out" / "zipf.png"
    assert stats.run(parse("--corpus", str(corpus), "--level", "word", "--plot", str(plot))) == 0
    out = capsys.readouterr().out
    assert "11 word tokens, 7 distinct" in out
    lines = out.splitlines()
    uni = lines.index(next(x for x in lines if x.startswith("unigrams:")))
    assert lines[uni + 2].split() == ["1", "the", "3", f"{3 / 11:.4f}"]
    assert lines[uni + 3].split()[1:3] == [".", "2"]  # ties ("." and "cat") by text
    bi = lines.index(next(x for x in lines if x.startswith("bigrams:")))
    assert lines[bi + 2].split() == ["1", "the", "cat", "2", f"{2 / 10:.4f}"]
    assert any(x.startswith("trigrams:") for x in lines)
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_char_level_top_limits_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abracadabra", encoding="utf-8")
    stats.run(parse("--corpus", str(corpus), "--top", "2", "--plot", str(tmp_path / "z.png")))
    out = capsys.readouterr().out
    lines = out.splitlines()
    uni = lines.index(next(x for x in lines if x.startswith("unigrams:")))
    assert lines[uni + 2].split() == ["1", "'a'", "5", f"{5 / 11:.4f}"]
    assert lines[uni + 3].split() == ["2", "'b'", "2", f"{2 / 11:.4f}"]  # ties by text: b < r
    assert lines[uni + 4] == ""  # only --top rows
    assert "'abr'" in out and (tmp_path / "z.png").is_file()


def test_default_corpus_is_the_builtin_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats.run(parse("--top", "1", "--plot", str(tmp_path / "z.png")))
    out = capsys.readouterr().out
    assert "timemachine.txt" in out and "' '" in out  # space is the most frequent char


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"caf\xe9 au lait", "not UTF-8"), (b"   \n", "empty")],
)
def test_bad_corpus_is_a_clear_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    corpus = tmp_path / "bad.txt"
    if content is not None:
        corpus.write_bytes(content)
    plot = tmp_path / "z.png"
    with pytest.raises(TrainerError, match=message):
        stats.run(parse("--corpus", str(corpus), "--plot", str(plot)))
    assert not plot.exists()


def test_bad_top_and_unwritable_plot(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world", encoding="utf-8")
    with pytest.raises(TrainerError, match="--top"):
        stats.run(parse("--corpus", str(corpus), "--top", "0"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainerError, match="file is a file, not a directory"):  # before counting
        stats.run(parse("--corpus", str(corpus), "--plot", str(blocker / "z.png")))


def test_cli_stats_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rnnserve.trainer.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be", encoding="utf-8")
    plot = tmp_path / "z.png"
    args = ["stats", "--corpus", str(corpus), "--level", "word", "--plot", str(plot)]
    assert main(args) == 0
    assert "1  to be" in capsys.readouterr().out and plot.is_file()
    corpus.write_bytes(b"\xff\xfe")
    assert main(["stats", "--corpus", str(corpus), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not UTF-8" in err and "Traceback" not in err


def test_flat_frequencies_have_zipf_exponent_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every n-gram seen once: the fit's slope came out as -0.0 and printed "s=-0.000"."""
    assert str(stats.zipf_exponent(Counter({"a": 3, "b": 3, "c": 3}))) == "0.0"
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh", encoding="utf-8")
    stats.run(parse("--corpus", str(corpus), "--plot", str(tmp_path / "z.png")))
    out = capsys.readouterr().out
    assert "s=0.000" in out and "-0.000" not in out


def test_tokenizer_settings_of_a_trained_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rnn-trainer train` maps non-letters to spaces by default; stats counted the
    punctuation and digits such a model never sees, with no way to match it."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("It's 1895, Sir! It's late.", encoding="utf-8")
    plot = str(tmp_path / "z.png")
    stats.run(parse("--corpus", str(corpus), "--level", "word", "--letters-only", "--plot", plot))
    out = capsys.readouterr().out
    assert "6 word tokens, 4 distinct" in out and "1895" not in out and " , " not in out
    stats.run(parse("--corpus", str(corpus), "--level", "word", "--keep-case", "--plot", plot))
    out = capsys.readouterr().out
    assert " It " in out and " Sir " in out


def _columns(line: str) -> int:
    """Terminal columns of a line: wide (CJK) characters take two, combining marks none."""
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in line
    )


@pytest.mark.parametrize("level", ["char", "word"])
def test_wide_and_combining_characters_keep_the_columns_aligned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], level: str
) -> None:
    """Widths were counted in code points, so rows with 日本 ran two columns per character
    past the count column of the ASCII rows (and a decomposed é one column short)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("日本語 cafe\u0301 abc 日本語 cafe\u0301 xyz abc\n", encoding="utf-8")
    stats.run(parse("--corpus", str(corpus), "--level", level, "--plot", str(tmp_path / "z.png")))
    blocks = capsys.readouterr().out.split("\n\n")[1:-1]  # the three tables, not head/tail
    assert len(blocks) == 3
    for block in blocks:
        header, *rows = block.splitlines()[1:]
        assert len(rows) > 1 and any(_columns(r) != len(r) for r in rows)
        assert {_columns(r) for r in rows} == {_columns(header)}, block


def test_plot_format_follows_the_file_name(tmp_path: Path) -> None:
    """--plot zipf.svg wrote PNG bytes into a file named .svg."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world", encoding="utf-8")
    for name, magic in (("z.svg", b"<?xml"), ("z.pdf", b"%PDF"), ("z.PNG", PNG_MAGIC)):
        stats.run(parse("--corpus", str(corpus), "--plot", str(tmp_path / name)))
        assert (tmp_path / name).read_bytes().startswith(magic), name
    stats.run(parse("--corpus", str(corpus), "--plot", str(tmp_path / "zipf")))
    assert (tmp_path / "zipf").read_bytes().startswith(PNG_MAGIC)  # no suffix: PNG


@pytest.mark.parametrize("plot", ["z.bmp", "a_dir", ""])
def test_a_plot_path_it_cannot_write_is_refused_before_the_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, plot: str
) -> None:
    """A --plot naming a directory (or "", the current one) or a format matplotlib is not asked
    for printed every table, then failed: a run over a big corpus lost to a typo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_dir").mkdir()
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world", encoding="utf-8")
    with pytest.raises(TrainerError, match="--plot"):
        stats.run(parse("--corpus", str(corpus), "--plot", plot))
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "z.bmp").exists()
