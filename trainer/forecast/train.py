"""Training a forecaster on the training range: random subsequences, MSE loss, Adam.

Every epoch draws subsequences of warmup + num_steps + 1 values at random starts in the
training range, enough to score every target about once, and splits them into minibatches
(random sampling: the state starts from its initial value in every subsequence). The first
`warmup` predictions only fill the state (the MLP's window, the RNN's h) and are not scored;
the next num_steps are scored by MSE against the next true value (teacher forcing). With
`rollout` > 0 the last `rollout` inputs of each subsequence are the model's own predictions
instead, so the loss also teaches it to forecast from its own output, as k-step prediction
does; on the textbook series this is what lets the GRU beat AR(tau) at k = 16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from trainer.errors import TrainerError
from trainer.forecast.models import build_model
from trainer.forecast.series import Series
from trainer.train import resolve_device


@dataclass
class ForecastTrainConfig:
    """Hyper-parameters of one forecasting run (filled by cli.py or zoo.py)."""

    arch: str = "gru"
    tau: int = 4  # the MLP's window; also the AR baseline's order
    hidden: int = 16
    layers: int = 1
    epochs: int = 300
    batch_size: int = 16
    num_steps: int = 100  # scored predictions per subsequence
    warmup: int | None = None  # unscored steps first; None: tau - 1 (mlp) or 16 (recurrent)
    rollout: int = 16  # scored steps (at the end) fed with the model's own predictions
    lr: float = 0.01
    clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda

    def resolved_warmup(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return self.tau - 1 if self.arch == "mlp" else 16

    def to_dict(self) -> dict:
        return asdict(self)


def _subsequences(
    train: np.ndarray, length: int, steps: int, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Windows of `length` values at random starts: [n, length].

    n covers every target about once (len / steps), and is at least one full minibatch."""
    count = max(batch_size, -(-(len(train) - length + steps) // steps))
    starts = rng.integers(0, len(train) - length + 1, size=count)
    return np.stack([train[s : s + length] for s in starts])


def _loss(model: nn.Module, batch: torch.Tensor, warmup: int, rollout: int) -> torch.Tensor:
    """MSE of the scored predictions of one minibatch batch [b, warmup + steps + 1]."""
    inputs = batch[:, :-1, None]  # [b, time, 1]
    teacher = inputs.shape[1] - rollout
    state = model.initial_state(batch.shape[0])
    state = [s.to(batch.device) for s in state]
    pred, *state = model(inputs[:, :teacher], *state)  # [b, teacher, 1]
    preds = [pred]
    for _ in range(rollout):  # free-running tail: feed back the last prediction
        step, *state = model(preds[-1][:, -1:], *state)  # [b, 1, 1]
        preds.append(step)
    pred = torch.cat(preds, dim=1)[:, warmup:, 0]  # [b, steps]
    return nn.functional.mse_loss(pred, batch[:, warmup + 1 :])


def train_forecaster(
    config: ForecastTrainConfig, series: Series, progress: bool = False
) -> tuple[nn.Module, list[float]]:
    """Train config.arch on series' training range; returns the model (eval mode, on CPU)
    and the mean training loss of every epoch.

    Runs torch on one CPU thread: these models are tiny, and more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, series, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    config: ForecastTrainConfig, series: Series, progress: bool
) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_model(config.arch, tau=config.tau, hidden=config.hidden, layers=config.layers)
    warmup = config.resolved_warmup()
    steps = config.num_steps
    if steps < 1 or config.epochs < 1 or config.batch_size < 1:
        raise TrainerError("--num-steps, --epochs and --batch-size must be at least 1")
    if not 0 <= config.rollout <= steps or config.rollout >= warmup + steps:
        raise TrainerError(
            f"rollout must be between 0 and --num-steps ({steps}), below warm-up + steps"
        )
    length = warmup + steps + 1
    train = series.normalised[: series.num_train]
    if length > len(train):
        raise TrainerError(
            f"a training subsequence needs {length} values (warm-up {warmup} + --num-steps "
            f"{steps} + 1) but the training range has {len(train)}: lower --num-steps"
        )
    device = resolve_device(config.device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[float] = []
    for epoch in range(config.epochs):
        windows = _subsequences(train, length, steps, config.batch_size, rng)
        data = torch.as_tensor(windows, device=device)  # [n, length]
        total, batches = 0.0, 0
        for i in range(0, len(data), config.batch_size):
            loss = _loss(model, data[i : i + config.batch_size], warmup, config.rollout)
            optimizer.zero_grad()
            loss.backward()
            if config.clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / batches)
        if not math.isfinite(history[-1]):
            raise TrainerError(f"training diverged at epoch {epoch + 1}: lower --lr or set --clip")
        if progress and (epoch + 1) % max(1, config.epochs // 10) == 0:
            print(f"epoch {epoch + 1}/{config.epochs}  train mse {history[-1]:.4f}", flush=True)
    return model.cpu().eval(), history
