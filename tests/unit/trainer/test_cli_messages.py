"""What a new user met trying `rnn-trainer` from outside: error lines that named an
internal exception or the wrong flag (each test failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnserve.trainer.checkpoint import load_checkpoint, save_checkpoint
from rnnserve.trainer.cli import main
from rnnserve.trainer.errors import TrainerError


@pytest.mark.parametrize("text", ["the time traveller\n", "hi\n", "a"])
def test_a_text_file_given_as_a_checkpoint_is_said_to_be_no_checkpoint(
    tmp_path: Path, text: str
) -> None:
    """`export --checkpoint corpus.txt` said "... checkpoint: pop from empty list" (or "105"):
    the unpickler's own words for bytes that are no pickle."""
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    with pytest.raises(TrainerError) as info:
        load_checkpoint(path)
    why = "it is not a file torch.save wrote (give checkpoint.pt or the run dir)"
    assert str(info.value).endswith(why)


def test_a_truncated_checkpoint_names_the_reason_without_torch_s_cut_advice(tmp_path: Path) -> None:
    """The zip reader's reason is followed by advice that the 200-character cut ended in the
    middle ("... there is a high likelihood that your checkpoint file is)")."""
    save_checkpoint({"state_dict": {"w": torch.zeros(256)}, "vocab": ["a"]}, tmp_path / "c.pt")
    whole = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(TrainerError) as info:
        load_checkpoint(tmp_path / "c.pt")
    message = str(info.value)
    assert "truncated or damaged" in message
    assert "internal miniz error" not in message and not message.endswith("file is)")


