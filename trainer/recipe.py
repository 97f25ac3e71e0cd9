"""The default training recipe of `rnn-trainer train` for rnn/gru/lstm language models.

Why a recipe and not a bag of flag defaults: the flags interact (dropout only pays with a
wide model; weight averaging only with a decaying learning rate; early stopping only with a
validation split), so they are chosen together, per token level, and documented together in
docs/trainer.md ("The default recipe"), which also says how they were chosen and checked.
Every value is still a flag; a flag given on the command line wins over the recipe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Recipe:
    """Defaults of the `train` flags for one token level (`--level`)."""

    hidden: int
    embed: int
    dropout: float
    epochs: int  # at most; early stopping and the time budget may end the run sooner
    num_steps: int
    batch_size: int
    lr: float
    lr_decay: float  # per epoch
    average_last: float  # fraction of --epochs whose weights are averaged (SWA)
    patience: int  # early stopping: epochs without a better validation perplexity
    time_budget: float  # seconds of training; no epoch starts that would not fit
    sampling: str = "sequential"
    weight_drop: float = 0.0  # DropConnect on the recurrent weights
    layers: int = 1
    weight_decay: float = 0.0  # decoupled (AdamW)

    def flag_defaults(self) -> dict[str, object]:
        """argparse defaults (dest names); --epochs and --average-from are resolved later."""
        values = asdict(self)
        for resolved_later in ("epochs", "average_last"):
            values.pop(resolved_later)
        return values


CHAR = Recipe(
    hidden=512, embed=64, dropout=0.4, epochs=24, num_steps=32, batch_size=16, lr=0.005,
    lr_decay=0.9, average_last=0.5, patience=3, time_budget=420.0,
)  # fmt: skip
WORD = Recipe(
    hidden=512, embed=128, dropout=0.5, epochs=24, num_steps=32, batch_size=16, lr=0.005,
    lr_decay=0.9, average_last=0.5, patience=2, time_budget=420.0,
)  # fmt: skip
RECIPES = {"char": CHAR, "word": WORD}
# The GRU fits this data faster and generalises worse than the LSTM: at the LSTM's lr 0.005 it
# learns less (train ppl 4.13 after 24 epochs), with dropout alone it overfits; a lower
# learning rate with DropConnect on its recurrent weights beside lighter dropout did best, two
# narrower layers beat one wide one, and weight decay (AdamW) let it fit further (docs/trainer.md).
ARCH_CHANGES: dict[str, dict[str, float]] = {
    "gru": {"dropout": 0.2, "weight_drop": 0.2, "lr": 0.003, "lr_decay": 0.9, "layers": 2,
            "hidden": 320, "weight_decay": 0.2}
}  # fmt: skip


def recipe_for(level: str, arch: str = "lstm") -> Recipe:
    """The recipe of a token level and architecture; an unknown level gets the char recipe
    (the tokenizer refuses the level itself, with its own message)."""
    return replace(RECIPES.get(level, CHAR), **ARCH_CHANGES.get(arch, {}))


def average_from(epochs: int, average_last: float) -> int:
    """The first averaged epoch when the last `average_last` of `epochs` are averaged
    (0 = off): 24 epochs, 0.5 -> 13 (epochs 13..24); a share of an epoch counts whole."""
    if average_last <= 0:
        return 0
    averaged = max(1, math.ceil(epochs * min(average_last, 1.0)))
    return epochs - averaged + 1
