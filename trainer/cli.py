"""`rnn-trainer`: train, sample, export, package, zoo, stats, backtest.

The only layer that knows argparse: it fills the config dataclasses and calls pipeline/zoo.
Any TrainerError (or a manifest/tokenizer ValueError from bad flags) becomes one line
``error: ...`` on stderr and exit status 2; modules owned by others are imported lazily so a
missing one is reported the same way instead of breaking every subcommand. Ctrl-C exits 130
(an interrupted `train` names the command that resumes it); a stdout closed by its reader
(`| head`) ends `stats` and `sample` with 0, and fails the others with 2 unless the package
they make is already written (then only its report was cut: 0).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import itertools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from rnnserve import add_version_flag
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.given_flags import given, refuse_unused
from rnnserve.trainer.recipe import average_from, recipe_for
from rnnserve.trainer.staging import package_dir
from rnnserve.trainer.wording import plural

ARCHS = ("rnn", "gru", "lstm", "ngram", "hmm", "mlp")


def _optional(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrainerError(f"{module} is not available in this install ({exc})") from exc


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        choices=("lm", "infill", "forecast"),
        default=None,
        help="lm (default), infill (implies --bidirectional) or forecast (its flags, e.g. "
        "--series, --tau: `rnn-trainer train --task forecast --help`)",
    )
    p.add_argument(
        "--arch", default="lstm", help="rnn | gru | lstm | ngram | hmm (| mlp, forecast)"
    )
    p.add_argument(
        "--corpus", default=None, help="UTF-8 text file (default: built-in Time Machine)"
    )
    p.add_argument("--out", default="models", help="model repository: writes OUT/NAME/VERSION/")
    p.add_argument("--name", default=None, help="model name (default: the arch)")
    p.add_argument("--version", default="1", help="package version: writes OUT/NAME/VERSION/")
    p.add_argument(
        "--run-dir",
        default=None,
        help="checkpoint.pt, log.jsonl, curve.png per epoch (default: runs/NAME)",
    )
    p.add_argument(
        "--epochs", type=int, default=None,
        help="at most this many epochs (default: the recipe's, or with --resume the run's own; "
        "hmm: 10 EM iterations)",
    )  # fmt: skip
    p.add_argument("--num-steps", type=int, default=32, help="window length (time steps)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per step")
    p.add_argument("--hidden", type=int, default=128, help="hidden units per layer")
    p.add_argument("--embed", type=int, default=32, help="token embedding size")
    p.add_argument("--layers", type=int, default=1, help="stacked recurrent layers")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout while training")
    p.add_argument(
        "--weight-drop", type=float, default=0.0,
        help="DropConnect on the recurrent weights while training (AWD-LSTM)",
    )  # fmt: skip
    p.add_argument("--bidirectional", action="store_true", help="infill model (both directions)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--lr-decay", type=float, default=1.0, help="lr *= this every epoch")
    p.add_argument(
        "--average-from", type=int, default=None, metavar="EPOCH",
        help="export the mean of the weights after epochs EPOCH..last (SWA); 0 = off "
        "(default: the recipe's, the last half of --epochs)",
    )  # fmt: skip
    p.add_argument(
        "--time-budget", type=float, default=0.0, metavar="SECONDS",
        help="no epoch starts that would not end within SECONDS of training; 0 = no budget",
    )  # fmt: skip
    p.add_argument("--optimizer", default="adam", help="adam | sgd")
    p.add_argument(
        "--weight-decay", type=float, default=0.0,
        help="weight decay: decoupled (AdamW) with adam, L2 with sgd; 0 = off",
    )  # fmt: skip
    p.add_argument("--clip", type=float, default=1.0, help="global grad-norm bound, 0 = off")
    p.add_argument("--bptt", default="full", help="full | truncated | random")
    p.add_argument("--bptt-k", type=int, default=8, help="chunk length for --bptt truncated")
    p.add_argument("--bptt-p", type=float, default=0.5, help="keep probability, --bptt random")
    p.add_argument("--sampling", default="random", help="random | sequential")
    p.add_argument("--seed", type=seed_value, default=0, help="0 .. 2**32 - 1")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: as many as torch picks)")
    p.add_argument(
        "--resume", default=None,
        help="checkpoint file or run dir to continue from (a run that ended is exported, not"
        " trained; a larger --epochs trains on)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=3, help="n-gram order")
    p.add_argument("--alpha", type=float, default=1.0, help="Laplace smoothing for ngram")
    p.add_argument("--states", type=int, default=16, help="HMM hidden states")
    p.add_argument("--hmm-method", default="em", help="em | gradient")
    p.add_argument("--level", default="char", help="char | word tokens")
    p.add_argument(
        "--keep-punctuation",
        action="store_true",
        help="keep non-letters (default: letters and spaces only, lowercased)",
    )
    p.add_argument(
        "--min-freq", type=int, default=1, help="tokens seen fewer times are read as <unk>"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="the last FRACTION of the tokens is the validation split (default 0.1)",
    )  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    p.add_argument("--no-progress", action="store_true")  # fmt: skip


def _wants_forecast(argv: list[str]) -> bool:
    """`--task forecast` or `--arch mlp` (also as --flag=value) anywhere in argv."""
    pairs = set(itertools.pairwise(argv)) | {tuple(a.split("=", 1)) for a in argv}
    return ("--task", "forecast") in pairs or ("--arch", "mlp") in pairs


def _flag_value(argv: list[str], flag: str, default: str) -> str:
    """The value of `flag` in argv (also as --flag=value; the last one wins), else default."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values[-1] if values else default


