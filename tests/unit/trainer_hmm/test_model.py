"""The exportable HMM LM: state semantics, logits, infill, and the exported ONNX Loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.export import export_model
from rnnserve.trainer.hmm import HmmConfig, HmmLM
from rnnserve.trainer.hmm_recursions import forward_scaled
from tests.memory import address_space_cap

from .brute import joint, prob, random_params

K, V = 3, 6
VOCAB = Vocab([*RESERVED, "a", "b"])


@pytest.fixture(scope="module")
def model() -> HmmLM:
    # float32 round trip so the brute-force oracle sees exactly the model's numbers
    p = random_params(K, V, seed=21)
    lm = HmmLM(p, HmmConfig(states=K, vocab_size=V)).eval()
    return lm


def test_initial_state_is_pi_and_first_token_distribution(model: HmmLM) -> None:
    (state,) = model.initial_state(2)
    (spec,) = model.state_specs()
    np.testing.assert_allclose(state.numpy(), np.array([spec.init, spec.init]), rtol=0)
    p = model.params
    want = [math.log(prob(p, [v])) for v in range(V)]
    np.testing.assert_allclose(model.first_token_log_probs().numpy(), want, rtol=1e-5)


def test_logits_are_next_token_log_probs_and_state_is_predictive(model: HmmLM) -> None:
    p = model.params
    x = [4, 1, 5, 5, 0]
    logits, state = model(torch.tensor([x]), model.initial_state(1)[0])
    assert logits.shape == (1, len(x), V)
    for t in range(len(x)):  # logits[t] = log p(x_{t+1} = v | x_<=t)
        base = prob(p, x[: t + 1])
        want = [math.log(prob(p, [*x[: t + 1], v]) / base) for v in range(V)]
        np.testing.assert_allclose(logits[0, t].numpy(), want, rtol=1e-4, atol=1e-5)
    _, marg = joint(p, x)  # state = p(z_{T} | x_<=T-1) = filtering @ A
    want_state = (marg[-1] / marg[-1].sum()) @ p.a.numpy()
    np.testing.assert_allclose(state[0].numpy(), want_state, rtol=1e-4)


def test_state_carries_across_calls_and_batch_rows_are_independent(model: HmmLM) -> None:
    tokens = torch.tensor([[1, 2, 3, 4, 5, 0, 1], [5, 5, 4, 3, 2, 1, 0]])  # [2, 7]
    (state,) = model.initial_state(2)
    logits, end = model(tokens, state)
    first, mid = model(tokens[:, :3], state)
    second, end2 = model(tokens[:, 3:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), logits)
    torch.testing.assert_close(end2, end)
    one, _ = model(tokens[1:], state[1:])
    torch.testing.assert_close(one, logits[1:])


def test_perplexity_and_posterior_blank_equal_enumeration(model: HmmLM) -> None:
    p = model.params
    x = [3, 0, 0, 5]
    want = math.exp(-math.log(prob(p, x)) / len(x))
    assert model.perplexity(x) == pytest.approx(want, rel=1e-5)
    left, right = [2, 4], [1, 1]
    scores = np.array([prob(p, [*left, v, *right]) for v in range(V)])
    got = model.posterior_blank(left, right)
    assert got.shape == (V,)
    np.testing.assert_allclose(got, scores / scores.sum(), rtol=1e-9)


def test_perplexity_of_a_long_split_at_a_large_vocabulary_needs_no_logits_table() -> None:
    """The validation perplexity ran the graph's forward: logits [len(ids), V] (400 GB for a
    word-level split of 700k ids at V = 140k, a traceback from `train`) and a K x V product a
    step. Only the observed ids' probabilities are needed."""
    vocab = 200_000
    lm = HmmLM(random_params(K, vocab, seed=8), HmmConfig(states=K, vocab_size=vocab)).eval()
    ids = np.random.default_rng(0).integers(0, vocab, 20_000).tolist()  # logits: 16 GB
    with address_space_cap(1 << 30):
        got = lm.perplexity(ids)
    p = lm.params
    fwd = forward_scaled(p.pi, p.a, p.b, torch.tensor([ids]))
    assert got == pytest.approx(math.exp(-float(fwd.log_likelihood[0]) / len(ids)), rel=1e-9)


def test_export_model_parity_loop_and_bayes_infill(tmp_path: Path) -> None:
    p = random_params(4, len(VOCAB), seed=3)
    lm = HmmLM(p, HmmConfig(states=4, vocab_size=len(VOCAB)))
    out = export_model(lm, tmp_path, name="hmm", vocab=VOCAB, tokenizer=TokenizerConfig())
    manifest = Manifest.load(out)
    assert manifest.parity["ok"] is True and manifest.parity["time_lengths"] == [1, 200]
    assert "single steps" in manifest.parity["stepwise"]
    graph = onnx.load(str(out / "model.onnx")).graph
    assert any(node.op_type == "Loop" for node in graph.node)  # a real loop, not unrolled

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (spec,) = manifest.state
    init = np.array([spec.init], dtype=np.float32)  # [1, K]

    def run(tokens: list[int], state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = {"tokens": np.array([tokens], dtype=np.int64), "alpha": state}
        logits, nxt = session.run(["logits", spec.output], feed)
        return logits, nxt

    long = np.random.default_rng(0).integers(0, len(VOCAB), 200).tolist()
    ort_logits, _ = run(long, init)
    torch_logits, _ = lm(torch.tensor([long]), torch.from_numpy(init))
    np.testing.assert_allclose(ort_logits, torch_logits.numpy(), atol=1e-4)

    # the server's Bayes rule over every candidate, with the forward graph only,
    # equals the forward-backward posterior
    left, right = [4, 5, 4], [5, 5]
    last, state = run(left, init)
    log_prior = last[0, -1]  # log p(v | left)
    scores = []
    for v in range(len(VOCAB)):
        logits, _ = run([v, *right], state)
        log_right = sum(logits[0, i, right[i]] for i in range(len(right)))
        scores.append(log_prior[v] + log_right)
    scores = np.exp(np.array(scores) - max(scores))
    np.testing.assert_allclose(scores / scores.sum(), lm.posterior_blank(left, right), atol=1e-5)
