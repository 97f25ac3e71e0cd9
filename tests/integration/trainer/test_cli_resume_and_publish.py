"""What a new user met trying `rnn-trainer` from outside, through the CLI in process: a
resumed run that left its recipe, and a published package reported as never made (each
test failed before its fix)."""

from __future__ import annotations

import io
from pathlib import Path

from rnnserve.trainer.checkpoint import load_checkpoint
from rnnserve.trainer.cli import main
from rnnserve.trainer.recipe import recipe_for


def _data(tmp_path: Path) -> list[str]:
    return ["--num-steps", "8", "--batch-size", "8", "--max-tokens", "2500", "--no-progress",
            "--time-budget", "0", "--out", str(tmp_path / "m")]  # fmt: skip


def test_a_run_resumed_without_arch_keeps_its_own_recipe(tmp_path: Path, capsys) -> None:
    """`train --resume RUN` of a GRU run with no --arch trained on with the LSTM's recipe
    (lr 0.005, no weight decay: the run's 0.003 and 0.2 silently dropped), and its note
    listed `--arch lstm, --hidden 512, --layers 1, ...` and `--min-freq 1` as ignored, flags
    nobody gave."""
    run = tmp_path / "run"
    first = ["train", "--arch", "gru", "--hidden", "8", "--embed", "4", "--epochs", "1",
             "--min-freq", "2"]  # fmt: skip
    assert main([*first, "--run-dir", str(run), *_data(tmp_path)]) == 0
    capsys.readouterr()
    more = ["train", "--resume", str(run), "--epochs", "2", "--run-dir", str(tmp_path / "more")]
    assert main([*more, *_data(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ignored" not in out, out
    assert "gru layers=2 hidden=8" in out and f"exported {tmp_path / 'm' / 'gru' / '1'}" in out
    gru = recipe_for("char", "gru")
    config = load_checkpoint(tmp_path / "more")["train_config"]
    assert (config["lr"], config["weight_decay"]) == (gru.lr, gru.weight_decay)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--hidden", "16",
                 "--run-dir", str(run), *_data(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "ignored: --hidden 16\n" in out, out  # a flag given is still said


def test_export_whose_stdout_closed_after_publishing_exits_0(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`rnn-trainer export ... | head -0` wrote the package, then failed with "stdout was
    closed, so export stopped before it ended" (exit 2): only its report was cut."""
    run = tmp_path / "run"
    argv = ["train", "--arch", "rnn", "--hidden", "4", "--embed", "4", "--epochs", "1"]
    assert main([*argv, "--run-dir", str(run), *_data(tmp_path)]) == 0
    capsys.readouterr()

    class Closed(io.StringIO):
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    out = tmp_path / "published"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--name", "x"]) == 0
    assert (out / "x" / "1" / "model.onnx").is_file()
    assert capsys.readouterr().err == ""


def test_a_refused_conversion_prints_a_retry_with_every_precision_flag(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`train --precision int8 --per-tensor --allow-quality-loss` whose conversion failed
    printed a retry with `--precision int8` alone (per-channel, the quality bound back on)
    and its paths unquoted (a run dir with a space split into two arguments)."""
    import shlex

    import rnnserve.trainer.cli as cli
    from rnnserve.trainer.errors import TrainerError

    def refused(*_args, **_kwargs):
        raise TrainerError("int8 check failed")

    monkeypatch.setattr(cli, "_convert_trained", refused)
    run = tmp_path / "run dir"
    argv = ["train", "--arch", "rnn", "--hidden", "4", "--embed", "4", "--epochs", "1",
            "--run-dir", str(run), "--precision", "int8", "--per-tensor",
            "--allow-quality-loss", *_data(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    command = shlex.split(err.split("retry with: ", 1)[1])
    assert command[:4] == ["rnn-trainer", "export", "--checkpoint", str(run / "checkpoint.pt")]
    assert command[-4:] == ["--precision", "int8", "--per-tensor", "--allow-quality-loss"]