def _add_recipe_defaults(train: argparse.ArgumentParser, argv: list[str]) -> None:
    """Text models (not forecast): the default recipe of the --level and --arch in argv, and
    --patience (forecast has its own)."""
    train.add_argument(
        "--patience", type=int, default=0, metavar="EPOCHS",
        help="early stopping: end after EPOCHS epochs without a better validation perplexity "
        "(not once weight averaging has begun); 0 = off",
    )  # fmt: skip
    recipe = recipe_for(_flag_value(argv, "--level", "char"), _flag_value(argv, "--arch", "lstm"))
    train.set_defaults(**recipe.flag_defaults())


MAX_SEED = 2**32 - 1  # numpy's range; the training loop derives seeds as seed * 1_000_003 + epoch


def seed_value(text: str) -> int:
    """--seed: a number torch, numpy and random all take once the loop has derived its
    per-epoch seeds from it (a seed past ~1.8e13 failed at the first epoch with "Overflow
    when unpacking long long")."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """A flag no parser knows (`train --epoch 1`) was refused under the top-level usage, which
    lists no train flag: the subcommand's usage, and the likely flag, instead (exit 2)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        parsed, extras = self.parse_known_args(args, namespace)
        if not extras:
            return parsed
        sub: argparse.ArgumentParser = self
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(parsed, action.dest, None) or "", self)
        known = sorted({o for a in (*self._actions, *sub._actions) for o in a.option_strings})
        guesses = [
            match
            for extra in extras
            if extra.startswith("--")
            for match in difflib.get_close_matches(extra.split("=", 1)[0], known, n=1)
        ]
        message = f"unrecognized arguments: {' '.join(extras)}"
        sub.error(message + (f" (did you mean {', '.join(guesses)}?)" if guesses else ""))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="rnn-trainer", description=__doc__.splitlines()[0])
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    # allow_abbrev=False: --nproc is taken out of the workers' argv by its exact spelling
    train = sub.add_parser(
        "train", help="train a model and export it to OUT/NAME/VERSION", allow_abbrev=False
    )
    _add_common_train(train)
    importlib.import_module("rnnserve.trainer.precision_cli").add_arguments(train)
    train.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes on this machine (runs torchrun; see docs/trainer.md)",
    )  # fmt: skip
    train.add_argument(
        "--dist-timeout", type=float, default=300.0, metavar="SECONDS",
        help="how long a rank waits for the others before the run fails",
    )  # fmt: skip
    if _wants_forecast(argv or []):  # forecast flags (and defaults) only when asked for
        _optional("rnnserve.trainer.forecast.cli").add_arguments(train)
    else:
        _add_recipe_defaults(train, argv or [])
    sample = sub.add_parser("sample", help="greedy generation in torch (the server's reference)")
    sample.add_argument("--model", required=True, help="package dir (OUT/NAME/VERSION) or run dir")
    sample.add_argument("--prefix", required=True, help="text the generation continues")
    sample.add_argument("--num-tokens", type=int, default=100, help="tokens to generate")
    sample.add_argument("--ids", action="store_true", help="print token ids, not text")
    export = sub.add_parser("export", help="export a checkpoint to OUT/NAME/VERSION")
    export.add_argument("--checkpoint", required=True, help="checkpoint.pt or a dir holding one")
    export.add_argument("--out", default="models", help="model repository (OUT/NAME/VERSION/)")
    export.add_argument("--name", required=True, help="model name")
    export.add_argument("--version", default="1", help="package version")
    importlib.import_module("rnnserve.trainer.precision_cli").add_arguments(export)
    package = sub.add_parser("package", help="package an ONNX graph exported elsewhere")
    importlib.import_module("rnnserve.trainer.package_cli").add_arguments(package)
    zoo = sub.add_parser("zoo", help="train and export every zoo model (what `make run` serves)")
    zoo.add_argument("--out", default="models", help="model repository: writes OUT/NAME/1/")
    zoo.add_argument("--preset", default="default", help="default | tiny")
    zoo.add_argument("--only", nargs="*", default=None, help="subset of zoo names")
    zoo.add_argument("--no-progress", action="store_true")
    backtest = sub.add_parser(
        "backtest", help="rolling-origin forecast backtest against the forecasting baselines"
    )
    _optional("rnnserve.trainer.forecast.backtest_cli").add_arguments(backtest)
    ended = sub.add_parser(
        "ended",
        help="exit 0 when a checkpointed run is over (`train --resume` only exports it), "
        "1 while it has epochs left or has no checkpoint yet: for a Job's shell",
    )
    ended.add_argument("checkpoint", help="checkpoint.pt or the run dir holding one")
    ended.add_argument(
        "--epochs", type=int, default=None,
        help="the --epochs the run is resumed with (default: the run's own)",
    )  # fmt: skip
    stats = sub.add_parser("stats", help="token statistics and a Zipf plot")
    try:
        importlib.import_module("rnnserve.trainer.stats").add_arguments(stats)
    except ImportError:
        stats.add_argument("rest", nargs=argparse.REMAINDER)
    for command in sub.choices.values():
        _show_defaults(command)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Each flag's help ends with its default unless it already says it: `train --help` hid
    them, and the recipe's (--time-budget 420 where its help read "0 = no budget",
    --hidden 512, --patience 3) differ from the code's; %(default)s is the value in force for
    the --arch/--level given."""
    for action in parser._actions:
        default, help_ = action.default, action.help or ""
        if not action.option_strings or action.nargs == 0 or help_ == argparse.SUPPRESS:
            continue  # a switch (--no-refit) would show the value of its dest, not its own
        if default is None or default is False or default == argparse.SUPPRESS:
            continue
        if "default" in help_.lower():
            continue
        action.help = f"{help_} (default: %(default)s)".lstrip()


def _data(args: argparse.Namespace):
    from rnnserve.artifact.tokenizer import TokenizerConfig
    from rnnserve.trainer.pipeline import DataConfig

    tok = TokenizerConfig(level=args.level, letters_only=not args.keep_punctuation)
    return DataConfig(args.corpus, tok, args.min_freq, args.max_tokens, args.val_fraction)


def _data_parallel_setup(args: argparse.Namespace, world: int) -> None:
    """Setup errors every rank would hit alike: said once, before any process group forms."""
    if args.task == "forecast" or args.arch in ("mlp", "ngram", "hmm"):
        what = "--task forecast" if args.task == "forecast" else f"--arch {args.arch}"
        raise TrainerError(  # a forecast gru is not the rnn/gru/lstm of the message
            f"{what} trains in one process; data-parallel training (torchrun, "
            "--nproc) is for rnn, gru and lstm"
        )
    if args.nproc != 1 and world > 1:
        raise TrainerError("--nproc starts torchrun itself; under torchrun leave it out")
    from rnnserve.trainer.sampling import rank_rows

    rank_rows(args.batch_size, 0, max(world, args.nproc))


def recurrent_train_config(args: argparse.Namespace, resumed: dict | None = None):
    """The TrainConfig of an rnn/gru/lstm run: the flags, with --epochs and --average-from
    taken from the --level's recipe when not given, or from `resumed` (the train_config of
    the checkpoint --resume names): a resumed run without --epochs keeps its own, so one that
    ended is exported as it is (what `rnn-trainer ended` says), not trained on to the
    recipe's."""
    from rnnserve.trainer.train import TrainConfig

    recipe = recipe_for(args.level, args.arch)
    planned = resumed or {}
    epochs = args.epochs
    averaged = args.average_from
    if epochs is None and planned.get("epochs"):
        epochs = int(planned["epochs"])
        if averaged is None and planned.get("average_from") is not None:
            averaged = int(planned["average_from"])
    epochs = recipe.epochs if epochs is None else epochs
    if averaged is None:
        averaged = average_from(epochs, recipe.average_last) if epochs >= 1 else 0
    return TrainConfig(
        epochs=epochs, num_steps=args.num_steps, batch_size=args.batch_size, lr=args.lr,
        lr_decay=args.lr_decay, average_from=averaged, patience=args.patience,
        time_budget=args.time_budget, optimizer=args.optimizer,
        weight_decay=args.weight_decay, clip=args.clip, bptt=args.bptt,
        bptt_k=args.bptt_k, bptt_p=args.bptt_p, sampling=args.sampling, seed=args.seed,
        device=args.device, threads=args.threads,
    )  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from rnnserve.trainer import distributed

    world = distributed.env_cluster().world
    if args.nproc != 1 or world > 1:
        _data_parallel_setup(args, world)
    if args.nproc != 1:
        return distributed.launch(args.argv, args.nproc, args.batch_size, args.dist_timeout)
    if args.precision != "fp32":  # refused before training, not after it
        from rnnserve.trainer.precision import check_convertible

        task = args.task or ("forecast" if args.arch == "mlp" else "lm")  # as routed below
        check_convertible(args.arch, task, args.precision)
    if args.task == "forecast" or args.arch == "mlp":
        return int(_optional("rnnserve.trainer.forecast.cli").run_train(args))
    from rnnserve.trainer.models import ModelConfig
    from rnnserve.trainer.pipeline import ALL_ARCHS, train_count_model, train_recurrent
    from rnnserve.trainer.precision_cli import flags as precision_flags

    if args.arch not in ALL_ARCHS:
        raise TrainerError(f"unknown arch {args.arch!r}; choose one of {', '.join(ALL_ARCHS)}")
    bidirectional = args.bidirectional or args.task == "infill"
    if args.task == "lm" and bidirectional:
        raise TrainerError("a bidirectional model cannot be a left-to-right lm; use --task infill")
    if args.resume and args.arch in ("rnn", "gru", "lstm"):
        bidirectional = _follow_resumed_run(args) or bidirectional
    default = f"bi{args.arch}" if bidirectional else args.arch  # `--name ""` is refused below
    name = default if args.name is None else args.name
    package_dir(Path(args.out), name, args.version)  # refused now, not after the training
    progress = not args.no_progress
    data = _data(args)
    if args.arch in ("ngram", "hmm"):
        args.epochs = 10 if args.epochs is None else args.epochs
        if bidirectional:
            flag = "--task infill" if args.task == "infill" else "--bidirectional"  # as given
            raise TrainerError(f"{flag} applies to rnn/gru/lstm, not {args.arch}")
        if args.resume:  # it was ignored: a fresh model replaced what the user meant to go on
            raise TrainerError(f"--resume continues rnn/gru/lstm training, not {args.arch}")
        refuse_unused(
            getattr(args, "argv", None) or [], COUNT_MODEL_UNUSED[args.arch],
            f"--arch {args.arch}", COUNT_MODEL_FLAGS[args.arch],
        )  # fmt: skip
        path = train_count_model(
            args.arch, data, out=Path(args.out), name=name, version=args.version, n=args.n,
            alpha=args.alpha, states=args.states, hmm_method=args.hmm_method, epochs=args.epochs,
            seed=args.seed, progress=progress,
        )  # fmt: skip
    else:
        refuse_unused(getattr(args, "argv", None) or [], COUNT_MODEL_ONLY, f"--arch {args.arch}")
        model = ModelConfig(
            args.arch, 1, args.hidden, args.layers, args.embed, bidirectional, args.dropout,
            args.weight_drop,
        )  # fmt: skip
        resumed = None
        if args.resume and args.epochs is None:  # the run's own --epochs, as `ended` reads it
            from rnnserve.trainer.checkpoint import load_checkpoint

            resumed = load_checkpoint(args.resume).get("train_config") or {}
        train = recurrent_train_config(args, resumed)
        train.validate()  # before joining: a bad value is said once, by rank 0
        if distributed.env_cluster().distributed:  # as the corpus and checkpoint: said once
            _readable_inputs(data.corpus, args.resume if resumed is None else None)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / name
        lead = distributed.env_cluster().is_main  # only rank 0 exports (and needs the dir)
        if lead:  # what an interrupted run's message names (main), said by one rank
            args.checkpoint_dir, args.started = run_dir, time.time()
        fp32_dir = tempfile.TemporaryDirectory() if args.precision != "fp32" and lead else None
        out = Path(fp32_dir.name) if fp32_dir else Path(args.out)  # fp32 first, then converted
        with distributed.joined(args.device, args.dist_timeout) as cluster:
            main = cluster.is_main  # rank 0 alone writes the run dir and the package
            path = train_recurrent(
                model, train, data, out=out if main else None, name=name,
                version=args.version, run_dir=run_dir if main else None,
                resume=Path(args.resume) if args.resume else None, progress=progress and main,
                log=print if main else lambda _line: None,
                publish=(Path(args.out), precision_flags(args)) if fp32_dir else None,
            )  # fmt: skip
        if not main:  # nothing left to write; skip the interpreter's teardown, where gloo's
            distributed.abandon(0)  # worker threads can abort the process (SIGABRT) at exit
        if fp32_dir is not None and path is not None:
            with fp32_dir:
                try:
                    path = _convert_trained(Path(path), args)
                except TrainerError as exc:  # the retry as retry.py words it: every
                    from rnnserve.trainer.retry import retry_command  # precision flag, quoted

                    kept = run_dir / "checkpoint.pt"
                    retry = retry_command(
                        kept, Path(args.out), name, args.version, precision_flags(args)
                    )
                    raise TrainerError(
                        f"{exc}; the trained model is kept in {kept}; retry with: {retry}"
                    ) from exc
        args.published = path  # what is left is to say so (a closed stdout: still done)
        if (run_dir / "log.jsonl").exists():  # a resumed run that had ended trains nothing
            print(f"training log and curve: {run_dir}/log.jsonl, {run_dir}/curve.png")
    args.published = path
    print(f"exported {path}")
    return 0


