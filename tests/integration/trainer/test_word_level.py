"""A word-level model end to end: the text `sample` prints is the server's, the package reads
prompts as the trainer did, and the checkpoint finds its corpus again from any directory."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.server.text import TextCodec
from rnnserve.trainer import cli
from rnnserve.trainer.checkpoint import load_checkpoint
from rnnserve.trainer.sample import greedy_text, greedy_tokens

TINY = ["--epochs", "1", "--hidden", "8", "--embed", "4", "--num-steps", "8",
        "--batch-size", "8", "--no-progress"]  # fmt: skip
WORDS = (
    "The",
    "Time",
    "Machine",
    "was",
    "a",
    "Traveller",
    "who",
    "said:",
    "it's",
    "far,",
    "away;",
    "you",
    "know.",
    "Hello!",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A word model trained from a corpus named by a relative path (cwd = the tmp dir)."""
    root = tmp_path_factory.mktemp("word")
    rng = random.Random(0)
    (root / "words.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    before = Path.cwd()
    os.chdir(root)
    try:
        args = ["train", "--arch", "gru", "--level", "word", "--keep-punctuation",
                "--corpus", "words.txt", "--out", "models", "--run-dir", "run", "--name", "w",
                *TINY]  # fmt: skip
        assert cli.main(args) == 0
    finally:
        os.chdir(before)
    yield root


@pytest.mark.slow
def test_sample_prints_the_text_the_server_streams(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Word level: a space between the prefix and the first word, no `<unk>` in the text."""
    package = trained / "models" / "w" / "1"
    codec = TextCodec(Manifest.load(package))
    prefix = "The Time zyzzyva"  # an unknown word in the prefix
    ids = greedy_tokens(package, prefix, 6)
    served = prefix + "".join(codec.piece(i) for i in ids)
    assert prefix + greedy_text(package, prefix, 6) == served
    capsys.readouterr()
    assert (
        cli.main(["sample", "--model", str(package), "--prefix", prefix, "--num-tokens", "6"]) == 0
    )
    assert capsys.readouterr().out == served + "\n"
    assert served.startswith(prefix + " ")


@pytest.mark.slow
def test_the_package_tokenizes_prompts_as_the_trainer_did(trained: Path) -> None:
    package = trained / "models" / "w" / "1"
    manifest = Manifest.load(package)
    ckpt = load_checkpoint(package)
    assert manifest.tokenizer.to_dict() == ckpt["tokenizer"]
    assert manifest.vocab == list(ckpt["vocab"])
    prompt = "Hello, Traveller!  IT'S far\nAWAY; zyzzyva."
    encoded = TextCodec(manifest).encode(prompt, "prompt", 100)
    trainer_tokens = Tokenizer(manifest.tokenizer).tokenize(prompt)
    assert encoded.tokens == trainer_tokens
    assert encoded.tokens[:4] == ["hello", ",", "traveller", "!"] and encoded.unknown == 1


@pytest.mark.slow
def test_export_from_another_directory_checks_on_the_validation_split(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint records --corpus words.txt; the retry may run from anywhere."""
    monkeypatch.chdir(tmp_path)
    args = ["export", "--checkpoint", str(trained / "run"), "--out", "models", "--name", "w"]
    assert cli.main(args) == 0
    assert (
        Manifest.load(tmp_path / "models" / "w" / "1")
        .parity["probe"]
        .startswith("the validation split")
    )


@pytest.mark.slow
def test_an_unusable_run_dir_is_refused_before_training(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a traceback after the first epoch: the run dir is made before training starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["train", "--arch", "gru", "--level", "word", "--corpus",
            str(trained / "words.txt"), "--out", str(tmp_path / "models"), "--run-dir",
            str(blocker / "run"), *TINY]  # fmt: skip
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: cannot create the run dir") and err.count("\n") == 1
    assert "epoch" not in out and not (tmp_path / "models").exists()


def test_an_openai_prompt_the_tokenizer_erases_is_named_by_its_index(trained: Path) -> None:
    """A word-level prompt of only spaces got the gRPC message on /v1/completions: the field
    `prompt`, not `prompt[1]`, and a resume state this endpoint cannot take."""
    import json
    import urllib.error
    import urllib.request

    from tests.integration.http.conftest import http_server

    server = http_server(trained / "models")
    try:
        assert server.app is not None and server.app.http is not None
        body = {"model": "w", "prompt": ["The Time", "   "], "max_tokens": 2}
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.app.http.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400
        message = json.loads(err.value.read())["error"]["message"]
    finally:
        server.stop()
    assert message.startswith("prompt[1]: has no token after tokenization"), message
    assert "resume" not in message
