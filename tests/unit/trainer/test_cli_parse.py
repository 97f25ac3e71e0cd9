"""The CLI layer: forecast flags only for forecast runs; flags fill the dataclasses."""

from __future__ import annotations

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
