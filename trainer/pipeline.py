"""One training run end to end: corpus -> vocabulary -> model -> fit -> checkpoint -> package.

Why separate from the CLI: the CLI, the zoo and the tests call the same functions with
dataclasses; argparse stays in cli.py. Nothing is written to the model repository until the
model is trained and its export check passed (export_model is atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab
from rnnserve.trainer.averaging import WeightAverage
from rnnserve.trainer.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    make_count_checkpoint,
    resolve,
    restore,
    save_checkpoint,
)
from rnnserve.trainer.corpus import build_corpus, read_corpus, split_ids
from rnnserve.trainer.early_stopping import EarlyStopping
from rnnserve.trainer.errors import TrainerError, os_reason
from rnnserve.trainer.export import export_model
from rnnserve.trainer.models import RNN_ARCHS, ModelConfig, build_model
from rnnserve.trainer.plot import plot_history
from rnnserve.trainer.retry import export_or_keep
from rnnserve.trainer.train import TrainConfig, fit, make_optimizer, resolve_device
from rnnserve.trainer.wording import plural

COUNT_ARCHS = ("ngram", "hmm")
ALL_ARCHS = (*RNN_ARCHS, *COUNT_ARCHS)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes ids."""

    corpus: str | None = None  # None: the built-in Time Machine
    tokenizer: TokenizerConfig = field(
        default_factory=lambda: TokenizerConfig(level="char", letters_only=True)
    )
    min_freq: int = 1
    max_tokens: int | None = None
    val_fraction: float = 0.1


@dataclass
class Prepared:
    train_ids: list[int]
    val_ids: list[int]
    vocab: Any
    tokenizer: TokenizerConfig
    digest: str
    num_tokens: int


def prepare(data: DataConfig, vocab_from: list[str] | None = None) -> Prepared:
    """Reads, tokenizes and splits; a resumed run re-uses its checkpoint's vocabulary."""
    text = read_corpus(data.corpus)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    # a given vocabulary decides which tokens are <unk>: --min-freq could only refuse the text
    min_freq = data.min_freq if vocab_from is None else 1
    corpus = build_corpus(text, data.tokenizer, min_freq, max_tokens=data.max_tokens)
    vocab = Vocab(vocab_from) if vocab_from is not None else corpus.vocab
    ids = vocab.encode(corpus.tokens)
    train_ids, val_ids = split_ids(ids, data.val_fraction)
    return Prepared(train_ids, val_ids, vocab, data.tokenizer, digest, len(ids))


def data_record(data: DataConfig, digest: str | None = None) -> dict[str, Any]:
    """Stored in checkpoints, so `rnn-trainer export` can find the validation split again and
    `--resume` can tell a corpus edited in place (`digest`: sha256 of the text read)."""
    corpus = str(Path(data.corpus).resolve()) if data.corpus else None  # export from any cwd
    return {
        "corpus": corpus,
        "min_freq": data.min_freq,
        "max_tokens": data.max_tokens,
        "val_fraction": data.val_fraction,
        **({"corpus_sha256": digest} if digest else {}),
    }


def validation_probe(checkpoint: dict[str, Any]) -> list[int] | None:
    """The validation split a checkpoint was trained with (its corpus read again and encoded
    with its vocabulary), or None when the checkpoint does not say or the corpus is gone."""
    record = checkpoint.get("data")
    if not isinstance(record, dict):
        return None
    tokenizer = TokenizerConfig.from_dict(checkpoint["tokenizer"])
    try:
        data = DataConfig(
            record.get("corpus"), tokenizer, int(record.get("min_freq", 1)),
            record.get("max_tokens"), float(record.get("val_fraction", 0.1)),
        )  # fmt: skip
        return prepare(data, list(checkpoint["vocab"])).val_ids
    except (TrainerError, OSError, ValueError):
        return None


def _training_record(data: DataConfig, prep: Prepared, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "corpus": data.corpus or "builtin:timemachine.txt",
        "corpus_sha256": prep.digest,
        "tokens": prep.num_tokens,
        "val_fraction": data.val_fraction,
        **extra,
    }


