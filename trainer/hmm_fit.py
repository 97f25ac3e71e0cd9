"""Fitting a discrete HMM: Baum-Welch EM, or gradient ascent on the forward log-likelihood.

The corpus is cut into chunks of `chunk` ids, each treated as an independent sequence that
starts from pi. That lets one forward-backward pass run over all chunks at once (a batch of
small matrix products per time step) instead of a Python step per id; the objective is the
sum of the chunks' log-likelihoods, which EM never decreases (with pseudocount 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from rnnserve.trainer.hmm_recursions import emissions, forward_scaled, posterior


@dataclass
class HmmParams:
    """Probabilities of a K-state HMM over V symbols (float64)."""

    pi: torch.Tensor  # [K]
    a: torch.Tensor  # [K, K], rows sum to 1
    b: torch.Tensor  # [K, V], rows sum to 1

    def excluding(self, excluded: Sequence[int]) -> HmmParams:
        """The same HMM with the emission of every `excluded` id set to EXCLUDED_PROB in
        each state (rows renormalised): ids that never occur in text (<pad>, <bos>, <eos>)
        get no share of the smoothing, so generation never stops at an <eos> the model never
        saw. Not 0: a forced excluded token (Infill's candidates) would zero the filter."""
        if not excluded:
            return self
        b = self.b.clone()
        b[:, list(excluded)] = 0.0
        b = b / b.sum(1, keepdim=True) * (1.0 - EXCLUDED_PROB * len(excluded))
        b[:, list(excluded)] = EXCLUDED_PROB
        return HmmParams(self.pi, self.a, b)

    @classmethod
    def random(cls, states: int, vocab_size: int, unigram: torch.Tensor, seed: int) -> HmmParams:
        """Peaked random transitions, emissions = the unigram distribution perturbed per state.

        Why peaked: near-uniform transitions make the states exchangeable in time, and EM then
        spends many iterations as a mixture of unigrams before it finds temporal structure.
        """
        gen = torch.Generator().manual_seed(seed)
        k, v = states, vocab_size
        pi = torch.full((k,), 1.0 / k, dtype=torch.float64)
        a = torch.softmax(torch.randn(k, k, generator=gen, dtype=torch.float64), dim=1)
        noise = torch.randn(k, v, generator=gen, dtype=torch.float64).exp()
        b = (unigram[None, :] + 1e-3) * noise
        return cls(pi, a, b / b.sum(1, keepdim=True))


# Emission probability of an id that never occurs in text: ~1e-12 a step, never sampled in
# practice, yet finite after log() and float32 (the n-gram's equivalent is NEVER_LOGPROB).
EXCLUDED_PROB = 1e-12


@dataclass
class FitHistory:
    """Mean log-likelihood per id, measured before each update (and once at the end)."""

    log_likelihood_per_token: list[float] = field(default_factory=list)


# Entries of each [rows, chunk, K] float64 tensor of one forward-backward pass (64 MiB): a
# pass holds about a dozen, so EM's memory is bounded whatever the corpus size (all chunks of
# a 40 MB char corpus in one pass needed ~25 GB at K = 16).
PASS_ENTRIES = 2**23


def passes(batches: Sequence[torch.Tensor], states: int) -> list[torch.Tensor]:
    """The batches [N, T] cut into groups of rows whose [rows, T, K] tensors hold at most
    PASS_ENTRIES entries; the chunks are independent, so sums over the groups are the same."""
    return [
        part
        for x in batches
        for part in x.split(max(1, PASS_ENTRIES // max(1, x.shape[1] * states)))
    ]


def chunk_ids(ids: Sequence[int], chunk: int) -> list[torch.Tensor]:
    """[N, chunk] of the whole chunks, plus a [1, rest] batch for the tail if any."""
    x = torch.as_tensor(list(ids), dtype=torch.int64)
    whole = len(x) // chunk
    batches = [x[: whole * chunk].view(whole, chunk)] if whole else []
    if len(x) % chunk:
        batches.append(x[whole * chunk :].view(1, -1))
    return batches


def unigram(ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    counts = torch.bincount(torch.as_tensor(list(ids), dtype=torch.int64), minlength=vocab_size)
    return counts.double() / max(1, len(ids))


def em_step(
    params: HmmParams,
    batches: list[torch.Tensor],
    pseudocount: float,
    excluded: Sequence[int] = (),
) -> tuple[HmmParams, float]:
    """One Baum-Welch update; returns the new params and the total log-likelihood before it."""
    k, v = params.b.shape
    pi_c = torch.zeros(k, dtype=torch.float64)
    a_c = torch.zeros(k, k, dtype=torch.float64)
    b_c = torch.zeros(v, k, dtype=torch.float64)
    total = 0.0
    for x in passes(batches, k):
        gamma, beta, fwd = posterior(params.pi, params.a, params.b, x)  # [N, T, K] each
        total += float(fwd.log_likelihood.sum())
        pi_c += gamma[:, 0].sum(0)
        if x.shape[1] > 1:
            lhs = fwd.alpha[:, :-1].reshape(-1, k)  # alpha_hat_t [N(T-1), K]
            e = emissions(params.b, x)[:, 1:]  # B[:, x_{t+1}] [N, T-1, K]
            rhs = (e * beta[:, 1:] / fwd.scale[:, 1:, None]).reshape(-1, k)
            a_c += params.a * (lhs.t() @ rhs)  # expected transitions xi, summed
        b_c.index_add_(0, x.reshape(-1), gamma.reshape(-1, k))
    pi_c, a_c, b_c = pi_c + pseudocount, a_c + pseudocount, b_c.t() + pseudocount
    new = HmmParams(
        pi_c / pi_c.sum(), a_c / a_c.sum(1, keepdim=True), b_c / b_c.sum(1, keepdim=True)
    )
    return new.excluding(excluded), total


def log_likelihood(params: HmmParams, batches: list[torch.Tensor]) -> float:
    """Total log-likelihood of the chunks (scaled forward recursion)."""
    with torch.no_grad():
        return sum(
            float(posterior(params.pi, params.a, params.b, x)[2].log_likelihood.sum())
            for x in passes(batches, params.pi.shape[0])
        )


def fit_em(
    params: HmmParams,
    batches: list[torch.Tensor],
    epochs: int,
    pseudocount: float = 1e-3,
    on_epoch: Callable[[float], None] | None = None,
    excluded: Sequence[int] = (),
) -> tuple[HmmParams, FitHistory]:
    """Baum-Welch for `epochs` iterations."""
    tokens = sum(x.numel() for x in batches)
    history = FitHistory()
    with torch.no_grad():
        for _ in range(epochs):
            params, total = em_step(params, batches, pseudocount, excluded)
            history.log_likelihood_per_token.append(total / tokens)
            if on_epoch:
                on_epoch(total / tokens)
        history.log_likelihood_per_token.append(log_likelihood(params, batches) / tokens)
    return params, history


def fit_gradient(
    params: HmmParams,
    batches: list[torch.Tensor],
    epochs: int,
    lr: float = 0.05,
    batch_chunks: int = 32,
    seed: int = 0,
    on_epoch: Callable[[float], None] | None = None,
    excluded: Sequence[int] = (),
) -> tuple[HmmParams, FitHistory]:
    """Adam on -log p(x) = -sum log c_t by the scaled forward recursion; softmax keeps rows
    normalised. Not the log-space one (same gradient): its logsumexp makes an [n, K, K] tensor
    a step and backward keeps them all, 20 GB for 32 chunks of 200 at K = 512; the scaled
    recursion keeps [n, K] a step. Excluded ids never occur, so the likelihood only pushes
    their emissions down; the result gets their floor (`HmmParams.excluding`)."""
    logits = [torch.nn.Parameter(t.log().clone()) for t in (params.pi, params.a, params.b)]
    opt = torch.optim.Adam(logits, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(x.numel() for x in batches)
    history = FitHistory()

    def current() -> HmmParams:
        pi, a, b = (torch.softmax(p.detach(), dim=-1) for p in logits)
        return HmmParams(pi, a, b)

    for _ in range(epochs):
        total = 0.0
        for x in batches:
            order = torch.randperm(x.shape[0], generator=gen)
            for start in range(0, x.shape[0], batch_chunks):
                xb = x[order[start : start + batch_chunks]]  # [n, T]
                pi, a, b = (torch.softmax(p, dim=-1) for p in logits)
                ll = forward_scaled(pi, a, b, xb).log_likelihood.sum()
                opt.zero_grad()
                (-ll / xb.numel()).backward()
                opt.step()
                total += ll.item()
        if not math.isfinite(total):
            break
        history.log_likelihood_per_token.append(total / tokens)
        if on_epoch:
            on_epoch(total / tokens)
    final = current().excluding(excluded)
    history.log_likelihood_per_token.append(log_likelihood(final, batches) / tokens)
    return final, history
