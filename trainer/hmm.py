"""Hidden Markov model language model, exportable through the common state interface.

State semantics (the graph's `alpha` float32 [batch, K]): the normalised forward
probability of the hidden state that will emit the NEXT token, p(z_{t+1} | x_<=t).
Before any token it is p(z_0) = pi, so the initial state is exactly pi and the first token's
distribution pi @ B is available without a fictitious start token. One step with token x_t:

    f = alpha * B[:, x_t]; f /= f.sum()      # filtering p(z_t | x_<=t)
    alpha' = f @ A                           # predictive p(z_{t+1} | x_<=t)
    logits[t] = log(alpha' @ B)              # log p(x_{t+1} | x_<=t), normalised

The time recursion is a real ONNX Loop: `onnx_module()` returns the step loop compiled with
torch.jit.script, which the legacy exporter turns into Loop + ConcatFromSequence with
symbolic batch and time axes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rnnserve.artifact.manifest import StateSpec
from rnnserve.artifact.vocab import NOT_TEXT_IDS
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.hmm_fit import HmmParams, chunk_ids, fit_em, fit_gradient, unigram
from rnnserve.trainer.hmm_recursions import infill_posterior

METHODS = ("em", "gradient")
SCREEN_EPOCHS = 3


@contextmanager
def single_thread() -> Iterator[None]:
    """Runs torch on one thread, then restores the setting.

    Why: the recursions are thousands of tiny [batch, K] products; intra-op threads only add
    synchronisation, which measured 5x slower on a loaded 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# float32 weights an exported graph can hold: protobuf refuses a message of 2 GB or more,
# so a larger HMM would fail only at export, after training (or first allocate ~80 GB)
MAX_GRAPH_FLOATS = 2**29 - 2**20


@dataclass(frozen=True)
class HmmConfig:
    """How the HMM was trained; stored in the manifest's hyper-parameters."""

    states: int
    vocab_size: int
    method: str = "em"
    epochs: int = 20
    seed: int = 0
    chunk: int = 200
    pseudocount: float = 1e-3
    lr: float = 0.05
    restarts: int = 1  # random initialisations, screened by SCREEN_EPOCHS of EM each
    excluded: tuple[int, ...] = ()  # ids that never occur in text: emission EXCLUDED_PROB

    def __post_init__(self) -> None:
        object.__setattr__(self, "excluded", tuple(sorted(set(self.excluded))))  # JSON: a list

    def validate(self) -> None:
        if self.states < 1:
            raise TrainerError(f"HMM needs at least 1 hidden state, got --states {self.states}")
        if self.vocab_size < 1:
            raise TrainerError(f"vocabulary size must be >= 1, got {self.vocab_size}")
        if self.method not in METHODS:
            raise TrainerError(f"HMM method must be one of {METHODS}, got {self.method!r}")
        if self.epochs < 0 or self.chunk < 1:
            raise TrainerError("HMM epochs must be >= 0 and chunk >= 1")
        # `not x > 0` also refuses NaN, which would pass `x < 0` and surface only after
        # training as "diverged" (pseudocount) or as torch's ValueError (lr). A pseudocount of
        # 0 gives symbols the text lacks probability 0: a state's forward vector then sums to
        # 0 and the exported graph's logits turn NaN (pure EM stays in hmm_fit for tests).
        finite = math.isfinite(self.pseudocount) and math.isfinite(self.lr)
        if not (finite and self.pseudocount > 0 and self.lr > 0 and self.restarts >= 1):
            raise TrainerError(
                "HMM pseudocount must be a finite number > 0, lr a finite number > 0 and "
                f"restarts >= 1, got {self.pseudocount}, {self.lr} and {self.restarts}"
            )
        if (
            any(not 0 <= i < self.vocab_size for i in self.excluded)
            or len(self.excluded) >= self.vocab_size
        ):
            raise TrainerError(f"excluded ids {self.excluded} must leave some of the vocabulary")
        weights = self.states**2 + 2 * self.states * self.vocab_size  # A, B and B^T, float32
        if weights > MAX_GRAPH_FLOATS:
            raise TrainerError(
                f"an HMM of {self.states:,} states over {self.vocab_size:,} tokens has "
                f"{weights:,} weights, past the {MAX_GRAPH_FLOATS:,} an ONNX graph holds "
                "(protobuf's 2 GB); lower --states, or raise --min-freq for a smaller vocabulary"
            )


