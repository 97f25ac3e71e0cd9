"""rnn-trainer through real processes: train -> package -> sample, and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.sample import greedy_tokens

TINY = ["--epochs", "1", "--hidden", "8", "--embed", "4", "--num-steps", "8",
        "--batch-size", "8", "--max-tokens", "3000", "--no-progress"]  # fmt: skip


def rnn_trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve.trainer.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def ort_greedy(package: Path, prefix: str, k: int) -> list[int]:
    """Greedy decoding the server's way: one prefill call, then one token per call."""
    m = Manifest.load(package)
    session = ort.InferenceSession(str(package / "model.onnx"))
    vocab = m.build_vocab()
    x = np.array([vocab.encode(Tokenizer(m.tokenizer).tokenize(prefix))], dtype=np.int64)
    state = [state_from_spec(s, 1) for s in m.state]
    out: list[int] = []
    for _ in range(k):
        feed = {"tokens": x, **{s.input: v for s, v in zip(m.state, state, strict=True)}}
        logits, *state = session.run(["logits", *(s.output for s in m.state)], feed)
        out.append(int(np.argmax(logits[0, -1])))
        x = np.array([[out[-1]]], dtype=np.int64)
    return out


@pytest.mark.slow
def test_train_sample_and_onnx_agree(tmp_path: Path) -> None:
    run = rnn_trainer("train", "--arch", "lstm", "--out", str(tmp_path / "models"),
                      "--run-dir", str(tmp_path / "run"), *TINY, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "uniform baseline |V|" in run.stdout
    package = tmp_path / "models" / "lstm" / "1"
    for name in ("model.onnx", "manifest.json", "checkpoint.pt"):
        assert (package / name).is_file()
    for name in ("checkpoint.pt", "log.jsonl", "curve.png"):
        assert (tmp_path / "run" / name).is_file()
    ids = greedy_tokens(package, "the time", 12)
    assert ids == ort_greedy(package, "the time", 12)
    assert greedy_tokens(tmp_path / "run", "the time", 12) == ids  # run dir: same weights
    sample = rnn_trainer("sample", "--model", str(package), "--prefix", "the time",
                         "--num-tokens", "12", "--ids", cwd=tmp_path)  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    assert [int(t) for t in sample.stdout.split()] == ids


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


BAD_INPUTS = {
    "empty": (["--corpus", "@empty.txt"], "empty"),
    "tiny": (["--corpus", "@tiny.txt"], "tokens"),
    "not-utf8": (["--corpus", "@latin1.txt"], "not UTF-8"),
    "missing": (["--corpus", "@nope/none.txt"], "does not exist"),
    "num-steps": (["--num-steps", "5000"], "too few"),
    "nan": (["--optimizer", "sgd", "--lr", "1e38", "--clip", "0"], "lower --lr"),
    "arch": (["--arch", "transformer"], "unknown arch"),
    "device": (["--device", "tpu"], "device"),
    "bptt": (["--bptt", "sideways"], "bptt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_no_model_dir(tmp_path: Path, case: str) -> None:
    _write(tmp_path, "empty.txt", b"  \n")
    _write(tmp_path, "tiny.txt", b"abc")
    _write(tmp_path, "latin1.txt", "the time machine caf\u00e9 ".encode("latin-1") * 50)
    flags, expected = BAD_INPUTS[case]
    flags = [str(tmp_path / f[1:]) if f.startswith("@") else f for f in flags]
    args = ["train", "--out", str(tmp_path / "models"), "--run-dir", str(tmp_path / "run")]
    run = rnn_trainer(*args, *TINY, *flags, cwd=tmp_path)  # a repeated flag: the last wins
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert expected in lines[0]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_sample_errors_are_one_line(tmp_path: Path) -> None:
    run = rnn_trainer("sample", "--model", str(tmp_path), "--prefix", "x", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("error: no checkpoint") and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ngram", "hmm"])
def test_count_models_sample_and_re_export(tmp_path: Path, arch: str) -> None:
    models = tmp_path / "models"
    own = ["--states", "4", "--epochs", "2"] if arch == "hmm" else ["--n", "3"]  # no others
    flags = [*own, "--max-tokens", "3000", "--no-progress"]
    run = rnn_trainer("train", "--arch", arch, "--out", str(models), *flags, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    package = models / arch / "1"
    ids = greedy_tokens(package, "the time", 10)
    assert ids == ort_greedy(package, "the time", 10)
    again = rnn_trainer("export", "--checkpoint", str(package), "--out", str(models),
                        "--name", arch, "--version", "2", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert greedy_tokens(models / arch / "2", "the time", 10) == ids
