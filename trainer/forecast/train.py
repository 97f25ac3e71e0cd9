"""Training a forecaster on the training range: random subsequences, MSE loss, Adam.

Every epoch draws subsequences of warmup + num_steps + 1 values at random starts in the
training range, enough to score every target about once (and at least one minibatch), and
splits them into minibatches (random sampling: the state starts from its initial value in
every subsequence). The first `warmup` predictions only fill the state (the MLP's window,
the RNN's h) and are not scored.

The loss has two terms: the one-step MSE of the next num_steps predictions with true inputs
(teacher forcing), plus, with `rollout` H > 1, the mean MSE of the 2..H-step predictions
made from origins every ORIGIN_STRIDE steps by feeding the model its own predictions, just
as k-step forecasting does. The second term is what lets the GRU beat AR(tau) at k = 16 on
the textbook series (docs/forecasting.md); trained on one-step errors alone, the recurrent
models drift when fed their own output. The learning rate follows a cosine decay.

With a validation tail (series.held_out == "validation") the run stops early on the tail's
k-step error and keeps the best weights; then, with `refit`, a short pass (a tenth of the
best epochs, at the final learning rate) over the whole series lets the newest values,
the tail itself, train the model too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.models import build_model
from rnnserve.trainer.forecast.series import Series
from rnnserve.trainer.train import resolve_device
from rnnserve.trainer.wording import plural

ORIGIN_STRIDE = 8  # steps between rollout origins in a training subsequence
AUTO_STEPS = 100  # --num-steps when not given: this, or what a short series allows
CHECKS_PER_RUN = 50  # validation checks over a full run (early stopping)
REFIT_FRACTION = 0.1  # refit epochs on the whole series, as a fraction of the best epochs


@dataclass
class ForecastTrainConfig:
    """Hyper-parameters of one forecasting run (filled by cli.py or zoo.py)."""

    arch: str = "gru"
    tau: int = 4  # the MLP's window; also the AR baseline's order
    hidden: int = 32
    layers: int = 1
    epochs: int = 300
    batch_size: int = 64
    num_steps: int | None = 100  # scored predictions per subsequence; None: up to 100
    warmup: int | None = None  # unscored steps first; None: tau - 1 (mlp) or 16 (recurrent)
    rollout: int = 32  # horizon H of the multi-step loss (0 or 1: one-step loss only)
    lr: float = 0.01
    min_lr_ratio: float = 0.05  # cosine schedule ends at lr * min_lr_ratio (1: constant)
    clip: float | None = 1.0
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda
    patience: int = 10  # validation checks without improvement before stopping (0: never)
    refit: bool = True  # after early stopping, a short pass over the whole series
    val_horizon: int = 16  # the validation score averages k-step MSE over k = 1..this

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:  # 0 never trains; inf or NaN trains NaN weights
            raise TrainerError(f"--lr must be a positive finite number, got {self.lr}")

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


def _cat_states(states: list[list[torch.Tensor]], axes: list[int]) -> list[torch.Tensor]:
    """Stacks per-origin states along each tensor's batch axis."""
    return [torch.cat([st[i] for st in states], dim=ax) for i, ax in enumerate(axes)]


def _loss(model: nn.Module, batch: torch.Tensor, warmup: int, rollout: int) -> torch.Tensor:
    """Teacher-forced one-step MSE plus, with rollout H > 1, the mean MSE of 2..H-step
    predictions fed back from origins every ORIGIN_STRIDE steps. batch [b, warmup+steps+1]."""
    inputs = batch[:, :-1, None]  # [b, n, 1]
    n = inputs.shape[1]
    origins = list(range(warmup, n - rollout + 1, ORIGIN_STRIDE)) if rollout > 1 else []
    state = [s.to(batch.device) for s in model.initial_state(batch.shape[0])]
    preds, saved, start = [], [], 0
    for end in [o + 1 for o in origins] + [n]:  # teacher pass, cut after every origin
        if end > start:
            pred, *state = model(inputs[:, start:end], *state)  # [b, end - start, 1]
            preds.append(pred)
            saved.append(list(state))
        start = end
    pred = torch.cat(preds, dim=1)  # [b, n, 1]
    loss = nn.functional.mse_loss(pred[:, warmup:, 0], batch[:, warmup + 1 :])
    if not origins:
        return loss
    axes = [spec.batch_axis for spec in model.state_specs()]
    state = _cat_states(saved[: len(origins)], axes)
    step = torch.cat([pred[:, o : o + 1] for o in origins], dim=0)  # [m*b, 1, 1]
    errors = []
    for j in range(2, rollout + 1):  # all origins as one batch, fed their own predictions
        step, *state = model(step, *state)
        want = torch.cat([batch[:, o + j] for o in origins], dim=0)  # [m*b]
        errors.append(step[:, 0, 0] - want)
    return loss + torch.stack(errors).pow(2).mean()


