"""The `--precision` flags shared by `rnn-trainer train`, `export` and `package`.

Why its own file: three subcommands take the same flags; trainer/precision.py (which imports
ONNX Runtime) is loaded only when a command runs.
"""

from __future__ import annotations

import argparse

from rnnserve.artifact.manifest import PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="weights of the published graph: fp32, int8 (ONNX Runtime dynamic quantization)"
             " or fp16; inputs, outputs and state stay float32 (docs/trainer.md)",
    )  # fmt: skip
    p.add_argument(
        "--per-tensor", action="store_true",
        help="int8: one scale per weight tensor instead of one per output channel",
    )  # fmt: skip
    p.add_argument(
        "--allow-quality-loss", action="store_true",
        help="publish an int8/fp16 graph even when its perplexity rises above the bound",
    )  # fmt: skip


def options(args: argparse.Namespace) -> dict:
    """The keyword arguments export_model and convert_package take."""
    return {
        "precision": args.precision,
        "per_channel": not args.per_tensor,
        "allow_quality_loss": args.allow_quality_loss,
    }


def flags(args: argparse.Namespace) -> list[str]:
    """The same choices as command-line flags (for a printed retry command)."""
    if args.precision == "fp32":
        return []
    return [
        "--precision", args.precision,
        *(["--per-tensor"] if args.per_tensor else []),
        *(["--allow-quality-loss"] if args.allow_quality_loss else []),
    ]  # fmt: skip
