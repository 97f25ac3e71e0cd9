"""What the model sees instead of the raw level: differences and seasonal differences.

A tanh network trained on standardised levels cannot extrapolate a level it never saw (a
trending series leaves the training range), so the model learns on a representation that
does not depend on the absolute level:

- `season` m > 1: the seasonal difference y_t = x_t - x_{t-m} (otherwise y_t = x_t);
- `difference` 1: the first difference r_t = y_t - y_{t-1} (otherwise r_t = y_t).

r_t is defined from index `lost` = m + difference on; the first `lost` entries are padded
with the training mean of r (0 after standardisation), so indices stay aligned with the
series. `undo` turns predicted r's back into levels from the true history before the origin:
x̂_{t+j} = x̂_{t+j-m} + ŷ_{t+j} with ŷ accumulated from y_t. Pure numpy: the server implements
the same inverse (server/forecasting.py) and a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRANSFORMS = ("auto", "level", "diff")


@dataclass(frozen=True)
class Representation:
    """difference: 0 or 1; season: the period m (0 = no seasonal differencing)."""

    difference: int = 0
    season: int = 0

    def __post_init__(self) -> None:
        if self.difference not in (0, 1):
            raise ValueError(f"difference must be 0 or 1, got {self.difference}")
        if self.season < 0 or self.season == 1:
            raise ValueError(f"season must be 0 (none) or a period >= 2, got {self.season}")

    @property
    def lost(self) -> int:
        """Leading values that have no representation (the first r is at this index)."""
        return self.season + self.difference

    @property
    def name(self) -> str:
        parts = ([f"seasonal-diff({self.season})"] if self.season else []) + (
            ["diff"] if self.difference else []
        )
        return "+".join(parts) or "level"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """r [T] (float64) for levels x [T]; r[:lost] is NaN (no representation there)."""
        x = np.asarray(values, dtype=np.float64)
        y = x.copy()
        if self.season:
            y[self.season :] = x[self.season :] - x[: -self.season]
            y[: self.season] = np.nan
        if self.difference:
            y[1:] = y[1:] - y[:-1]
            y[0] = np.nan
        return y

    def undo(self, values: np.ndarray, origins: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Levels x̂_{t+1..t+K} [n, K] from predicted r̂ `steps` [n, K] made at `origins` [n],
        given the true levels `values` up to each origin (origins >= lost)."""
        x = np.asarray(values, dtype=np.float64)
        r = np.asarray(steps, dtype=np.float64)
        m = self.season
        if self.difference:
            y_now = x[origins] - (x[origins - m] if m else 0.0)  # y_t, [n]
            y = y_now[:, None] + np.cumsum(r, axis=1)
        else:
            y = r
        if not m:
            return y
        # x̂_{t+j} = x_{t+j-m} + ŷ_{t+j}; the last m true levels seed the recursion, of which
        # the first K are read: [n, m] was 4.7 GB for a 1M-point series with m = 626
        seeds = min(m, y.shape[1])
        levels = x[origins[:, None] + np.arange(-m + 1, -m + 1 + seeds)[None, :]]  # [n, <=K]
        out = np.empty_like(y)
        for j in range(y.shape[1]):
            base = levels[:, j] if j < m else out[:, j - m]
            out[:, j] = base + y[:, j]
        return out

    def to_manifest(self) -> dict:
        return {"name": self.name, "difference": self.difference, "season": self.season}

    @classmethod
    def from_manifest(cls, entry: dict | None) -> Representation:
        entry = entry or {}
        return cls(int(entry.get("difference", 0)), int(entry.get("season", 0)))
