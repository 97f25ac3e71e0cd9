"""The n-gram and the HMM served: Score and Infill equal the trainer's own numbers.

Real parts: tiny models trained here, exported with export_model, served by an in-process
rnn-server (gRPC, ONNX Runtime). The references are the trainer's dict counts (n-gram) and
forward-backward (HMM), which do not share code with the served graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.export import export_model
from rnnserve.trainer.hmm import HmmLM, train_hmm
from rnnserve.trainer.ngram import NgramCounts, train_ngram
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

VOCAB = Vocab([*RESERVED, "a", "b", "c", " "])
FIRST = len(RESERVED)
TRAIN = np.random.default_rng(0).integers(FIRST, len(VOCAB), 2000).tolist()
TOKENIZER = TokenizerConfig(letters_only=False)  # keeps "?" so it becomes <unk>


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {
        "ngram": train_ngram(TRAIN, len(VOCAB), n=3, alpha=0.5),
        "hmm": train_hmm(TRAIN, len(VOCAB), states=3, epochs=3, progress=False),
    }


@pytest.fixture(scope="module")
def repo(models: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("count-models")
    for name, model in models.items():
        export_model(model, out, name=name, vocab=VOCAB, tokenizer=TOKENIZER)
    return out


@pytest.fixture(scope="module")
def stub(repo: Path) -> Iterator:
    srv = ServerThread(make_settings(repo)).start()
    yield srv.stub
    srv.stop()


def _ids(text: str) -> list[int]:
    return VOCAB.encode(list(text))


def _log_joint(model: object, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for every i, the first from the start of text."""
    if isinstance(model, HmmLM):
        return [math.log(model.posterior_blank(ids[:i], [])[w]) for i, w in enumerate(ids)]
    counts = NgramCounts.fit(TRAIN, model.config)
    return counts.log_likelihoods(ids)


@pytest.mark.parametrize("name", ["ngram", "hmm"])
def test_manifest_carries_the_first_token_distribution(models, repo: Path, name: str) -> None:
    start = Manifest.load(repo / name / "1").start_log_probs
    want = [_log_joint(models[name], [v])[0] for v in range(len(VOCAB))]
    np.testing.assert_allclose(np.exp(start), np.exp(want), rtol=1e-5, atol=1e-9)
    assert math.fsum(math.exp(v) for v in start) == pytest.approx(1, rel=1e-5)


@pytest.mark.parametrize("name", ["ngram", "hmm"])
def test_score_equals_the_trainers_log_likelihoods(models, stub, name: str) -> None:
    for text in ["abc ab", "a?b"]:  # "?" is not in the vocabulary: <unk>
        (r,) = stub.Score(pb.ScoreRequest(model=name, texts=[text])).results
        want = _log_joint(models[name], _ids(text))[1:]  # the first token conditions the rest
        np.testing.assert_allclose(r.token_logprobs, want, rtol=1e-4, atol=1e-5)
        assert r.unknown_tokens == text.count("?")


@pytest.mark.parametrize("name", ["ngram", "hmm"])
@pytest.mark.parametrize(("left", "right"), [("", "bc"), ("", "c a"), ("ab", "c"), ("ab", "")])
def test_infill_is_the_models_posterior_even_at_the_start_of_text(
    models, stub, name: str, left: str, right: str
) -> None:
    """An empty left used to get a uniform prior: not the model's posterior of the blank."""
    res = stub.Infill(pb.InfillRequest(model=name, left=left, right=right, top_k=4))
    got = {c.token_id: c.probability for c in res.candidates}
    scores = []
    for v in range(FIRST, len(VOCAB)):  # p(left v right) by the trainer's model
        ids = [*_ids(left), v, *_ids(right)]
        scores.append(math.fsum(_log_joint(models[name], ids)))
    want = np.exp(np.array(scores) - max(scores))
    want /= want.sum()
    assert got == pytest.approx({FIRST + i: p for i, p in enumerate(want)}, rel=1e-4)


def test_manifests_without_a_start_distribution_still_load() -> None:
    """Packages written before start_log_probs existed (and RNNs): Infill's prior is uniform."""
    data = Manifest(
        name="m", version="1", task="lm", architecture="ngram", hyperparameters={},
        input_name="tokens", output_name="logits", state=[], tokenizer=TOKENIZER,
        vocab=VOCAB.to_list(),
    ).to_dict()  # fmt: skip
    assert "start_log_probs" not in data
    assert Manifest.from_dict(data).start_log_probs is None
    with pytest.raises(ValueError, match="start_log_probs"):
        Manifest.from_dict({**data, "start_log_probs": [0.0]})