class HmmLoop(nn.Module):
    """The step loop over time; scripted for export so time stays symbolic."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)  # [K, K]
        self.register_buffer("b", b)  # [K, V]
        self.register_buffer("bt", b.t().contiguous())  # [V, K]

    def forward(
        self, tokens: torch.Tensor, alpha: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outs: list[torch.Tensor] = []
        p = alpha  # [batch, K] predictive p(z_t | x_<t)
        for t in range(tokens.size(1)):
            f = p * self.bt[tokens[:, t]]  # [batch, K] joint with x_t
            f = f / f.sum(dim=1, keepdim=True)  # filtering p(z_t | x_<=t)
            p = f @ self.a  # predictive p(z_{t+1} | x_<=t)
            outs.append(torch.log(p @ self.b))  # [batch, V]
        if len(outs) == 0:
            return torch.zeros(tokens.size(0), 0, self.b.size(1)), p
        return torch.stack(outs, dim=1), p  # [batch, time, V], [batch, K]


class HmmLM(nn.Module):
    """Exportable HMM LM: tokens int64 [batch, time], alpha float32 [batch, K]."""

    task = "lm"
    arch = "hmm"
    input_name = "tokens"
    output_name = "logits"

    def __init__(self, params: HmmParams, config: HmmConfig) -> None:
        super().__init__()
        config.validate()
        k, v = config.states, config.vocab_size
        if params.pi.shape != (k,) or params.a.shape != (k, k) or params.b.shape != (k, v):
            raise TrainerError(f"HMM parameter shapes do not match K={k}, V={v}")
        self.config = config
        self.register_buffer("pi", params.pi.float())  # [K]
        self.loop = HmmLoop(params.a.float(), params.b.float())

    @property
    def params(self) -> HmmParams:
        return HmmParams(self.pi.double(), self.loop.a.double(), self.loop.b.double())

    def hyperparameters(self) -> dict[str, Any]:
        return {**asdict(self.config), "state": "alpha = p(z_{t+1} | x_<=t), init pi"}

    def state_specs(self) -> list[StateSpec]:
        return [
            StateSpec(
                name="alpha",
                input="alpha",
                output="alpha_out",
                shape=[-1, self.config.states],
                batch_axis=0,
                dtype="float32",
                init=[float(p) for p in self.pi],
            )
        ]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (self.pi.expand(batch_size, -1).clone(),)  # [batch, K]

    def forward(self, tokens: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.loop(tokens, alpha)

    def onnx_module(self) -> torch.nn.Module:
        return torch.jit.script(HmmLoop(self.loop.a, self.loop.b))

    def first_token_log_probs(self) -> torch.Tensor:
        """log p(x_0) [V], the distribution before any token."""
        return torch.log(self.pi @ self.loop.b)

    def start_log_probs(self) -> list[float]:
        """log(pi @ B) [V], for the manifest: the graph's outputs all follow a fed token, yet
        Infill with an empty left needs the first token's distribution as the prior."""
        return [float(v) for v in self.first_token_log_probs()]

    @torch.no_grad()
    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean NLL) of every id, the first scored from pi (chunking is not applied).

        The graph's recursion, scoring only the observed id: log p(x_t | x_<t) =
        log(alpha_t . B[:, x_t]). Why not the graph's forward: its logits are [len(ids), V]
        (400 GB for a word-level split of 700k ids at V = 140k) and each of its steps costs
        K x V; this costs K per step, in float64 on the model's own (float32) numbers."""
        if len(ids) < 1:
            raise TrainerError("cannot measure perplexity on an empty sequence")
        _check_ids(ids, self.config.vocab_size)
        p = self.params
        a, bt, alpha = p.a.numpy(), p.b.t().contiguous().numpy(), p.pi.numpy()
        scales = np.empty(len(ids))  # p(x_t | x_<t)
        for t, token in enumerate(ids):
            joint = alpha * bt[token]  # p(z_t, x_t | x_<t) [K]
            scales[t] = joint.sum()
            alpha = (joint / scales[t]) @ a  # p(z_{t+1} | x_<=t)
        return math.exp(-float(np.log(scales).sum()) / len(ids))

    @torch.no_grad()
    def posterior_blank(self, left_ids: Sequence[int], right_ids: Sequence[int]) -> np.ndarray:
        """p(x_t = v | left, right) [V] by forward-backward (left starts from pi)."""
        _check_ids([*left_ids, *right_ids], self.config.vocab_size)
        p = self.params
        left = torch.as_tensor(list(left_ids), dtype=torch.int64)
        right = torch.as_tensor(list(right_ids), dtype=torch.int64)
        return infill_posterior(p.pi, p.a, p.b, left, right).numpy()


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise TrainerError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def _best_start(ids: list[int], batches: list[torch.Tensor], config: HmmConfig) -> HmmParams:
    """The initialisation to train: the best of `config.restarts` after a short EM screen."""
    uni = unigram(ids, config.vocab_size)
    starts = [
        HmmParams.random(config.states, config.vocab_size, uni, config.seed + i).excluding(
            config.excluded
        )
        for i in range(config.restarts)
    ]
    if len(starts) == 1:
        return starts[0]
    screened = [
        fit_em(p, batches, SCREEN_EPOCHS, config.pseudocount, excluded=config.excluded)[1]
        for p in starts
    ]
    scores = [h.log_likelihood_per_token[-1] for h in screened]
    return starts[max(range(len(starts)), key=lambda i: scores[i])]