MODEL_FLAGS = ("hidden", "layers", "embed", "dropout", "weight_drop")
# `train` flags an n-gram or HMM has no use for, by who uses them: given with --arch ngram|hmm
# they were silently ignored (`--hidden 999 --lr 5` trained the same n-gram as without them)
RECURRENT_ONLY_FLAGS = (
    "num_steps", "batch_size", "hidden", "embed", "layers", "dropout", "weight_drop", "lr",
    "lr_decay", "average_from", "patience", "time_budget", "optimizer", "weight_decay", "clip",
    "bptt", "bptt_k", "bptt_p", "sampling", "device", "threads", "run_dir", "dist_timeout",
)  # fmt: skip
COUNT_MODEL_UNUSED = {
    "ngram": {"rnn/gru/lstm": RECURRENT_ONLY_FLAGS, "hmm": ("states", "hmm_method"),
              "hmm and rnn/gru/lstm": ("epochs", "seed")},
    "hmm": {"rnn/gru/lstm": RECURRENT_ONLY_FLAGS, "ngram": ("n", "alpha")},
}  # fmt: skip
# and the other way: the count models' own flags, which rnn/gru/lstm would ignore
COUNT_MODEL_ONLY = {"ngram": ("n", "alpha"), "hmm": ("states", "hmm_method")}
COUNT_MODEL_FLAGS = {  # the refusal's hint: what the model does take
    "ngram": " (an n-gram takes --n and --alpha, beside the corpus and tokenizer flags)",
    "hmm": " (an HMM takes --states, --hmm-method, --epochs and --seed, beside the corpus and "
    "tokenizer flags)",
}


