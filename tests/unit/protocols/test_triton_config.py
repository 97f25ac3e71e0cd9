"""Triton's model config lists what the version answers: an lm model past --max-infill-vocab
has no `left` / `right` (GetModel's rpcs leave out Infill; every Infill is refused)."""

from __future__ import annotations

from pathlib import Path

from rnnserve.artifact.manifest import Manifest
from rnnserve.server.kserve.triton import model_config
from rnnserve.server.repository import ModelVersion
from rnnserve.server.service import served_rpcs


def test_an_lm_model_past_max_infill_vocab_lists_no_infill_inputs(model_repo: Path) -> None:
    folder = model_repo / "lstm" / "1"
    entry = ModelVersion("lstm", "1", folder, Manifest.load(folder))
    vocab = entry.manifest.vocab_size
    inputs = {t["name"] for t in model_config("lstm", entry, served_rpcs(entry, vocab))["input"]}
    assert {"text", "left", "right"} <= inputs
    narrow = served_rpcs(entry, vocab - 1)
    assert "Infill" not in narrow and "Score" in narrow
    inputs = {t["name"] for t in model_config("lstm", entry, narrow)["input"]}
    assert "text" in inputs and not {"left", "right"} & inputs
