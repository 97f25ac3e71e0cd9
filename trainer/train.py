"""The training loop: minibatches, BPTT, clipping, perplexity per epoch.

Why a plain function over a model and id lists: the CLI, the zoo, the benchmark and the tests
all train the same way; they differ only in TrainConfig and what they do after each epoch.
Under a torchrun process group (distributed.joined) the same loop is data-parallel: each rank
trains its slice of every global batch through DDP and the epoch's numbers are summed over
ranks, so batch size, learning rate, clipping and perplexities mean what they mean in one
process.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from rnnserve.trainer.averaging import WeightAverage
from rnnserve.trainer.bptt import BPTT_MODES
from rnnserve.trainer.distributed import Cluster, current, window_runner
from rnnserve.trainer.early_stopping import EarlyStopping
from rnnserve.trainer.errors import AgreedError, TrainerError
from rnnserve.trainer.sampling import SAMPLINGS, batches, check_fits, detach_state, num_batches
from rnnserve.trainer.time_budget import (
    TimeBudget,
    decay_steps,
    further_epochs,
    scaled_average_from,
)
from rnnserve.trainer.wording import epoch_span, plural

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """Optimisation settings; filled by the CLI, stored in checkpoints and manifests."""

    epochs: int = 10
    num_steps: int = 32
    batch_size: int = 32
    lr: float = 0.01
    lr_decay: float = 1.0  # epoch e: lr * lr_decay ** (e - 1), stretched if the budget cuts
    optimizer: str = "adam"
    weight_decay: float = 0.0  # adam: decoupled (AdamW); sgd: L2 on the gradient; 0 = off
    clip: float = 1.0  # global gradient-norm bound; 0 disables clipping
    bptt: str = "full"
    bptt_k: int = 8  # chunk length for --bptt truncated
    bptt_p: float = 0.5  # keep probability for --bptt random
    sampling: str = "random"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # CPU intra-op threads; 0 keeps torch's default
    average_from: int = 0  # export the mean weights of epochs >= this one (SWA); 0 = off
    patience: int = 0  # early stopping after this many epochs without a better val ppl; 0 = off
    time_budget: float = 0.0  # seconds; no epoch starts that would not fit; 0 = off

    def validate(self) -> None:
        if self.epochs < 1:
            raise TrainerError("--epochs must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):  # inf: "loss became nan" at batch 2
            raise TrainerError(f"--lr must be positive and finite, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise TrainerError("--lr-decay must be in (0, 1]")
        # `not x >= 0` also refuses NaN, which `x < 0` lets through (NaN clip: silently off)
        if not self.clip >= 0:
            raise TrainerError("--clip must be >= 0 (0 disables clipping)")
        if not self.weight_decay >= 0:
            raise TrainerError("--weight-decay must be >= 0 (0 disables it)")
        if self.optimizer not in OPTIMIZERS:
            raise TrainerError(f"unknown optimizer {self.optimizer!r}; choose {OPTIMIZERS}")
        if self.bptt not in BPTT_MODES:
            raise TrainerError(f"unknown --bptt {self.bptt!r}; choose one of {BPTT_MODES}")
        # run_window refuses these too, but only at the first batch: after the corpus was
        # read and tokenized and the run dir made
        if self.bptt == "truncated" and self.bptt_k < 1:
            raise TrainerError(f"--bptt-k must be at least 1, got {self.bptt_k}")
        if self.bptt == "random" and not 0.0 < self.bptt_p <= 1.0:
            raise TrainerError(f"--bptt-p must be in (0, 1], got {self.bptt_p}")
        if self.threads < 0:
            raise TrainerError("--threads must be >= 0")
        if not 0 <= self.average_from <= self.epochs:
            raise TrainerError(
                f"--average-from must be in [0, --epochs = {self.epochs}] (0 = off), "
                f"got {self.average_from}"
            )
        if self.patience < 0:
            raise TrainerError("--patience must be >= 0 (0 = no early stopping)")
        if not self.time_budget >= 0:
            raise TrainerError("--time-budget must be >= 0 seconds (0 = no budget)")
        if self.sampling not in SAMPLINGS:
            raise TrainerError(f"unknown --sampling {self.sampling!r}; choose one of {SAMPLINGS}")


def ppl(mean_nll: float) -> float:
    """exp of the mean NLL, inf instead of an OverflowError for a diverged model."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainerError("--device cuda requested but CUDA is not available (try --device auto)")
    if name not in ("cpu", "cuda"):
        raise TrainerError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it (fp32 master weights and loss); fp32 on CPU."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW with --weight-decay: decay decoupled from the adaptive step (Loshchilov
    & Hutter), which Adam's L2 term would scale away; SGD takes the decay as plain L2."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def window_loss(model: Any, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor):
    """Mean NLL per token: lm predicts y (x shifted by one), infill predicts x itself."""
    target = x if model.task == "infill" else y
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@torch.no_grad()
def perplexity(
    model: Any, ids: list[int], device: torch.device, rows: int = 16, chunk: int = 256,
    cluster: Cluster | None = None,
) -> float:  # fmt: skip
    """exp(mean NLL): lm over tokens 2..n of each of `rows` contiguous rows (state carried);
    infill over every token of independent windows of `chunk` tokens. With a cluster each rank
    scores its share of the rows and the sums are reduced: the same number on every rank."""
    cluster = cluster or Cluster()
    model.eval()
    rows = max(1, min(rows, (len(ids) - 1) // 2))
    usable = ((len(ids) - 1) // rows) * rows
    mine = cluster.rows(rows)
    xs = torch.tensor(ids[:usable], device=device).reshape(rows, -1)[mine]  # [my rows, L]
    ys = torch.tensor(ids[1 : usable + 1], device=device).reshape(rows, -1)[mine]
    state = tuple(model.initial_state(xs.shape[0]))
    total, count = 0.0, 0
    # a rank with no rows (a world larger than `rows`) adds nothing; an empty batch's loss
    # would be NaN and make the sum NaN
    for i in range(0, xs.shape[1] if xs.shape[0] else 0, chunk):
        x, y = xs[:, i : i + chunk], ys[:, i : i + chunk]
        out, *rest = model(x, *state)
        state = tuple(rest)
        loss = window_loss(model, x, y, out)
        total += loss.item() * x.numel()
        count += x.numel()
    model.train()
    total, count = cluster.sum([total, count], device)
    return ppl(total / max(count, 1))


def fit(
    model: Any,
    train_ids: list[int],
    val_ids: list[int],
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    on_epoch: Callable[[dict, torch.optim.Optimizer], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    average: WeightAverage | None = None,
    stopper: EarlyStopping | None = None,
) -> list[dict]:
    """Trains for epochs start_epoch+1..cfg.epochs; returns one record per epoch.

    Under a process group every rank calls this alike (same cfg, ids, seed) and gets the same
    records; only the caller decides that rank 0 writes them.

    With cfg.average_from, the weights after each epoch from then on enter `average` (a
    fresh one unless a resumed run passes its own), and after the last epoch the model holds
    their mean: that record's val_ppl is the mean model's (val_ppl_last_weights: before).
    With cfg.patience the run ends after that many epochs without a better validation
    perplexity; with cfg.time_budget it ends when the next epoch would not fit (and averages
    the same fraction of the shorter run). Either way the last record is the model's: if the
    best epoch's weights beat it they are restored, with that epoch's train and val ppl
    (*_final_weights: before). A resumed run passes the checkpointed `stopper` (else its
    counters are replayed from `history`) and `average` (dropped if this run's --average-from
    is off or starts after the epochs it holds).
    """
    cfg.validate()
    _check_splits(train_ids, val_ids, cfg)
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        # small recurrent models: one thread is as fast alone and far faster on a busy machine
        torch.set_num_threads(cfg.threads)
    cluster = current()
    local_batch = cluster.local_batch(cfg.batch_size)
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model, cfg)
    history = list(history or [])
    vocab_size = model.hyperparameters()["vocab_size"]
    stateful = bool(model.state_specs())
    steps = num_batches(len(train_ids), cfg.batch_size, cfg.num_steps)
    average = average if average is not None else WeightAverage()
    mode = cfg.bptt if stateful else "full"
    window = window_runner(model, cluster, device, mode, cfg.bptt_k, cfg.bptt_p)
    if stopper is None:
        stopper = EarlyStopping(cfg.patience)
        stopper.replay(history)
    budget = TimeBudget(cfg.time_budget)
    last_epoch = cfg.epochs  # where the run is expected to end: the budget may cut it
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        budget.epoch_started()
        # resumable: depends on the epoch only; every rank draws the same windows and BPTT
        # cuts, while dropout masks differ per rank (as they differ per row in one process)
        rng = random.Random(cfg.seed * 1_000_003 + epoch)
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * cluster.world + cluster.rank)
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        for group in optimizer.param_groups:  # by the epoch (and the budget's expected end)
            group["lr"] = cfg.lr * cfg.lr_decay ** decay_steps(epoch, cfg.epochs, last_epoch)
            _apply_weight_decay(group, cfg)
        total, count = 0.0, 0
        state = tuple(model.initial_state(local_batch))
        mine = batches(
            train_ids, cfg.batch_size, cfg.num_steps, cfg.sampling, rng, cluster.rank, cluster.world
        )
        bar = tqdm(
            mine,
            total=steps,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            if cfg.sampling == "random" or not stateful:
                state = tuple(model.initial_state(x.shape[0]))
            else:
                state = detach_state(state)
            with mixed_precision(device):
                logits, state = window(x, state, gen)
                loss = window_loss(model, x, y, logits)
            # the global batch's mean loss: equal local batches, so the mean of rank means
            (mean_loss,) = cluster.sum([loss.item()], device)
            mean_loss /= cluster.world
            if not math.isfinite(mean_loss):
                raise AgreedError(
                    f"loss became {mean_loss} at epoch {epoch}, batch {step + 1}; "
                    "try a lower --lr or a --clip value"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:  # DDP has averaged the gradients: this is the global batch's norm
                norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
                if not math.isfinite(norm):  # clipping makes it NaN: the step would ruin the model
                    raise AgreedError(
                        f"the gradient norm became {norm} at epoch {epoch}, batch {step + 1} "
                        f"(loss {mean_loss:.4g}); --clip cannot bound a non-finite gradient: "
                        "try a lower --lr"
                    )
            optimizer.step()
            total += mean_loss * x.numel() * cluster.world
            count += x.numel() * cluster.world
            bar.set_postfix(ppl=f"{ppl(total / count):.2f}", refresh=False)
        record = {
            "epoch": epoch,
            "train_ppl": ppl(total / max(count, 1)),
            "val_ppl": perplexity(model, val_ids, device, cluster=cluster),
            "uniform_ppl": float(vocab_size),
            "tokens": count,
        }
        if not (math.isfinite(record["train_ppl"]) and math.isfinite(record["val_ppl"])):
            raise AgreedError(
                f"training diverged at epoch {epoch} (perplexity overflowed to inf); "
                "try a lower --lr or a --clip value"
            )
        budget.epoch_ended()
        stopper.observe(epoch, record["val_ppl"], model)
        last_epoch = min(cfg.epochs, epoch + _agreed_further_epochs(budget, cfg, cluster, device))
        average_from = scaled_average_from(cfg.average_from, cfg.epochs, last_epoch)
        if average.count and not (average_from and epoch >= average_from):
            _drop_stale_average(average, epoch, cfg.average_from, log)
        if average_from and epoch >= average_from:
            average.update(model)
        stop = None
        if epoch < cfg.epochs and not average.count and stopper.should_stop():
            # once averaging has begun the mean, not the last weights, is what improves
            waited = plural(cfg.patience, "epoch")
            stop = f"early stopping: no better validation perplexity for {waited}"
        elif epoch < cfg.epochs and last_epoch == epoch:
            stop = f"time budget: another epoch would not fit in --time-budget {cfg.time_budget:g}s"
        if epoch == cfg.epochs or stop:
            _finish(model, val_ids, device, cluster, record, average, stopper, log)
            _restored_train_ppl(record, history)
            if stop:
                record["stopped"] = stop
                log(f"{stop} (after epoch {epoch}, {budget.elapsed():.0f}s)")
        history.append(record)
        kind = "infill ppl" if model.task == "infill" else "ppl"
        log(
            f"epoch {epoch}/{cfg.epochs}  train {kind} {record['train_ppl']:.3f}  "
            f"val {kind} {record['val_ppl']:.3f}  (uniform baseline |V| = {vocab_size})"
        )
        if on_epoch is not None:
            on_epoch(record, optimizer)
        if stop:
            break
    return history


def _check_splits(train_ids: list[int], val_ids: list[int], cfg: TrainConfig) -> None:
    """Splits too short to train or score. AgreedError: every rank reads the same corpus with
    the same flags and fails alike, so rank 0 alone says it (each rank said it, once per rank)."""
    try:
        check_fits(len(train_ids), cfg.batch_size, cfg.num_steps, "training split")
    except TrainerError as exc:
        raise AgreedError(str(exc)) from exc
    if len(val_ids) < 3:
        raise AgreedError(
            f"validation split has {len(val_ids)} tokens, too few to score (at least 3); "
            "raise --val-fraction or add text"
        )


def _drop_stale_average(
    average: WeightAverage, epoch: int, average_from: int, log: Callable[[str], None]
) -> None:
    """A resumed run's running mean holds epochs before this run's averaging window (resumed
    with --average-from 0, or later than those epochs): exported, it would replace the
    weights trained since with old ones, or average across a gap."""
    log(
        f"dropped the running mean of {epoch_span(epoch - average.count, epoch - 1)}: "
        f"--average-from {average_from} " + ("is off" if not average_from else "starts later")
    )
    average.reset()


def _restored_train_ppl(record: dict, history: list[dict]) -> None:
    """After the best epoch's weights are restored, the record's train_ppl is that epoch's
    too (train_ppl_final_weights: before), so the manifest pairs numbers of the same model."""
    restored = [r for r in history if r.get("epoch") == record.get("restored_epoch")]
    if restored and "train_ppl" in restored[-1]:
        record["train_ppl_final_weights"] = record["train_ppl"]
        record["train_ppl"] = restored[-1]["train_ppl"]


def _apply_weight_decay(group: dict, cfg: TrainConfig) -> None:
    """The run's --weight-decay, as make_optimizer would set it: a resumed optimizer's state
    brings its param groups' own (AdamW's 0.2 and decoupling kept a --weight-decay 0 run
    decaying), as it brings their lr."""
    group["weight_decay"] = cfg.weight_decay
    if "decoupled_weight_decay" in group:  # torch's Adam and AdamW share it
        group["decoupled_weight_decay"] = cfg.optimizer == "adam" and cfg.weight_decay > 0


def _agreed_further_epochs(
    budget: TimeBudget, cfg: TrainConfig, cluster: Cluster, device: torch.device
) -> int:
    """Epochs that still fit the budget, the same number on every rank (mean clocks)."""
    if cfg.time_budget <= 0:
        return further_epochs(0, 0, 0)
    elapsed, slowest = cluster.sum([budget.elapsed(), budget.slowest_epoch], device)
    return further_epochs(cfg.time_budget, elapsed / cluster.world, slowest / cluster.world)


def _finish(
    model: Any, val_ids: list[int], device: torch.device, cluster: Cluster, record: dict,
    average: WeightAverage, stopper: EarlyStopping, log: Callable[[str], None],
) -> None:  # fmt: skip
    """The run's last epoch: the model becomes the mean of the averaged epochs, or the best
    epoch's weights when those score better on the validation split."""
    epoch = record["epoch"]
    if average.count == 1:  # the mean of one epoch is its weights: nothing to load or score again
        record["averaged_epochs"] = 1
        log(
            f"weights averaged over epoch {epoch} alone: the mean of one epoch is its own "
            f"weights (val ppl {record['val_ppl']:.3f})"
        )
    elif average.count:
        average.copy_to(model)
        record["val_ppl_last_weights"] = record["val_ppl"]
        record["val_ppl"] = perplexity(model, val_ids, device, cluster=cluster)
        record["averaged_epochs"] = average.count
        log(
            f"weights averaged over {epoch_span(epoch - average.count + 1, epoch)}: "
            f"val ppl {record['val_ppl_last_weights']:.3f} -> {record['val_ppl']:.3f}"
        )
    if stopper.restore_if_better(model, record["val_ppl"]):
        record["val_ppl_final_weights"] = record["val_ppl"]
        record["val_ppl"] = stopper.best_ppl
        record["restored_epoch"] = stopper.best_epoch
        log(
            f"restored the weights of epoch {stopper.best_epoch}: val ppl "
            f"{record['val_ppl_final_weights']:.3f} -> {record['val_ppl']:.3f}"
        )