def _follow_resumed_run(args: argparse.Namespace) -> bool:
    """`train --resume R` without --arch or --level: the flags left out take the recipe of
    R's own arch and level, and its model shape, tokenizer and direction (returned: whether
    it is bidirectional). A GRU run resumed with no --arch trained on with the LSTM's
    recipe (lr 0.005, no weight decay instead of 0.003 and 0.2), and the resume note
    listed `--arch lstm, --hidden 512, ...` as ignored flags nobody gave."""
    argv = getattr(args, "argv", None)
    if argv is None:  # called as a library: the namespace holds no command line
        return False
    from rnnserve.trainer.checkpoint import load_checkpoint

    try:
        checkpoint = load_checkpoint(args.resume)
    except TrainerError:
        return False  # said where the run reads it (under torchrun once, by rank 0)
    config, tokenizer = checkpoint.get("model_config"), checkpoint.get("tokenizer")
    if not isinstance(config, dict) or not isinstance(tokenizer, dict):
        return False  # a count model's or a damaged one: the resume refuses it by name
    if not given(argv, "arch") and config.get("arch") in ("rnn", "gru", "lstm"):
        args.arch = config["arch"]
    if not given(argv, "level") and tokenizer.get("level") in ("char", "word"):
        args.level = tokenizer["level"]
    if not given(argv, "keep_punctuation") and "letters_only" in tokenizer:
        args.keep_punctuation = not tokenizer["letters_only"]
    data = checkpoint.get("data")
    if not given(argv, "min_freq") and isinstance(data, dict) and "min_freq" in data:
        args.min_freq = data["min_freq"]  # the vocabulary's: kept whatever the flag says
    for dest, value in recipe_for(args.level, args.arch).flag_defaults().items():
        if not given(argv, dest):
            setattr(args, dest, value)
    for dest in MODEL_FLAGS:
        if not given(argv, dest) and dest in config:
            setattr(args, dest, config[dest])
    given_direction = given(argv, "bidirectional") or given(argv, "task")
    return not given_direction and bool(config.get("bidirectional"))


