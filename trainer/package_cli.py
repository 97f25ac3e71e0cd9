"""Flags of `rnn-trainer package` (bring your own model; docs/bring-your-own-model.md).

Why its own file: cli.py stays a list of subcommands; this one has many flags of its own.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rnnserve.trainer import package_forecast_cli, precision_cli


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, help="the graph, exported by your own code")
    p.add_argument("--vocab", help="token list: one token per line, line 1 = id 0 (task lm)")
    p.add_argument(
        "--tokenizer", metavar="char|word|FILE.json",
        help="how text becomes those tokens: a level, or a JSON file of tokenizer settings",
    )  # fmt: skip
    p.add_argument("--keep-case", action="store_true", help="do not lowercase (char|word)")
    p.add_argument("--letters-only", action="store_true", help="map non-letters to spaces")
    p.add_argument("--out", default="models", help="model repository: writes OUT/NAME/VERSION/")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--version", default="1", help="package version")
    p.add_argument("--input", default=None, help="token input name (default: inferred)")
    p.add_argument("--output", default=None, help="logits output name (default: inferred)")
    p.add_argument(
        "--state", action="append", default=None, metavar="INPUT:OUTPUT[:BATCH_AXIS]",
        help="a state pair, once per state tensor (default: inferred by shape and order)",
    )  # fmt: skip
    p.add_argument(
        "--layout", choices=("batch-major", "time-major"), default=None,
        help="token input [batch, time] or [time, batch] (default: inferred, else batch-major)",
    )  # fmt: skip
    p.add_argument("--arch", default=None, help="rnn|gru|lstm (default: from the graph's ops)")
    p.add_argument("--text", default=None, help="sample text the check feeds (default: the"
                                                " model's own samples)")  # fmt: skip
    precision_cli.add_arguments(p)
    package_forecast_cli.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from rnnserve.trainer.package import PackageRequest, package_model, tokenizer_spec

    package_forecast_cli.refuse_across_tasks(args)
    if args.task == "forecast":
        return package_forecast_cli.run(args)

    converting = args.precision != "fp32"
    fp32_dir = tempfile.TemporaryDirectory() if converting else None  # fp32 first, then converted
    request = PackageRequest(
        onnx_path=Path(args.onnx), vocab_path=Path(args.vocab),
        tokenizer=tokenizer_spec(args.tokenizer, not args.keep_case, args.letters_only),
        out=Path(fp32_dir.name) if fp32_dir else Path(args.out), name=args.name,
        version=args.version, input_name=args.input,
        output_name=args.output, states=args.state, layout=args.layout, arch=args.arch,
        text=Path(args.text) if args.text else None,
    )  # fmt: skip
    path = package_model(request)
    if fp32_dir is not None:
        from rnnserve.trainer.precision import convert_package

        with fp32_dir:
            text = _probe_ids(path, args.text)
            path = convert_package(
                path, Path(args.out), args.name, args.version, probe=text,
                probe_source=args.text or "given text", **precision_cli.options(args),
            )  # fmt: skip
    args.published = path  # written: a stdout closed from here on cuts only the report
    for note in request.notes:
        print(note)
    print(f"packaged {path}")
    return 0


def _probe_ids(package: Path, text: str | None) -> list[int] | None:
    """--text encoded as the packaged model reads it (None: the check samples the model)."""
    if not text:
        return None
    from rnnserve.artifact.manifest import Manifest
    from rnnserve.artifact.tokenizer import Tokenizer

    manifest = Manifest.load(package)
    words = Tokenizer(manifest.tokenizer).tokenize(Path(text).read_text(encoding="utf-8-sig"))
    return manifest.build_vocab().encode(words)
