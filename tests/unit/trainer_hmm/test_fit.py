"""Baum-Welch and gradient training of the HMM."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rnnserve.artifact.vocab import NOT_TEXT_IDS
from rnnserve.trainer import hmm_fit
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.hmm import train_hmm
from rnnserve.trainer.hmm_fit import (
    EXCLUDED_PROB,
    HmmParams,
    chunk_ids,
    em_step,
    fit_em,
    fit_gradient,
    log_likelihood,
    unigram,
)
from tests.memory import address_space_cap

from .brute import expected_counts, random_params, sample

V = 6


def test_em_step_equals_enumerated_expected_counts() -> None:
    p = random_params(3, 4, seed=11)
    x = [0, 3, 1, 1, 2]
    new, total = em_step(p, [torch.tensor([x])], pseudocount=0.0)
    c_pi, c_a, c_b = expected_counts(p, x)
    np.testing.assert_allclose(new.pi.numpy(), c_pi / c_pi.sum(), rtol=1e-9)
    np.testing.assert_allclose(new.a.numpy(), c_a / c_a.sum(1, keepdims=True), rtol=1e-9)
    np.testing.assert_allclose(new.b.numpy(), c_b / c_b.sum(1, keepdims=True), rtol=1e-9)
    assert total == pytest.approx(log_likelihood(p, [torch.tensor([x])]))


def test_chunking_keeps_every_id() -> None:
    batches = chunk_ids(list(range(23)), chunk=5)
    assert [tuple(b.shape) for b in batches] == [(4, 5), (1, 3)]
    assert torch.cat([b.reshape(-1) for b in batches]).tolist() == list(range(23))


def test_em_on_a_large_corpus_holds_a_bounded_number_of_chunks_at_once(monkeypatch) -> None:
    """All chunks went through one forward-backward pass: [N, chunk, K] float64 tensors,
    ~25 GB at K = 16 for a 40 MB char corpus, so `train --arch hmm` died of memory. Passes
    of at most PASS_ENTRIES entries give the same update."""
    p = random_params(3, V, seed=5)
    ids = sample(p, 2_000, seed=4)
    batches = chunk_ids(ids, chunk=20)  # [100, 20]
    whole, total = em_step(p, batches, pseudocount=1e-3)
    seen: list[int] = []
    posterior = hmm_fit.posterior

    def spy(pi, a, b, x):
        seen.append(x.numel() * a.shape[0])
        return posterior(pi, a, b, x)

    monkeypatch.setattr(hmm_fit, "PASS_ENTRIES", 20 * 3 * 7)  # 7 chunks a pass
    monkeypatch.setattr(hmm_fit, "posterior", spy)
    new, split_total = em_step(p, batches, pseudocount=1e-3)
    assert max(seen) <= 20 * 3 * 7 and len(seen) == 15
    assert split_total == pytest.approx(total, rel=1e-12)
    assert log_likelihood(p, batches) == pytest.approx(total, rel=1e-12)
    for got, want in zip((new.pi, new.a, new.b), (whole.pi, whole.a, whole.b), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_em_never_decreases_likelihood(seed: int) -> None:
    truth = random_params(3, V, seed=100 + seed)
    ids = sample(truth, 600, seed=seed)
    batches = chunk_ids(ids, chunk=50)
    start = HmmParams.random(4, V, unigram(ids, V), seed=seed)
    _, history = fit_em(start, batches, epochs=15, pseudocount=0.0)
    ll = history.log_likelihood_per_token
    assert len(ll) == 16
    assert all(b >= a - 1e-10 for a, b in itertools.pairwise(ll)), ll
    assert ll[-1] > ll[0]


def test_train_hmm_em_and_gradient_improve_and_are_deterministic() -> None:
    truth = random_params(2, V, seed=7)
    ids = sample(truth, 800, seed=3)
    for method in ("em", "gradient"):
        model = train_hmm(
            ids, V, states=3, method=method, epochs=8, seed=5, progress=False, excluded=()
        )
        ll = model.history.log_likelihood_per_token
        assert ll[-1] > ll[0], (method, ll)
        again = train_hmm(
            ids, V, states=3, method=method, epochs=8, seed=5, progress=False, excluded=()
        )
        torch.testing.assert_close(model.loop.b, again.loop.b)
        for t in (model.pi, model.loop.a, model.loop.b):  # still distributions
            torch.testing.assert_close(t.sum(-1), torch.ones_like(t.sum(-1)))
            assert (t > 0).all()
    # trained on data from a strongly structured HMM, it beats the unigram baseline held out
    a = torch.tensor([[0.1, 0.9], [0.9, 0.1]], dtype=torch.float64)
    b = [[0.3, 0.3, 0.3, 0.05, 0.05, 0.0], [0.0, 0.05, 0.05, 0.3, 0.3, 0.3]]
    truth = HmmParams(a[0] * 0 + 0.5, a, torch.tensor(b, dtype=torch.float64))
    ids, held = sample(truth, 800, seed=3), sample(truth, 400, seed=9)
    # EM finds a local optimum; restarts screen several initialisations for the best
    model = train_hmm(ids, V, states=2, epochs=30, seed=0, progress=False, restarts=4, excluded=())
    uni = unigram(ids, V)[torch.tensor(held)]
    assert model.perplexity(held) < float(torch.exp(-(uni.log().mean())))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": [4], "vocab_size": V, "states": 2}, "at least 2 tokens"),
        ({"ids": [4, 5], "vocab_size": V, "states": 0}, "at least 1 hidden state"),
        ({"ids": [4, 5], "vocab_size": V, "states": 2, "method": "sgd"}, "method must be one"),
        ({"ids": [4, 9], "vocab_size": V, "states": 2}, "outside the vocabulary"),
        ({"ids": [4, 3, 5], "vocab_size": V, "states": 2}, "id 3 is excluded"),
        (
            {"ids": [4, 5], "vocab_size": V, "states": 2, "excluded": (0, 1, 2, 3, 4, 5)},
            "must leave some",
        ),
        # NaN passed `< 0` checks: EM ran and then reported "diverged", Adam a ValueError
        ({"ids": [4, 5], "vocab_size": V, "states": 2, "pseudocount": math.nan}, "pseudocount"),
        # 0 left unseen symbols at probability 0: the forward vector summed to 0, perplexity
        # and the exported logits were NaN
        ({"ids": [4, 5], "vocab_size": V, "states": 2, "pseudocount": 0.0}, "pseudocount"),
        # 100k states: A alone is 40 GB of float32; it died allocating it, with a traceback
        ({"ids": [4, 5], "vocab_size": V, "states": 100_000}, "lower --states"),
        (
            {"ids": [4, 5], "vocab_size": V, "states": 2, "method": "gradient", "lr": math.nan},
            "lr a finite number",
        ),
        ({"ids": [4, 5], "vocab_size": V, "states": 2, "lr": math.inf}, "lr a finite number"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        train_hmm(progress=False, **kwargs)


@pytest.mark.parametrize("method", ["em", "gradient"])
def test_ids_that_never_occur_in_text_are_never_emitted(method: str) -> None:
    """<pad>, <bos>, <eos> (ids 1-3) get no share of the smoothing: a generated stream never
    stops at an <eos> the model never saw (temperature 2 made that a 1e-4 chance a step)."""
    truth = random_params(2, V, seed=7)
    ids = [i for i in sample(truth, 1200, seed=3) if i not in NOT_TEXT_IDS][:600]
    model = train_hmm(ids, V, states=3, method=method, epochs=5, seed=1, progress=False)
    assert model.config.excluded == NOT_TEXT_IDS
    b = model.params.b
    torch.testing.assert_close(b.sum(1), torch.ones(3, dtype=torch.float64))
    assert (b[:, list(NOT_TEXT_IDS)] <= 2 * EXCLUDED_PROB).all()
    first = model.first_token_log_probs().exp()
    assert float(first[list(NOT_TEXT_IDS)].sum()) < 1e-10
    logits, _ = model(torch.tensor([ids[:50]]), model.initial_state(1)[0])
    assert torch.isfinite(logits).all()  # finite, so the export check can compare them
    assert float(logits.exp()[..., list(NOT_TEXT_IDS)].max()) < 1e-10


def test_gradient_training_memory_does_not_grow_with_states_squared() -> None:
    """The log-space recursion's logsumexp made an [n, K, K] tensor a step, and backward kept
    them all: n * T * K^2 floats, 20 GB for one minibatch of 32 chunks of 200 at K = 512, so
    `train --hmm-method gradient --states 512` died of memory where EM needs under 1 GB. Here
    (K = 256) that is 3.4 GB; the scaled recursion keeps [n, K] a step."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (32 * 200,), generator=gen).tolist()
    start = HmmParams.random(256, V, unigram(ids, V), seed=0)
    with address_space_cap(1 << 29):
        _, history = fit_gradient(start, chunk_ids(ids, 200), epochs=1)
    assert len(history.log_likelihood_per_token) == 2
    assert all(math.isfinite(ll) for ll in history.log_likelihood_per_token)
