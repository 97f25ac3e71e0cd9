"""Brute-force HMM quantities by enumerating every hidden path (tiny K and T only)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from rnnserve.trainer.hmm_fit import HmmParams


def random_params(k: int, v: int, seed: int) -> HmmParams:
    gen = torch.Generator().manual_seed(seed)

    def rows(*shape: int) -> torch.Tensor:
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.05
        return x / x.sum(-1, keepdim=True)

    return HmmParams(rows(k), rows(k, k), rows(k, v))


def joint(p: HmmParams, x: Sequence[int]) -> tuple[float, np.ndarray]:
    """p(x) and the marginals p(z_t = k, x) [T, K]."""
    pi, a, b = p.pi.numpy(), p.a.numpy(), p.b.numpy()
    k = len(pi)
    total, marg = 0.0, np.zeros((len(x), k))
    for path in itertools.product(range(k), repeat=len(x)):
        prob = pi[path[0]] * b[path[0], x[0]]
        for t in range(1, len(x)):
            prob *= a[path[t - 1], path[t]] * b[path[t], x[t]]
        total += prob
        for t, z in enumerate(path):
            marg[t, z] += prob
    return total, marg


def prob(p: HmmParams, x: Sequence[int]) -> float:
    return 1.0 if len(x) == 0 else joint(p, x)[0]


def expected_counts(p: HmmParams, x: Sequence[int]) -> tuple[np.ndarray, ...]:
    """E[#start in k], E[#k->j], E[#k emits v] under p(z | x), by enumeration."""
    pi, a, b = p.pi.numpy(), p.a.numpy(), p.b.numpy()
    k, v = b.shape
    c_pi, c_a, c_b = np.zeros(k), np.zeros((k, k)), np.zeros((k, v))
    total = 0.0
    for path in itertools.product(range(k), repeat=len(x)):
        w = pi[path[0]] * b[path[0], x[0]]
        for t in range(1, len(x)):
            w *= a[path[t - 1], path[t]] * b[path[t], x[t]]
        total += w
        c_pi[path[0]] += w
        for t in range(1, len(x)):
            c_a[path[t - 1], path[t]] += w
        for t, z in enumerate(path):
            c_b[z, x[t]] += w
    return c_pi / total, c_a / total, c_b / total


def sample(p: HmmParams, length: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    pi, a, b = p.pi.numpy(), p.a.numpy(), p.b.numpy()
    z = rng.choice(len(pi), p=pi)
    out = []
    for _ in range(length):
        out.append(int(rng.choice(b.shape[1], p=b[z])))
        z = rng.choice(len(pi), p=a[z])
    return out
