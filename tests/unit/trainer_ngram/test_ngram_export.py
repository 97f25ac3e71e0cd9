"""n-gram export through trainer.export.export_model, then ONNX Runtime against the reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.export import export_model
from rnnserve.trainer.ngram import (
    BOS_ID,
    NEVER_LOGPROB,
    NOT_TEXT_IDS,
    NgramConfig,
    NgramCounts,
    train_ngram,
)

VOCAB = Vocab([*RESERVED, "a", "b", "c", "d"])
TRAIN = [4, 5, 6, 4, 7, 5, 6, 6, 4, 5, 7, 7, 4, 5, 6] * 10


@pytest.mark.parametrize("n", [1, 2, 3])
def test_export_model_passes_parity_and_matches_reference(n: int, tmp_path: Path) -> None:
    model = train_ngram(TRAIN, len(VOCAB), n=n, alpha=0.5)
    out = export_model(model, tmp_path, name=f"ngram{n}", vocab=VOCAB, tokenizer=TokenizerConfig())
    manifest = Manifest.load(out)
    assert manifest.parity["ok"] is True
    assert manifest.architecture == "ngram" and manifest.task == "lm"
    (spec,) = manifest.state
    assert spec.input == "context" and spec.dtype == "int64" and spec.init == BOS_ID
    assert not any(n.op_type == "Loop" for n in onnx.load(str(out / "model.onnx")).graph.node)

    # an independent check: ORT, fed the state spec's initial value, equals the dict counts
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    seq = [4, 7, 7, 5, 6, 4, 4]
    context = np.full((1, spec.shape[1]), spec.init, dtype=np.int64)
    logits, ctx_out = session.run(
        ["logits", spec.output], {"tokens": np.array([seq], dtype=np.int64), "context": context}
    )
    ref = NgramCounts.fit(TRAIN, NgramConfig(len(VOCAB), n, 0.5, excluded=NOT_TEXT_IDS))
    padded = [BOS_ID] * (n - 1) + seq
    for t in range(len(seq)):
        probs = [ref.prob(padded[: n + t], w) for w in range(len(VOCAB))]
        want = [math.log(p) if p else NEVER_LOGPROB for p in probs]
        np.testing.assert_allclose(logits[0, t], want, rtol=1e-5, atol=1e-5)
    if n > 1:
        assert ctx_out.tolist() == [seq[-(n - 1) :]]
