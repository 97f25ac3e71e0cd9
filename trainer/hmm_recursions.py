"""Forward and backward recursions of a discrete HMM, in scaled form and in log space.

Notation: K hidden states, V symbols; pi [K], A [K, K] (A[i, j] = p(z_{t+1}=j | z_t=i)),
B [K, V] (B[i, v] = p(x_t=v | z_t=i)); a batch of N sequences x [N, T] (int64).

Scaled form (Rabiner 1989): alpha_hat_t = p(z_t | x_<=t) and c_t = p(x_t | x_<t), so
log p(x) = sum_t log c_t; beta_hat_t = p(x_>t | z_t) / p(x_>t | x_<=t) uses the same c_t,
and gamma_t = alpha_hat_t * beta_hat_t is the posterior p(z_t | x). Everything here is plain
torch on batched tensors, so it is differentiable (gradient training) and fast enough for EM
(one small matrix product per time step for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardResult:
    """Output of the scaled forward pass."""

    alpha: torch.Tensor  # [N, T, K] filtering distributions p(z_t | x_<=t)
    scale: torch.Tensor  # [N, T] c_t = p(x_t | x_<t)

    @property
    def log_likelihood(self) -> torch.Tensor:  # [N]
        return self.scale.log().sum(dim=1)


def emissions(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """B[:, x] laid out per position: [N, T, K]."""
    return b.t()[x]


def forward_scaled(pi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor):
    """Scaled forward recursion; returns ForwardResult."""
    e = emissions(b, x)  # [N, T, K]
    n, t_len, k = e.shape
    alphas, scales = [], []
    prior = pi.expand(n, k)  # p(z_0) for every sequence [N, K]
    for t in range(t_len):
        joint = prior * e[:, t]  # p(z_t, x_t | x_<t) [N, K]
        c = joint.sum(dim=1)  # [N]
        alpha = joint / c[:, None]
        alphas.append(alpha)
        scales.append(c)
        prior = alpha @ a  # p(z_{t+1} | x_<=t)
    return ForwardResult(torch.stack(alphas, 1), torch.stack(scales, 1))


def backward_scaled(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, scale: torch.Tensor):
    """Scaled backward recursion with the forward pass's c_t: beta_hat [N, T, K]."""
    e = emissions(b, x)  # [N, T, K]
    n, t_len, k = e.shape
    beta = torch.ones(n, k, dtype=a.dtype)
    betas = [beta]
    for t in range(t_len - 1, 0, -1):
        beta = ((e[:, t] * beta) @ a.t()) / scale[:, t, None]
        betas.append(beta)
    betas.reverse()
    return torch.stack(betas, 1)


def posterior(pi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor):
    """Forward-backward: gamma [N, T, K] = p(z_t | x), plus the forward result."""
    fwd = forward_scaled(pi, a, b, x)
    beta = backward_scaled(a, b, x, fwd.scale)
    gamma = fwd.alpha * beta
    return gamma / gamma.sum(dim=2, keepdim=True), beta, fwd


def forward_log(
    log_pi: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Log-space forward recursion (logsumexp); returns log p(x) per sequence [N]."""
    e = log_b.t()[x]  # [N, T, K]
    log_alpha = log_pi + e[:, 0]  # log p(z_0, x_0) [N, K]
    for t in range(1, e.shape[1]):
        log_alpha = torch.logsumexp(log_alpha[:, :, None] + log_a, dim=1) + e[:, t]
    return torch.logsumexp(log_alpha, dim=1)


def backward_log(log_a: torch.Tensor, log_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-space backward recursion: log beta_0 [N, K] = log p(x_>0 | z_0)."""
    e = log_b.t()[x]  # [N, T, K]
    n, t_len, k = e.shape
    log_beta = torch.zeros(n, k, dtype=log_a.dtype)
    for t in range(t_len - 1, 0, -1):
        log_beta = torch.logsumexp(log_a[None] + (e[:, t] + log_beta)[:, None, :], dim=2)
    return log_beta


def predictive(pi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, left: torch.Tensor):
    """p(z_t | x_<t) [K] after the 1-D prefix `left` (pi when it is empty)."""
    if left.numel() == 0:
        return pi
    fwd = forward_scaled(pi, a, b, left[None])
    return fwd.alpha[0, -1] @ a


def infill_posterior(
    pi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """p(x_t = v | left, right) [V] for a blank between the 1-D id tensors left and right.

    p(v | left, right) ∝ sum_z p(z_t | left) B[z, v] p(right | z_t = z), where
    p(right | z_t) = A @ (B[:, right_0] * beta_right_0) comes from the backward recursion.
    """
    prior = predictive(pi, a, b, left)  # [K]
    if right.numel() == 0:
        weight = torch.ones_like(prior)
    else:
        log_beta = backward_log(a.log(), b.log(), right[None])[0]  # log p(right_>0 | z) [K]
        log_first = b[:, right[0]].log() + log_beta  # log p(right | z_{t+1}) [K]
        shift = log_first.max()
        weight = a @ (log_first - shift).exp()  # ∝ p(right | z_t) [K]
    scores = (prior * weight) @ b  # [V]
    return scores / scores.sum()