def _readable_inputs(corpus: str | None, resume: str | None) -> None:
    """Reads the corpus and the --resume checkpoint once before a process group forms: their
    errors (missing, unreadable) are the same on every rank, said once by rank 0; raised
    inside the group, every rank printed them."""
    from rnnserve.trainer.checkpoint import load_checkpoint
    from rnnserve.trainer.corpus import read_corpus

    if corpus is not None:
        read_corpus(corpus)
    if resume:
        load_checkpoint(resume)


def _convert_trained(fp32_package: Path, args: argparse.Namespace) -> Path:
    """The trained fp32 package, converted to --precision and checked on the validation split."""
    from rnnserve.trainer.checkpoint import load_checkpoint
    from rnnserve.trainer.pipeline import validation_probe
    from rnnserve.trainer.precision import convert_package
    from rnnserve.trainer.precision_cli import options

    data = load_checkpoint(fp32_package / "checkpoint.pt")
    return convert_package(
        fp32_package, Path(args.out), fp32_package.parent.name, fp32_package.name,
        probe=validation_probe(data), probe_source="the validation split", **options(args),
    )  # fmt: skip


def run_sample(args: argparse.Namespace) -> int:
    from rnnserve.trainer.sample import greedy_text, greedy_tokens

    if args.ids:
        print(" ".join(str(i) for i in greedy_tokens(args.model, args.prefix, args.num_tokens)))
    else:
        print(args.prefix + greedy_text(args.model, args.prefix, args.num_tokens))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rnnserve.trainer.checkpoint import load_checkpoint, restore
    from rnnserve.trainer.export import export_model
    from rnnserve.trainer.pipeline import validation_probe
    from rnnserve.trainer.precision_cli import options

    data = load_checkpoint(args.checkpoint)
    model, _config, vocab, tok = restore(data)
    if args.precision != "fp32":
        from rnnserve.trainer.precision import check_convertible

        check_convertible(model.arch, model.task, args.precision)
    metrics, training = _provenance(Path(args.checkpoint), data, model.task)
    keep = {k: v for k, v in data.items() if k != "optimizer"}  # weights, not training state
    path = export_model(
        model, Path(args.out), name=args.name, version=args.version, vocab=vocab, tokenizer=tok,
        metrics=metrics, training=training, checkpoint=keep,
        probe=validation_probe(data), probe_source="the validation split", **options(args),
    )  # fmt: skip
    args.published = path
    print(f"exported {path}")
    return 0


