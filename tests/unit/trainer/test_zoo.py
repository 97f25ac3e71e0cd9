"""`rnn-trainer zoo`: what it refuses before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.trainer import zoo
from rnnserve.trainer.errors import TrainerError


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("trained before the --out check")

    monkeypatch.setattr(zoo, "train_recurrent", refuse)
    monkeypatch.setattr(zoo, "train_count_model", refuse)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("blocked", ["out", "out/hmm"])
def test_an_out_it_cannot_write_is_refused_before_training(tmp_path: Path, blocked: str) -> None:
    """`zoo --out FILE` trained the first model, then failed to export it (leaving its
    checkpoint in /tmp); with the default preset that is minutes lost per try."""
    out = tmp_path / "out"
    (tmp_path / blocked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocked).write_text("not a directory")
    with pytest.raises(TrainerError, match=rf"{blocked} is not a directory"):
        zoo.build_zoo(out, preset="tiny", only=["rnn", "hmm", "sine-mlp"], progress=False)