def train_hmm(
    ids: list[int],
    vocab_size: int,
    states: int = 16,
    method: str = "em",
    epochs: int = 20,
    seed: int = 0,
    progress: bool = True,
    excluded: tuple[int, ...] = NOT_TEXT_IDS,
    **options: Any,
) -> HmmLM:
    """Trains a K-state HMM on `ids` by EM or gradient.

    options: chunk, pseudocount, lr, restarts. EM only finds a local optimum; with
    restarts = R, R random initialisations (seeds seed..seed+R-1) each get SCREEN_EPOCHS EM
    iterations and the one with the highest likelihood is trained for `epochs`. `excluded`:
    ids that never occur in text (default <pad>, <bos>, <eos> of a project vocabulary; pass
    () for raw ids), emitted with probability EXCLUDED_PROB only, as the n-gram gives them 0.
    """
    config = HmmConfig(states, vocab_size, method, epochs, seed, excluded=excluded, **options)
    config.validate()
    if len(ids) < 2:
        raise TrainerError(f"the HMM needs at least 2 tokens to train on, got {len(ids)}")
    _check_ids(ids, vocab_size)
    excluded = set(config.excluded)  # built once: a 40 MB corpus has 40M ids
    seen = next((i for i in ids if i in excluded), None)
    if seen is not None:
        raise TrainerError(f"token id {seen} is excluded (never text) but the text has it")
    batches = chunk_ids(ids, config.chunk)
    with single_thread():
        return _train(ids, batches, config, progress)


def _train(ids: list[int], batches: list[torch.Tensor], config: HmmConfig, progress: bool) -> HmmLM:
    """The training loop behind train_hmm (inputs already validated)."""
    method, epochs, states, seed = config.method, config.epochs, config.states, config.seed
    params = _best_start(ids, batches, config)
    bar = tqdm(total=epochs, desc=f"hmm-{method} K={states}", disable=not progress, unit="epoch")

    def on_epoch(ll: float) -> None:
        bar.update(1)
        bar.set_postfix(ppl=f"{math.exp(-ll):.3f}")

    try:
        if method == "em":
            params, history = fit_em(
                params, batches, epochs, config.pseudocount, on_epoch, config.excluded
            )
        else:
            params, history = fit_gradient(
                params, batches, epochs, config.lr, seed=seed, on_epoch=on_epoch,
                excluded=config.excluded,
            )  # fmt: skip
    finally:
        bar.close()
    final = history.log_likelihood_per_token[-1]
    if not math.isfinite(final):
        raise TrainerError(f"HMM training ({method}) diverged: log-likelihood became {final}")
    model = HmmLM(params, config)
    model.history = history
    return model