def _provenance(source: Path, data: dict, task: str) -> tuple[dict[str, float], dict]:
    """The metrics and training record a re-export keeps: a package's own manifest (an n-gram's
    or HMM's checkpoint has no history to rebuild them from), then what the checkpoint says
    (the last epoch's perplexities, the settings, the data, what the weights are), as `train`
    records them."""
    from rnnserve.artifact.manifest import Manifest
    from rnnserve.trainer.pipeline import run_outcome

    metrics: dict[str, float] = {}
    training: dict = {}
    folder = source if source.is_dir() else source.parent
    if (folder / "manifest.json").is_file():
        try:
            manifest = Manifest.load(folder)
            metrics, training = dict(manifest.metrics), dict(manifest.training)
        except Exception:  # an unreadable manifest: the checkpoint alone, as before
            metrics, training = {}, {}
    history = data.get("history") or []
    if history:
        last, kind = history[-1], "infill_perplexity" if task == "infill" else "perplexity"
        for key, name in (("val_ppl", f"val_{kind}"), ("train_ppl", f"train_{kind}"),
                          ("uniform_ppl", "uniform_perplexity")):  # fmt: skip
            if isinstance(last.get(key), (int, float)):
                metrics[name] = float(last[key])
        training.update({"epochs_run": last.get("epoch"), **run_outcome(last)})
    if isinstance(data.get("data"), dict):  # None (the built-in corpus) keeps the manifest's
        training.update(
            {k: v for k, v in data["data"].items() if v is not None or k not in training}
        )
    training.update(data.get("train_config") or {})
    return metrics, training