@dataclass
class TrainedForecaster:
    """A trained model (eval mode, on CPU), its per-epoch training losses and its best
    validation score (mean squared k-step error on the tail, series units; inf without a
    validation tail), which select.py compares across representations."""

    model: nn.Module
    history: list[float]
    val_score: float = math.inf


def train_forecaster(
    config: ForecastTrainConfig, series: Series, progress: bool = False
) -> tuple[nn.Module, list[float]]:
    """Train config.arch on series' training range; returns the model (eval mode, on CPU)
    and the mean training loss of every epoch."""
    trained = fit_forecaster(config, series, progress)
    return trained.model, trained.history


def fit_forecaster(
    config: ForecastTrainConfig, series: Series, progress: bool = False
) -> TrainedForecaster:
    """train_forecaster, keeping the validation score of the weights the tail chose.

    Runs torch on one CPU thread: these models are tiny, and more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        validate = series.held_out == "validation"
        model, history, best, score = _train(config, series, progress, series.num_train, validate)
        if validate and config.refit and best >= 0:
            # the tail chose the weights; a short pass at the final learning rate lets the
            # newest values (the tail itself) train the model too
            epochs = max(1, round((best + 1) * REFIT_FRACTION))
            if progress:
                print(f"refit on all {len(series.values)} values for {plural(epochs, 'epoch')}")
            again = replace(config, epochs=epochs, lr=config.lr * config.min_lr_ratio,
                            min_lr_ratio=1.0)  # fmt: skip
            model, more, *_ = _train(again, series, progress, len(series.values), False, model)
            history += more
        return TrainedForecaster(model, history, score)
    finally:
        torch.set_num_threads(threads)


def auto_num_steps(config: ForecastTrainConfig, series: Series, end: int | None = None) -> int:
    """--num-steps when not given: as long as the training range values[:end] (default: the
    training part) allows after the warm-up, at most AUTO_STEPS."""
    end = series.num_train if end is None else end
    usable = end - series.representation.lost  # the values a window can start in
    return max(1, min(AUTO_STEPS, usable - config.resolved_warmup() - 1))


def _train(
    config: ForecastTrainConfig,
    series: Series,
    progress: bool,
    end: int,
    validate: bool,
    model: nn.Module | None = None,
) -> tuple[nn.Module, list[float], int, float]:
    """One training run on series values[:end] (from `model`'s weights when given); with
    `validate`, early stopping on the tail, restoring the best weights.
    Returns (model, losses, best epoch or -1, best validation score or inf)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if model is None:
        model = build_model(config.arch, tau=config.tau, hidden=config.hidden, layers=config.layers)
    warmup = config.resolved_warmup()
    lost = series.representation.lost
    train = series.normalised[lost:end]
    steps = config.num_steps
    if steps is None:
        steps = auto_num_steps(config, series, end)
    # the default rollout fits the automatic windows; the CLI refuses a --rollout the user
    # gave above them (forecast/cli.py), so only a library caller's is cut here
    rollout = min(config.rollout, steps) if config.num_steps is None else config.rollout
    if steps < 1 or config.epochs < 1 or config.batch_size < 1:
        raise TrainerError("--num-steps, --epochs and --batch-size must be at least 1")
    if warmup < 0:  # a negative warm-up slices the windows wrongly (torch fails or misscores)
        raise TrainerError(f"--warmup must be at least 0, got {warmup}")
    if config.patience < 0:  # 0 already means "never stop early"
        raise TrainerError(f"--patience must be at least 0 (0 = off), got {config.patience}")
    if not 0 <= rollout <= steps:
        raise TrainerError(f"--rollout must be between 0 and --num-steps ({steps})")
    length = warmup + steps + 1
    if length > len(train):
        # with --num-steps auto (already as short as it goes) only the warm-up can shrink
        fix = "lower --num-steps" if config.num_steps is not None else "lower --warmup"
        raise TrainerError(
            f"a training subsequence needs {length} values (warm-up {warmup} + --num-steps "
            f"{steps} + 1) but the training range has {len(train)}: {fix}"
        )
    device = resolve_device(config.device)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    # cosine decay to lr * min_lr_ratio: noisy targets make the last constant-lr steps wander
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs, eta_min=config.lr * config.min_lr_ratio
    )
    history: list[float] = []
    stopper = EarlyStopping(series, config) if validate else None
    for epoch in range(config.epochs):
        windows = _subsequences(train, length, steps, config.batch_size, rng)
        data = torch.as_tensor(windows, device=device)  # [n, length]
        total, batches = 0.0, 0
        for i in range(0, len(data), config.batch_size):
            loss = _loss(model, data[i : i + config.batch_size], warmup, rollout)
            optimizer.zero_grad()
            loss.backward()
            if config.clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        schedule.step()
        history.append(total / batches)
        if not math.isfinite(history[-1]):
            raise TrainerError(f"training diverged at epoch {epoch + 1}: lower --lr or set --clip")
        if progress and (epoch + 1) % max(1, config.epochs // 10) == 0:
            print(f"epoch {epoch + 1}/{config.epochs}  train mse {history[-1]:.4f}", flush=True)
        if stopper is not None and stopper.should_stop(model, epoch):
            break
    if stopper is not None:
        stopper.restore(model)
        if progress:
            print(f"best validation at epoch {stopper.best_epoch + 1} (score {stopper.best:.4g})")
    if stopper is None:
        return model.cpu().eval(), history, -1, math.inf
    return model.cpu().eval(), history, stopper.best_epoch, stopper.best


class EarlyStopping:
    """Scores the model on the validation tail every `every` epochs and keeps the best
    weights; stops after `patience` checks without improvement.

    The score is the mean squared k-step error, k = 1..val_horizon, over the tail's targets,
    in the series' units: what forecasting does, not the training loss."""

    def __init__(self, series: Series, config: ForecastTrainConfig) -> None:
        self.series = series
        self.patience = config.patience
        self.every = max(1, config.epochs // CHECKS_PER_RUN)
        self.k_max = max(1, config.val_horizon)
        self.best = math.inf
        self.best_epoch = -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0

    def score(self, model: nn.Module) -> float:
        from rnnserve.trainer.forecast.evaluate import LevelForecaster, TorchForecaster

        series = self.series
        predictor = LevelForecaster(TorchForecaster(model), series)
        first = max(predictor.tau - 1, series.num_train - self.k_max)
        origins = np.arange(first, len(series.values) - 1)
        preds = predictor.k_step(series.values.astype(np.float64), origins, self.k_max)
        targets = origins[:, None] + np.arange(1, self.k_max + 1)[None, :]
        keep = (targets >= series.num_train) & (targets < len(series.values))
        truth = series.values[np.minimum(targets, len(series.values) - 1)]
        return float(np.mean(((preds - truth) ** 2)[keep]))

    def should_stop(self, model: nn.Module, epoch: int) -> bool:
        if (epoch + 1) % self.every:
            return False
        value = self.score(model)
        model.train()
        if not math.isfinite(value):
            value = math.inf  # forecasts that overflow the series' units never win
        if value < self.best:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.stale += 1
        return 0 < self.patience <= self.stale

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
