"""The CLI layer: forecast flags only for forecast runs; flags fill the dataclasses."""

from __future__ import annotations

import os
import shlex

import pytest

from rnnserve.trainer.cli import _wants_forecast, build_parser, main, recurrent_train_config
from rnnserve.trainer.recipe import CHAR


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--task", "forecast"], True),
        (["train", "--task=forecast"], True),
        (["train", "--arch", "mlp"], True),
        (["train", "--name", "forecast"], False),
        (["train", "--arch", "lstm", "--name", "mlp"], False),
    ],
)
def test_forecast_detection(argv: list[str], expected: bool) -> None:
    assert _wants_forecast(argv) is expected


def test_lm_defaults_are_not_changed_by_the_forecast_flags() -> None:
    args = build_parser(["train"]).parse_args(["train", "--name", "forecast"])
    assert (args.arch, args.hidden, args.lr) == ("lstm", CHAR.hidden, CHAR.lr)  # the recipe's
    assert recurrent_train_config(args).epochs == CHAR.epochs


def test_unknown_arch_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--arch", "transformer", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown arch") and err.count("\n") == 1


def test_train_flags_are_not_abbreviated(capsys: pytest.CaptureFixture[str]) -> None:
    """--npro would reach torchrun's workers as written, where --nproc is taken out by name."""
    from rnnserve.trainer import cli

    with pytest.raises(SystemExit):
        cli.build_parser(["train"]).parse_args(["train", "--npro", "2"])


