"""Early stopping on the validation split, keeping the best weights seen.

Why: a model past its best validation perplexity only gets worse on unseen text (word-level
models overfit within a few epochs); stopping there saves the time and the damage. The
weights of the best epoch are kept (a CPU copy), so the run can end on them when neither the
last weights nor their average do better.
"""

from __future__ import annotations

import torch


class EarlyStopping:
    """Tracks the best validation perplexity; `should_stop` after `patience` worse epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience  # 0 = never stop early, keep no copy
        self.best_ppl = float("inf")
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epochs_since_best = 0

    def observe(self, epoch: int, val_ppl: float, model: torch.nn.Module) -> None:
        """Records one epoch's validation perplexity (and a copy of its weights if best)."""
        if val_ppl < self.best_ppl:
            self.best_ppl, self.best_epoch, self.epochs_since_best = val_ppl, epoch, 0
            if self.patience:
                self.best_state = {k: v.detach().cpu().clone()
                                   for k, v in model.state_dict().items()}  # fmt: skip
        else:
            self.epochs_since_best += 1

    def state_dict(self) -> dict:
        """Counters and the best weights, as tensors and primitives (checkpointed each epoch,
        so a resumed run can still restore a best epoch from before the resume)."""
        return {
            "best_ppl": self.best_ppl,
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.epochs_since_best,
            "best_state": self.best_state,
        }

    def load_state_dict(self, data: dict) -> None:
        """A checkpointed state; the weights only with patience (0 keeps no copy)."""
        self.best_ppl = float(data["best_ppl"])
        self.best_epoch = int(data["best_epoch"])
        self.epochs_since_best = int(data["epochs_since_best"])
        best_state = data.get("best_state")
        self.best_state = dict(best_state) if self.patience and best_state is not None else None

    def replay(self, history: list[dict]) -> None:
        """A resumed run's counters from its history, for a checkpoint without a saved state
        (written before it was checkpointed): only epochs after the resume can be restored."""
        for record in history:
            if record.get("val_ppl") is not None:
                if record["val_ppl"] < self.best_ppl:
                    self.best_ppl, self.best_epoch = record["val_ppl"], record["epoch"]
                    self.epochs_since_best = 0
                else:
                    self.epochs_since_best += 1

    def should_stop(self) -> bool:
        return self.patience > 0 and self.epochs_since_best >= self.patience

    def restore_if_better(self, model: torch.nn.Module, val_ppl: float) -> bool:
        """Loads the best weights into `model` when they beat `val_ppl` (the model's own)."""
        if self.best_state is None or not self.best_ppl < val_ppl:
            return False
        model.load_state_dict(self.best_state)
        return True
