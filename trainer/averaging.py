"""Stochastic weight averaging (Izmailov et al., 2018): the mean of the weights at the end
of several epochs usually generalises better than the last epoch's weights alone.

With `--average-from E` the model exported is the running mean of the weights after epochs
E, E+1, ..., last. Only floating-point tensors are averaged; others keep their last value.
"""

from __future__ import annotations

import torch


class WeightAverage:
    """Running mean of a model's floating-point state, one update per epoch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] | None = None  # the weights copy_to replaced

    def update(self, model: torch.nn.Module) -> None:
        self.count += 1
        for name, value in model.state_dict().items():
            value = value.detach()
            if name not in self.mean or not value.is_floating_point():
                self.mean[name] = value.clone()
            else:  # incremental mean: exact for any number of epochs, no sum to overflow
                # a resumed mean is loaded on the CPU; the model may train on a GPU
                mean = self.mean[name].to(value.device)
                self.mean[name] = mean + (value - mean) / self.count

    def reset(self) -> None:
        """Forgets the mean: a resumed run whose averaging window starts later (or is off)
        must not export the mean of epochs before it."""
        self.count, self.mean, self.last = 0, {}, None

    def copy_to(self, model: torch.nn.Module) -> None:
        """Loads the mean into `model` (no-op before the first update), keeping the weights it
        replaces: a run resumed from here continues from them, not from the mean."""
        if self.count:
            self.last = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.mean)

    def state_dict(self) -> dict:
        last = {k: v.cpu() for k, v in self.last.items()} if self.last is not None else None
        return {"count": self.count, "mean": {k: v.cpu() for k, v in self.mean.items()},
                "last": last}  # fmt: skip

    def load_state_dict(self, data: dict) -> None:
        self.count = int(data["count"])
        self.mean = {k: v.clone() for k, v in data["mean"].items()}
        self.last = data.get("last")
