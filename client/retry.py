"""Retry policy: exponential backoff with jitter, on UNAVAILABLE (and, for streams, resets).

Why: a server restarting or a replica draining answers UNAVAILABLE for a moment; unary calls
are idempotent reads, so retrying them is safe. Generate is not simply retried (tokens may
already have reached the caller, and a retry would repeat or fork the stream): it fails over
from its last checkpoint instead (client/failover.py), paced by the same policy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """max_attempts counts the first try; backoff before retry n is up to
    min(max_backoff, initial_backoff * multiplier ** (n - 1)) seconds, drawn uniformly from
    [jitter_floor * cap, cap] so concurrent clients do not retry in lockstep."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter_floor: float = 0.5

    def __post_init__(self) -> None:
        # written as "not ok" so NaN (false in every comparison) is refused too: a NaN
        # max_backoff made time.sleep fail mid-retry, a NaN max_attempts retried forever
        if not self.max_attempts >= 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
        if not 1 <= self.multiplier < math.inf:
            raise ValueError(f"multiplier must be finite and >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter_floor <= 1.0:
            raise ValueError(f"jitter_floor must be in [0, 1], got {self.jitter_floor}")

    def cap(self, retry: int) -> float:
        """Upper bound of the pause before retry number `retry` (1-based)."""
        try:
            grown = self.initial_backoff * self.multiplier ** (retry - 1)
        except OverflowError:  # past ~1024 retries at 2.0: far beyond any max_backoff
            grown = math.inf if self.initial_backoff else 0.0
        return min(self.max_backoff, grown)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered pause before retry number `retry` (1-based), in seconds."""
        cap = self.cap(retry)
        return (rng or random).uniform(self.jitter_floor * cap, cap)


NO_RETRY = RetryPolicy(max_attempts=1)