def test_a_count_model_refuses_task_infill_by_that_flag(tmp_path: Path, capsys) -> None:
    """`train --arch hmm --task infill` said "--bidirectional applies to rnn/gru/lstm": a flag
    the user never gave."""
    assert main(["train", "--arch", "hmm", "--task", "infill", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --task infill applies to rnn/gru/lstm, not hmm\n"


def test_a_file_where_the_run_dir_goes_is_named_as_a_file(tmp_path: Path, capsys) -> None:
    """`--run-dir notes.txt` (a file) said "cannot create the run dir notes.txt: File exists",
    as if the folder were there already."""
    (tmp_path / "notes.txt").write_text("x")
    argv = ["train", "--arch", "gru", "--hidden", "4", "--epochs", "1", "--max-tokens", "2000",
            "--no-progress", "--out", str(tmp_path / "m"),
            "--run-dir", str(tmp_path / "notes.txt")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"{tmp_path / 'notes.txt'} is a file, not a directory\n"), err
    assert "File exists" not in err


def test_zoo_without_progress_bars_still_says_what_it_trains(tmp_path: Path, capsys) -> None:
    """`zoo --no-progress` printed nothing but the final summary: minutes of silence for the
    default preset, where `train --no-progress` hides only the bars."""
    argv = ["zoo", "--out", str(tmp_path), "--preset", "tiny", "--only", "ngram", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("== [1/1] ngram (tiny) ==\nngram: val ppl "), out
    assert f"   -> {tmp_path / 'ngram' / '1'} (" in out


def test_an_infinite_learning_rate_is_refused_before_training() -> None:
    """`--lr inf` trained until "loss became nan at epoch 1, batch 2"."""
    from rnnserve.trainer.train import TrainConfig

    with pytest.raises(TrainerError, match=r"^--lr must be positive and finite, got inf$"):
        TrainConfig(lr=float("inf")).validate()


def test_an_infinite_alpha_is_not_explained_by_alpha_zero() -> None:
    """`--alpha inf` was refused with "(alpha = 0 gives unseen n-grams probability 0 ...)"."""
    from rnnserve.trainer.ngram import train_ngram

    with pytest.raises(TrainerError) as info:
        train_ngram([4, 5, 6, 4], 8, n=2, alpha=float("inf"))
    assert str(info.value) == "Laplace alpha must be a positive finite number, got inf"


def test_ended_with_fewer_epochs_than_the_run_has_is_an_error(tmp_path: Path, capsys) -> None:
    """`ended RUN --epochs 3` of an unfinished run at epoch 7 said "has epochs left to train"
    (exit 1), sending a Job on to `train --resume --epochs 3`, which refuses it."""
    history = [{"epoch": e, "train_ppl": 9.0, "val_ppl": 9.0} for e in range(1, 8)]
    checkpoint = {"model_config": {"arch": "gru"}, "state_dict": {}, "vocab": ["a"],
                  "epoch": 7, "history": history, "train_config": {"epochs": 40}}  # fmt: skip
    save_checkpoint(checkpoint, tmp_path / "checkpoint.pt")
    assert main(["ended", str(tmp_path), "--epochs", "3"]) == 2
    assert "has 7 epochs already, so --epochs 3 cannot continue it" in capsys.readouterr().err
    assert main(["ended", str(tmp_path), "--epochs", "8"]) == 1  # more epochs: still to train
    assert main(["ended", str(tmp_path)]) == 1  # its own 40


def test_stats_plot_under_a_file_is_refused_before_the_tables(tmp_path: Path, capsys) -> None:
    """`stats --plot notes.txt/z.png` printed every table, then "cannot write plot
    notes.txt/z.png: File exists"."""
    (tmp_path / "notes.txt").write_text("x")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the time traveller for so it will be convenient to speak of him " * 3)
    assert (
        main(["stats", "--corpus", str(corpus), "--plot", str(tmp_path / "notes.txt" / "z.png")])
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith(f"{tmp_path / 'notes.txt'} is a file, not a directory\n")


def test_the_parser_does_not_import_torch() -> None:
    """`rnn-trainer --help` took 2.2 s, 1.4 of them importing torch (the parser reads stats,
    which read corpus, which imported torch), and a Ctrl-C in those seconds, before any
    command ran, ended in a KeyboardInterrupt traceback instead of `error: interrupted`."""
    import subprocess
    import sys

    code = (
        "import sys; from rnnserve.trainer.cli import build_parser; build_parser([]); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_one_epoch_is_said_in_the_singular(tmp_path: Path, capsys) -> None:
    """`ended` and `--resume` said "has 1 epochs already", "ended with all its 1 epochs"."""
    from rnnserve.trainer.pipeline import run_ended

    history = [{"epoch": 1, "train_ppl": 9.0, "val_ppl": 9.0}]
    checkpoint = {"model_config": {"arch": "gru"}, "state_dict": {}, "vocab": ["a"],
                  "epoch": 1, "history": history, "train_config": {"epochs": 1}}  # fmt: skip
    assert run_ended(checkpoint, 1).startswith("the run ended with its 1 epoch: exporting it")
    checkpoint["train_config"] = {"epochs": 40}
    save_checkpoint(checkpoint, tmp_path / "checkpoint.pt")
    assert main(["ended", str(tmp_path), "--epochs", "1"]) == 2
    assert "has 1 epoch already, so --epochs 1 cannot continue it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["--arch", "ngram", "--hidden", "999", "--lr=5"],
         "--hidden, --lr apply to rnn/gru/lstm, not to --arch ngram (an n-gram takes --n and "
         "--alpha, beside the corpus and tokenizer flags)"),
        (["--arch", "ngram", "--layers", "3", "--states", "4", "--epochs", "2"],
         "--layers applies to rnn/gru/lstm, --states applies to hmm, --epochs applies to hmm "
         "and rnn/gru/lstm, not to --arch ngram"),
        (["--arch", "hmm", "--num-steps", "8", "--dropout", "0.1", "--run-dir", "r"],
         "--num-steps, --dropout, --run-dir apply to rnn/gru/lstm, not to --arch hmm (an HMM "
         "takes --states"),
        (["--arch", "hmm", "--n", "2"], "--n applies to ngram, not to --arch hmm"),
        (["--arch", "gru", "--n", "3", "--states", "4"],
         "--n applies to ngram, --states applies to hmm, not to --arch gru"),
        (["--arch", "lstm", "--hmm-method=gradient"],
         "--hmm-method applies to hmm, not to --arch lstm"),
    ],
)  # fmt: skip
def test_count_models_refuse_the_flags_they_would_ignore(
    tmp_path: Path, capsys, given: list[str], said: str
) -> None:
    """`--arch ngram --hidden 999 --lr 5` trained the same n-gram as without them."""
    out = tmp_path / "models"
    argv = ["train", *given, "--max-tokens", "2000", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}"), err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(
    "given", [["--arch", "ngram", "--n", "2", "--alpha", "0.5"],
              ["--arch", "hmm", "--states", "2", "--epochs", "1", "--seed", "3"]],
)  # fmt: skip
def test_count_models_take_their_own_flags_and_not_the_recipe_s(
    tmp_path: Path, capsys, given: list[str]
) -> None:
    """The recipe's defaults (--hidden 512, --time-budget 420, ...) are no flags the user gave."""
    out = tmp_path / "models"
    argv = ["train", *given, "--level", "char", "--max-tokens", "2000", "--val-fraction", "0.2",
            "--no-progress", "--out", str(out), "--name", "m"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "m" / "1" / "model.onnx").is_file()
