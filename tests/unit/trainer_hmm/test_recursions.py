"""Forward, backward, posterior and infill recursions against brute-force enumeration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnserve.trainer.hmm_recursions import (
    backward_log,
    forward_log,
    forward_scaled,
    infill_posterior,
    posterior,
    predictive,
)

from .brute import joint, prob, random_params

K, V = 3, 4
SEQS = [[0], [2, 1], [1, 3, 3, 0], [3, 0, 2, 2, 1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("x", SEQS)
def test_forward_likelihood_equals_enumeration(seed: int, x: list[int]) -> None:
    p = random_params(K, V, seed)
    want = math.log(joint(p, x)[0])
    xt = torch.tensor([x])
    assert float(forward_scaled(p.pi, p.a, p.b, xt).log_likelihood[0]) == pytest.approx(want)
    assert float(forward_log(p.pi.log(), p.a.log(), p.b.log(), xt)[0]) == pytest.approx(want)


def test_batched_forward_equals_single_sequences() -> None:
    p = random_params(K, V, 5)
    batch = torch.tensor([[0, 1, 2, 3], [3, 3, 1, 0]])
    ll = forward_scaled(p.pi, p.a, p.b, batch).log_likelihood
    for i in range(2):
        assert float(ll[i]) == pytest.approx(math.log(joint(p, batch[i].tolist())[0]))


@pytest.mark.parametrize("x", SEQS[1:])
def test_filtering_and_posterior_equal_enumeration(x: list[int]) -> None:
    p = random_params(K, V, 3)
    gamma, _, fwd = posterior(p.pi, p.a, p.b, torch.tensor([x]))
    total, marg = joint(p, x)
    np.testing.assert_allclose(gamma[0].numpy(), marg / total, rtol=1e-9)
    np.testing.assert_allclose(gamma[0].sum(-1).numpy(), 1.0, rtol=1e-12)  # posteriors sum to 1
    for t in range(len(x)):  # alpha_hat_t = p(z_t | x_<=t)
        _, m = joint(p, x[: t + 1])
        np.testing.assert_allclose(fwd.alpha[0, t].numpy(), m[t] / m[t].sum(), rtol=1e-9)


def test_backward_log_equals_enumeration() -> None:
    p = random_params(K, V, 4)
    x = [1, 0, 3, 2]
    got = backward_log(p.a.log(), p.b.log(), torch.tensor([x]))[0].exp().numpy()
    # p(x_>0 | z_0 = k) = p(z_0 = k, x) / (p(z_0 = k) B[k, x_0])
    _, marg = joint(p, x)
    want = marg[0] / (p.pi.numpy() * p.b[:, x[0]].numpy())
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_predictive_is_prior_of_next_state() -> None:
    p = random_params(K, V, 6)
    np.testing.assert_allclose(predictive(p.pi, p.a, p.b, torch.tensor([])).numpy(), p.pi)
    left = [2, 0, 1]
    _, marg = joint(p, left)
    want = (marg[-1] / marg[-1].sum()) @ p.a.numpy()
    np.testing.assert_allclose(predictive(p.pi, p.a, p.b, torch.tensor(left)).numpy(), want)


BLANKS = [([1, 2], [0, 3]), ([], [2, 1]), ([3, 1], []), ([], [])]


@pytest.mark.parametrize(("left", "right"), BLANKS)
def test_infill_posterior_equals_enumeration(left: list[int], right: list[int]) -> None:
    p = random_params(K, V, 8)
    scores = np.array([prob(p, [*left, v, *right]) for v in range(V)])
    got = infill_posterior(p.pi, p.a, p.b, torch.tensor(left), torch.tensor(right)).numpy()
    np.testing.assert_allclose(got, scores / scores.sum(), rtol=1e-9)
    assert got.sum() == pytest.approx(1.0)