def run_zoo(args: argparse.Namespace) -> int:
    from rnnserve.trainer.zoo import build_zoo

    paths = build_zoo(  # --no-progress hides the bars, not the lines
        Path(args.out), args.preset, args.only, progress=not args.no_progress, log=print
    )
    what = "model" if len(paths) == 1 else "models"
    print(f"zoo: {len(paths)} {what} in {args.out}: " + ", ".join(p.parent.name for p in paths))
    return 0


def run_backtest(args: argparse.Namespace) -> int:
    return int(_optional("rnnserve.trainer.forecast.backtest_cli").run(args))


def run_package(args: argparse.Namespace) -> int:
    return int(importlib.import_module("rnnserve.trainer.package_cli").run(args))


def run_ended(args: argparse.Namespace) -> int:
    """Why: a pod of a multi-node Job replaced after training ended must export the run alone;
    under torchrun it would wait for peers that finished long ago (docs/trainer.md)."""
    from rnnserve.trainer.checkpoint import CHECKPOINT_FILE, load_checkpoint
    from rnnserve.trainer.pipeline import run_ended as why_ended

    if args.epochs is not None and args.epochs < 1:  # 0 said "ended" of any run
        raise TrainerError(f"--epochs must be 1 or more, got {args.epochs}")
    path = Path(args.checkpoint)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        print(f"no checkpoint at {file} yet: the run has not started")
        return 1
    checkpoint = load_checkpoint(file)
    if "model_config" not in checkpoint:  # said "epochs left to train", which it never has
        raise TrainerError(
            f"{file} holds an {checkpoint.get('kind', 'n-gram or HMM')} model, trained in one "
            "pass: `ended` is for rnn/gru/lstm runs"
        )
    planned = int((checkpoint.get("train_config") or {}).get("epochs") or 0)
    why = why_ended(checkpoint, planned if args.epochs is None else args.epochs)
    if why is None:
        history = checkpoint.get("history") or []
        done = int(history[-1].get("epoch") or 0) if history else 0
        if args.epochs is not None and 0 < args.epochs <= done:  # exit 1 sent a Job on to a
            raise TrainerError(  # `train --resume` that refuses it: "raise --epochs"
                f"{file}: the run is not over and has {plural(done, 'epoch')} already, so --epochs "
                f"{args.epochs} cannot continue it (`train --resume` refuses it): raise --epochs"
            )
        print(f"{file}: after epoch {done} the run has epochs left to train")
        return 1
    print(f"{file}: {why}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    return int(_optional("rnnserve.trainer.stats").run(args))


COMMANDS = {
    "train": run_train,
    "sample": run_sample,
    "export": run_export,
    "zoo": run_zoo,
    "stats": run_stats,
    "ended": run_ended,
    "package": run_package,
    "backtest": run_backtest,
}


#: Commands whose output is their whole point: a reader that leaves early ends them, exit 0.
PRINTING_COMMANDS = ("stats", "sample")


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of the message (a wrapped library error, such as torch.load's,
    can span many), so the CLI's contract of one `error:` line holds."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else repr(exc)


def _tolerate_any_stdout_encoding() -> None:
    """A terminal that is not UTF-8 (PYTHONIOENCODING=ascii, an ISO-8859-1 locale) ended
    `sample` or `stats` with "error: 'ascii' codec can't encode ...": what it cannot show is
    written as backslash escapes (\\xe9, \\u65e5) instead."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def _resume_hint(args: argparse.Namespace) -> str:
    """How to go on from the checkpoint this interrupted `train` wrote, or resumed in place:
    the same command with --resume RUN_DIR. Nothing when there is none (no epoch ended, or not
    a recurrent run): a checkpoint older than the run is some earlier run's, unless --resume
    named it (interrupted before its first new epoch, the run goes on from it again)."""
    run_dir = getattr(args, "checkpoint_dir", None)
    if run_dir is None:
        return ""
    checkpoint = run_dir / "checkpoint.pt"
    try:
        if checkpoint.stat().st_mtime < args.started and not _names(args.resume, checkpoint):
            return ""
    except OSError:
        return ""
    argv, kept = list(args.argv), []
    while argv:
        arg = argv.pop(0)
        if arg == "--resume":
            argv = argv[1:]
        elif not arg.startswith("--resume="):
            kept.append(arg)
    from rnnserve.trainer.distributed import NPROC_ENV  # torch is loaded: training ran

    nproc = os.environ.get(NPROC_ENV)  # a rank of --nproc N: its argv lost the flag
    if nproc and "--nproc" not in kept:
        kept += ["--nproc", nproc]
    command = shlex.join(["rnn-trainer", *kept, "--resume", str(run_dir)])
    return f"; {checkpoint} holds the last finished epoch: resume with {command}"


def _names(resume: str | None, checkpoint: Path) -> bool:
    """Whether --resume names `checkpoint`: the file, or the run dir holding it."""
    if not resume:
        return False
    given = Path(resume)
    given = given / checkpoint.name if given.is_dir() else given
    return given.resolve() == checkpoint.resolve()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    _tolerate_any_stdout_encoding()
    try:
        return COMMANDS[args.command](args)
    except TrainerError as exc:
        ddp = sys.modules.get("rnnserve.trainer.distributed")  # loaded if a group may be up
        if ddp is None or ddp.speaks(exc):
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        if ddp is not None and isinstance(exc, ddp.PeerFailure):
            ddp.abandon(2)
        return 2
    except ValueError as exc:  # bad flag values caught by the shared artifact dataclasses
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): quiet from now on
        with contextlib.suppress(OSError, ValueError):  # stdout is no file (replaced in-process)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if args.command in PRINTING_COMMANDS:  # `rnn-trainer stats | head`: not an error
            return 0
        if getattr(args, "published", None) is not None:  # only the report of it was cut:
            return 0  # `export | head -0` said "stopped before it ended" with the package out
        # `train ... | head -1` ended the run before its first epoch and exited 0, as if a
        # model had been exported: the work stopped, so it fails, saying how to go on
        print(
            f"error: stdout was closed, so {args.command} stopped before it ended"
            f"{_resume_hint(args)}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