def test_value_error_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --level is the tokenizer's ValueError: its text, not its repr in quotes."""
    assert main(["train", "--level", "words", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer level must be one of") and err.count("\n") == 1


def test_a_multi_line_message_is_cut_to_its_first_line(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """torch.load's refusal of a file that is no checkpoint spans several lines."""
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" * 8)
    assert main(["sample", "--model", str(onnx), "--prefix", "the"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_pickled_object_is_refused_in_plain_words(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """torch's weights-only refusal begins with advice to unpickle anyway; the CLI says why."""
    import torch

    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {}, "vocab": [], "payload": object()}, path)
    assert main(["sample", "--model", str(path), "--prefix", "the"]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects" in err and "Weights only" not in err, err


def test_zoo_only_with_no_names_is_refused(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """`--only` with nothing after it used to build no model and report success."""
    assert main(["zoo", "--only", "--out", str(tmp_path)]) == 2
    assert "--only needs at least one zoo name" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["zoo", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown zoo model(s) nope" in capsys.readouterr().err


def test_forecast_refuses_data_parallel_naming_the_task(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """A forecast GRU used to be refused as `--arch gru`, beside "is for rnn, gru and lstm"."""
    argv = ["train", "--task", "forecast", "--nproc", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task forecast trains in one process") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["ngram", "hmm"])
def test_count_models_refuse_resume(
    arch: str, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """--resume used to be ignored here: a fresh model was trained and published silently."""
    argv = ["train", "--arch", arch, "--resume", str(tmp_path / "runs" / arch), "--epochs", "1",
            "--max-tokens", "2000", "--no-progress", "--out", str(tmp_path / "models")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume continues rnn/gru/lstm training, not {arch}")
    assert err.count("\n") == 1
    assert not (tmp_path / "models").exists()


def test_an_empty_name_is_refused_not_replaced_by_the_arch(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """`--name "$UNSET"` used to publish as the arch's name, over the zoo's `ngram`."""
    argv = ["train", "--arch", "ngram", "--name", "", "--max-tokens", "2000", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model name '' must be a plain, non-empty directory name")
    assert not any(tmp_path.iterdir())


def test_ended_on_a_count_model_says_it_has_no_run(tmp_path, capsys) -> None:
    """An n-gram package was reported as a run "with epochs left to train"."""
    import torch

    from rnnserve.trainer.cli import main

    checkpoint = {"state_dict": {}, "vocab": ["<unk>"], "count_config": {}, "kind": "ngram"}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert main(["ended", str(tmp_path)]) == 2
    assert "holds an ngram model, trained in one pass" in capsys.readouterr().err


def test_a_resumed_run_without_epochs_keeps_its_own(tmp_path) -> None:
    """`rnn-trainer ended` judges a run by its own --epochs: `train --resume` without --epochs
    must too, or a run that ended (and that `ended` says is only exported) trains on to the
    recipe's epochs."""
    from rnnserve.trainer.pipeline import run_ended

    args = build_parser(["train"]).parse_args(["train", "--resume", str(tmp_path)])
    own = {"epochs": 2, "average_from": 2}
    cfg = recurrent_train_config(args, own)
    assert (cfg.epochs, cfg.average_from) == (2, 2)
    ended = {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}], "train_config": own}
    assert run_ended(ended, cfg.epochs) is not None  # exported as it is, as `ended` says
    more = build_parser(["train"]).parse_args(["train", "--resume", "x", "--epochs", "5"])
    assert recurrent_train_config(more, own).epochs == 5  # a given --epochs still trains on
    assert recurrent_train_config(args).epochs == CHAR.epochs  # a fresh run: the recipe's


@pytest.mark.parametrize("command", ["train", "backtest"])
def test_a_seed_out_of_range_is_a_usage_error(command, capsys) -> None:
    """A seed past ~1.8e13 was accepted and failed at the first epoch with "Overflow when
    unpacking long long" (the loop derives seed * 1_000_003 + epoch); a negative one reached
    numpy's "Seed must be between 0 and 2**32 - 1"."""
    needed = ["--series", "s.csv", "--column", "y"] if command == "backtest" else []
    for seed in ("-1", str(2**32), "20000000000000"):
        with pytest.raises(SystemExit) as exit_:
            build_parser([command]).parse_args([command, *needed, "--seed", seed])
        assert exit_.value.code == 2 and "must be in [0, 4294967295]" in capsys.readouterr().err
    args = build_parser([command]).parse_args([command, *needed, "--seed", str(2**32 - 1)])
    assert args.seed == 2**32 - 1


def test_precision_on_an_mlp_names_it_a_forecaster(capsys) -> None:
    """`train --arch mlp --precision int8` said "this mlp (lm) model": the mlp is a forecaster."""
    assert main(["train", "--arch", "mlp", "--precision", "int8"]) == 2
    assert "not to this mlp (forecast) model" in capsys.readouterr().err


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_in_force(capsys) -> None:
    """`train --help` showed no defaults, so "--time-budget ... 0 = no budget" read as none
    while the recipe's is 420 s, and --hidden hid the recipe's 512 (the code's 128)."""
    text = _help(["train"], capsys)
    assert f"0 = no budget (default: {CHAR.time_budget})" in text
    assert f"hidden units per layer (default: {CHAR.hidden})" in text
    assert "--seed SEED 0 .. 2**32 - 1 (default: 0)" in text
    assert "(default: fp32)" in text
    gru = _help(["train", "--arch", "gru"], capsys)  # the gru recipe's own
    assert "hidden units per layer (default: 320)" in gru
    forecast = _help(["train", "--task", "forecast"], capsys)
    assert "(default: True)" not in forecast  # --no-refit: a switch, not its dest's value
    assert "(default: gru)" in forecast


def test_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch, capsys) -> None:
    """Ctrl-C left a checkpoint but only said "interrupted": the message names the command
    that resumes from it (the --resume given before is replaced)."""
    from rnnserve.trainer import pipeline

    def interrupted(*_args, run_dir, **_kwargs):
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoint.pt").write_bytes(b"epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_recurrent", interrupted)
    run = tmp_path / "my run"
    argv = ["train", "--arch", "gru", "--epochs", "3", "--out", str(tmp_path / "m")]
    code = main([*argv, "--resume=old", "--run-dir", str(run)])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 130
    assert line.startswith("error: interrupted; ") and str(run / "checkpoint.pt") in line
    command = line.split("resume with ", 1)[1]
    assert shlex.split(command) == [
        "rnn-trainer",
        *argv,
        "--run-dir",
        str(run),
        "--resume",
        str(run),
    ]


def test_an_interrupted_run_with_no_new_checkpoint_names_none(tmp_path, monkeypatch, capsys):
    """A checkpoint in the run dir older than the run is some earlier run's."""
    from rnnserve.trainer import pipeline

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an earlier run")
    os.utime(run / "checkpoint.pt", (1, 1))

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_recurrent", interrupted)
    argv = ["train", "--arch", "gru", "--epochs", "3", "--out", str(tmp_path / "m")]
    assert main([*argv, "--run-dir", str(run)]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_run_resumed_in_place_and_interrupted_at_once_names_its_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """`train --resume RUN` stopped before its first new epoch printed no command, though the
    checkpoint it resumed is still the one to go on from."""
    from rnnserve.trainer import pipeline

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"epoch 4 of this run")
    os.utime(run / "checkpoint.pt", (1, 1))

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_recurrent", interrupted)
    argv = ["train", "--arch", "gru", "--epochs", "9", "--out", str(tmp_path / "m")]
    assert main([*argv, "--run-dir", str(run), "--resume", str(run)]) == 130
    line = capsys.readouterr().err
    assert line.startswith("error: interrupted; ") and f"--resume {run}" in line


def test_a_closed_stdout_fails_a_training_run(tmp_path, monkeypatch, capsys) -> None:
    """`rnn-trainer train ... | head -1` ended the run before its first epoch, exported
    nothing and exited 0 (the quiet exit meant for `stats | head`)."""
    from rnnserve.trainer import pipeline

    def reader_left(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(pipeline, "train_recurrent", reader_left)
    argv = ["train", "--arch", "gru", "--epochs", "3", "--out", str(tmp_path / "m")]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "error: stdout was closed, so train stopped before it ended"


def test_a_closed_stdout_ends_stats_quietly(monkeypatch, capsys) -> None:
    """`rnn-trainer stats | head`: the reader had what it wanted."""
    import rnnserve.trainer.cli as cli

    def reader_left(_args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "stats", reader_left)
    assert main(["stats"]) == 0
    assert capsys.readouterr().err == ""


def test_a_terminal_that_is_not_utf8_gets_escapes_not_an_error(monkeypatch) -> None:
    """`sample` of a text the terminal's encoding cannot hold exited 2 with "'ascii' codec
    can't encode characters"; the text is printed with backslash escapes instead."""
    import io

    import rnnserve.trainer.cli as cli

    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="ascii"))
    monkeypatch.setitem(cli.COMMANDS, "sample", lambda _args: print("日本 café") or 0)
    assert main(["sample", "--model", "m", "--prefix", "x"]) == 0
    cli.sys.stdout.flush()
    assert raw.getvalue().decode("ascii") == "\\u65e5\\u672c caf\\xe9\n"


def test_a_misspelt_flag_gets_the_subcommand_usage_and_a_suggestion(capsys) -> None:
    """`train --epoch 1` was refused under the top-level usage, which lists no train flag."""
    with pytest.raises(SystemExit) as info:
        build_parser(["train"]).parse_args(["train", "--epoch", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: rnn-trainer train ") and "[--epochs EPOCHS]" in err
    assert err.splitlines()[-1].endswith(
        "unrecognized arguments: --epoch 1 (did you mean --epochs?)"
    )


def test_ended_refuses_epochs_below_one(tmp_path, capsys) -> None:
    """`ended RUN --epochs 0` exited 0, "the run is over", for any run."""
    assert main(["ended", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs must be 1 or more" in capsys.readouterr().err


def test_a_file_torch_did_not_write_is_not_said_to_hold_python_objects(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    """`export --checkpoint run/log.jsonl` said the file "holds Python objects"."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1}\n')
    assert main(["ended", str(log)]) == 2
    err = capsys.readouterr().err
    assert "is not a file torch.save wrote" in err and "Python objects" not in err, err
