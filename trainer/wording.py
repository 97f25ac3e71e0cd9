"""Counts and epoch ranges in the trainer's messages, said as a reader would say them.

Why a module: "for 1 epochs", "averaged over epochs 2-2" appeared wherever a number was
pasted before a plural noun; every message with a count goes through these two."""

from __future__ import annotations


def plural(number: int, noun: str, many: str | None = None) -> str:
    """`1 epoch`, `2 epochs` (`many`: the plural of a noun that does not take an s)."""
    return f"{number} {noun if number == 1 else many or noun + 's'}"


def epoch_span(first: int, last: int) -> str:
    """`epoch 4` for one epoch, `epochs 2-4` for several."""
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"