def train_recurrent(
    model_config: ModelConfig | None,
    train_config: TrainConfig,
    data: DataConfig,
    *,
    out: Path | None,
    name: str,
    version: str = "1",
    run_dir: Path | None = None,
    resume: Path | None = None,
    progress: bool = True,
    log=print,
    publish: tuple[Path, Sequence[str]] | None = None,
) -> Path | None:
    """Trains an RNN/GRU/LSTM (lm, or infill when bidirectional) and exports it to out/.
    `publish`: where the model finally goes and with which export flags, when `out` is only
    a step on the way (train --precision): a failed export's retry names them."""
    train_config.validate()
    resolve_device(train_config.device)
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None:
        kept, start, history = resume_point(ckpt, resume)
        tokenizer = TokenizerConfig.from_dict(ckpt["tokenizer"])
        for note in resume_notes(ckpt, kept, model_config, data, tokenizer):
            log(f"resuming {resume}: {note}")
        data.tokenizer, model_config = tokenizer, kept
        data.min_freq = _vocab_min_freq(ckpt, data.min_freq)
    prep = prepare(data, ckpt["vocab"] if ckpt else None)
    if ckpt is not None:
        edited = _corpus_edited(ckpt, data, prep.digest)
        if edited:
            log(f"resuming {resume}: {edited}")
    assert model_config is not None
    model_config.vocab_size = len(prep.vocab)
    torch.manual_seed(train_config.seed)
    model = build_model(model_config)
    optimizer = make_optimizer(model, train_config)
    average = WeightAverage()
    stopper = EarlyStopping(train_config.patience)
    ended = None
    if ckpt is None:
        start, history = 0, []
    else:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:  # an edited or damaged checkpoint: one line, no traceback
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise TrainerError(f"{resume}: its weights do not fit its model: {first}") from exc
        model.to(resolve_device(train_config.device))
        ended = run_ended(ckpt, train_config.epochs)
    if ended is not None:  # the checkpoint holds the run's final model: export it as it is
        log(f"resuming {resume}: {ended}")
    elif ckpt is not None:
        if (
            ckpt.get("optimizer")
            and (ckpt.get("train_config") or {}).get("optimizer") == train_config.optimizer
        ):
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("average"):
            average.load_state_dict(ckpt["average"])
            if average.last is not None:  # the run ended on the mean: go on from its weights
                model.load_state_dict(average.last)
                average.last = None
        if ckpt.get("early_stopping"):
            stopper.load_state_dict(ckpt["early_stopping"])
        else:  # a checkpoint from before the state was saved: the counters, not the weights
            stopper.replay(history)
        log(f"resuming {resume} after epoch {start}")
        if start >= train_config.epochs:
            raise TrainerError(
                f"checkpoint already has {plural(start, 'epoch')}; raise --epochs to continue"
            )
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and ended is None:
        _writable_run_dir(run_dir)
    log(
        f"{name}: {model_config.arch} layers={model_config.layers} hidden={model_config.hidden}"
        f" bidirectional={model_config.bidirectional} |V|={len(prep.vocab)}"
        f" train={len(prep.train_ids)} val={len(prep.val_ids)} tokens"
    )

    saved: list[int] = []  # epochs the run dir's checkpoint.pt holds, written by this run
    if ckpt is not None and run_dir is not None and _same_file(resume, run_dir):
        saved.append(start)  # resumed in place: the checkpoint it resumed is still there

    def on_epoch(record: dict, opt: torch.optim.Optimizer) -> None:
        history.append(record)
        if run_dir is None:
            return
        cp = make_checkpoint(
            model, model_config, prep.vocab, prep.tokenizer, asdict(train_config), opt,
            record["epoch"], history,
        )  # fmt: skip
        cp["average"] = average.state_dict() if average.count else None
        cp["early_stopping"] = stopper.state_dict()
        cp["data"] = data_record(data, prep.digest)
        try:
            save_checkpoint(cp, run_dir / "checkpoint.pt")
            saved.append(record["epoch"])
            fresh = record["epoch"] == start + 1 and ckpt is None  # a new run starts a new log
            with open(run_dir / "log.jsonl", "w" if fresh else "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"name": name, **record}) + "\n")
            plot_history(history, run_dir / "curve.png", title=name)
        except (OSError, RuntimeError) as exc:  # torch.save says a full disk as RuntimeError
            raise TrainerError(_run_dir_write_failed(run_dir, record["epoch"], saved, exc)) from exc

    if ended is None:
        fit(
            model, prep.train_ids, prep.val_ids, train_config, optimizer=optimizer,
            start_epoch=start, history=list(history), on_epoch=on_epoch, progress=progress,
            log=log, average=average, stopper=stopper,
        )  # fmt: skip
    if out is None:
        return None
    model.cpu().eval()
    last = history[-1]
    kind = "infill_perplexity" if model.task == "infill" else "perplexity"
    cp = make_checkpoint(model, model_config, prep.vocab, prep.tokenizer, asdict(train_config))
    cp["history"] = history
    cp["data"] = data_record(data, prep.digest)
    outcome = {**asdict(train_config), "epochs_run": last["epoch"], **run_outcome(last)}
    return export_or_keep(
        lambda: export_model(
            model, Path(out), name=name, version=version, vocab=prep.vocab,
            tokenizer=prep.tokenizer,
            metrics={f"val_{kind}": last["val_ppl"], f"train_{kind}": last["train_ppl"],
                     "uniform_perplexity": last["uniform_ppl"]},
            training=_training_record(data, prep, outcome),
            checkpoint=cp, probe=prep.val_ids, probe_source="the validation split",
        ),
        cp, run_dir / "checkpoint.pt" if run_dir is not None else None,
        out=publish[0] if publish else Path(out), name=name, version=version,
        retry_flags=publish[1] if publish else (),
    )  # fmt: skip


def run_outcome(last: dict[str, Any]) -> dict[str, Any]:
    """What the exported weights are, beside the settings: a restored best epoch, the number
    of epochs averaged, why the run stopped early (absent when it did not happen)."""
    keys = ("restored_epoch", "averaged_epochs", "stopped")
    return {key: last[key] for key in keys if last.get(key) is not None}


def resume_point(checkpoint: dict[str, Any], path: Path) -> tuple[ModelConfig, int, list[dict]]:
    """(model config, epochs done, history) of the checkpoint `--resume` continues, or a
    TrainerError when it cannot be continued (a count model's, a damaged history) rather than
    a KeyError traceback.

    Why the history counts: a package's checkpoint records epoch 0 (its history says how far
    the run went), and resuming it from epoch 1 trained the run again and logged it twice."""
    if "model_config" not in checkpoint:
        kind = checkpoint.get("kind", "another kind")
        raise TrainerError(
            f"{path} holds no rnn/gru/lstm model ({kind}); --resume continues their training only"
        )
    try:
        config = ModelConfig(**checkpoint["model_config"])
        history = [dict(record) for record in checkpoint.get("history") or []]
        done = [int(record["epoch"]) for record in history]
        start = max([int(checkpoint.get("epoch") or 0), *done])
    except (TypeError, ValueError, KeyError) as exc:
        raise TrainerError(
            f"{path} cannot be resumed: its model config, epoch or history is damaged "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return config, start, history


def resume_notes(
    checkpoint: dict[str, Any],
    kept: ModelConfig,
    flags: ModelConfig | None,
    data: DataConfig,
    tokenizer: TokenizerConfig,
) -> list[str]:
    """What a resumed run takes from elsewhere than its flags, said instead of done silently:
    the model's shape, tokenizer and vocabulary (so its --min-freq) come from the checkpoint
    (the weights need them), the data from the flags, which may name another corpus or split
    than the checkpoint was trained on (`--corpus` left out reads the built-in text)."""
    notes = []
    if flags is not None:
        shape, given = asdict(kept), asdict(flags)
        del shape["vocab_size"]
        changed = [f"--{key.replace('_', '-')} {given[key]}" for key in shape
                   if given[key] != shape[key]]  # fmt: skip
        if data.tokenizer.to_dict() != tokenizer.to_dict():
            changed.append("the tokenizer flags")
        if changed:
            notes.append(
                f"the checkpoint's model ({', '.join(f'{k}={v}' for k, v in shape.items())}) "
                "and tokenizer are kept; ignored: " + ", ".join(changed)
            )
    record = checkpoint.get("data")
    if isinstance(record, dict):
        now = data_record(data)
        if "min_freq" in record and now["min_freq"] != record["min_freq"]:
            notes.append(
                f"the checkpoint's vocabulary (|V| = {len(checkpoint.get('vocab') or [])}, "
                f"--min-freq {record['min_freq']}) is kept; ignored: --min-freq {now['min_freq']}"
            )
        shown = {None: "(the built-in text)"}  # a corpus left out
        changed = [
            f"--{key.replace('_', '-')} {shown.get(now[key], now[key])} "
            f"(was {shown.get(record[key], record[key])})"
            for key in now
            if key in record and key != "min_freq" and now[key] != record[key]
        ]
        if changed:
            notes.append(
                "training on other data than the checkpoint's, as the flags say: "
                + ", ".join(changed)
            )
    return notes


def _corpus_edited(checkpoint: dict[str, Any], data: DataConfig, digest: str) -> str | None:
    """A note when the corpus file the checkpoint names has other text now than it was
    trained on (edited in place: the path alone looks the same); None otherwise, or when
    the flags name another corpus (resume_notes says that)."""
    record = checkpoint.get("data")
    if not isinstance(record, dict) or not record.get("corpus_sha256"):
        return None  # a checkpoint from before the digest was kept
    if data_record(data)["corpus"] != record.get("corpus") or record["corpus_sha256"] == digest:
        return None
    where = record.get("corpus") or "the built-in text"
    return (
        f"the corpus {where} changed since the checkpoint (sha256 {digest[:12]}..., was "
        f"{str(record['corpus_sha256'])[:12]}...): training on its new text"
    )


def _vocab_min_freq(checkpoint: dict[str, Any], default: int) -> int:
    """The --min-freq the checkpoint's vocabulary was built with (a resumed run keeps that
    vocabulary), so the run's checkpoints record it rather than an ignored flag."""
    record = checkpoint.get("data")
    value = record.get("min_freq") if isinstance(record, dict) else None
    return value if isinstance(value, int) else default


def run_ended(checkpoint: dict[str, Any], epochs: int) -> str | None:
    """Why the checkpointed run is over, or None while it has epochs to train.

    Why: a run that ended (its last epoch says `stopped`, or it ran all the epochs it was
    started with) holds its final model (averaged, best epoch restored); `--resume` of it,
    e.g. a Job restarted during the export, must export that model, not train it further.
    Asking for more `epochs` than the run was started with continues it."""
    history = checkpoint.get("history") or []
    if not history:
        return None
    done = int(history[-1].get("epoch") or checkpoint["epoch"])  # a package's says 0
    planned = int((checkpoint.get("train_config") or {}).get("epochs") or done)
    if epochs > planned:
        return None
    if history[-1].get("stopped"):
        why = f"the run stopped after epoch {done} ({history[-1]['stopped']})"
    elif done >= planned:
        why = "the run ended with " + (
            "its 1 epoch" if planned == 1 else f"all its {plural(planned, 'epoch')}"
        )
    else:
        return None
    return f"{why}: exporting it without training (--epochs above {planned} trains on)"


def _writable_run_dir(run_dir: Path) -> None:
    """Creates the run dir before the first epoch: an unusable one is said now, not after an
    epoch of training is lost to a traceback."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot create the run dir {run_dir}: {os_reason(exc)}") from exc
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise TrainerError(f"cannot write to the run dir {run_dir}; choose another --run-dir")


def _same_file(resume: Path | None, run_dir: Path) -> bool:
    """Whether --resume names the run dir's own checkpoint (the dir or the file)."""
    try:
        return resolve(resume).resolve() == (run_dir / "checkpoint.pt").resolve()
    except (TrainerError, OSError, TypeError):
        return False


def _run_dir_write_failed(run_dir: Path, epoch: int, saved: list[int], exc: BaseException) -> str:
    """One line for a run dir that stopped taking writes mid-run (disk full, quota, file size
    limit, a mount gone): which epoch the checkpoint keeps and how to go on, instead of torch's
    zip-writer traceback. A checkpoint this run did not write (an older run's) is not named."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"disk full? {first}"
    if saved:
        kept = (
            f"{run_dir / 'checkpoint.pt'} keeps epoch {saved[-1]}: free space, then go on with"
            f" --resume {run_dir}"
        )
    else:
        kept = "no epoch of this run was saved"
    return f"cannot save epoch {epoch} in the run dir {run_dir} ({why}); {kept}"


def train_count_model(
    arch: str,
    data: DataConfig,
    *,
    out: Path,
    name: str,
    version: str = "1",
    n: int = 3,
    alpha: float = 1.0,
    states: int = 16,
    hmm_method: str = "em",
    epochs: int = 20,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> Path:
    """n-gram or HMM (owned by other modules), exported through the same interface."""
    prep = prepare(data)
    vocab_size = len(prep.vocab)
    if arch == "ngram":
        from rnnserve.trainer.ngram import train_ngram

        model = train_ngram(prep.train_ids, vocab_size, n=n, alpha=alpha)
        extra = {"n": n, "alpha": alpha}
    elif arch == "hmm":
        from rnnserve.trainer.hmm import train_hmm

        model = train_hmm(
            prep.train_ids, vocab_size, states=states, method=hmm_method, epochs=epochs,
            seed=seed, progress=progress,
        )  # fmt: skip
        extra = {"states": states, "method": hmm_method, "epochs": epochs, "seed": seed}
    else:
        raise TrainerError(f"unknown arch {arch!r}; choose one of {', '.join(ALL_ARCHS)}")
    metrics: dict[str, float] = {"uniform_perplexity": float(vocab_size)}
    if hasattr(model, "perplexity"):
        metrics["val_perplexity"] = float(model.perplexity(prep.val_ids))
        log(
            f"{name}: val ppl {metrics['val_perplexity']:.3f} (uniform baseline |V| = {vocab_size})"
        )
    cp = make_count_checkpoint(model, prep.vocab, prep.tokenizer)
    cp["data"] = data_record(data, prep.digest)
    return export_or_keep(
        lambda: export_model(
            model, Path(out), name=name, version=version, vocab=prep.vocab,
            tokenizer=prep.tokenizer, metrics=metrics,
            training=_training_record(data, prep, extra), checkpoint=cp, probe=prep.val_ids,
            probe_source="the validation split",
        ),
        cp, None, out=Path(out), name=name, version=version,
    )  # fmt: skip


def restore_from(path: Path):
    """(model, config, vocab, tokenizer) from a checkpoint file/dir or a package dir."""
    return restore(load_checkpoint(path))
