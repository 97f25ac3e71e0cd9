"""Training runs in-process: seed determinism, resume == uninterrupted, clipping, zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rnnserve.artifact.manifest import Manifest
from rnnserve.trainer.checkpoint import load_checkpoint
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.models import RNNLM, ModelConfig
from rnnserve.trainer.pipeline import DataConfig, train_recurrent
from rnnserve.trainer.sample import greedy_tokens
from rnnserve.trainer.train import TrainConfig, fit
from rnnserve.trainer.zoo import TEXT_MODELS, build_zoo


def _train(run_dir: Path, epochs: int, seed: int = 0, resume: Path | None = None, **kw) -> dict:
    cfg = TrainConfig(epochs=epochs, num_steps=8, batch_size=8, seed=seed, **kw)
    model = ModelConfig("gru", 1, hidden=8, embed=4)
    data = DataConfig(max_tokens=2500)
    quiet = {"progress": False, "log": lambda *_: None}
    train_recurrent(model, cfg, data, out=None, name="t", run_dir=run_dir, resume=resume, **quiet)
    return load_checkpoint(run_dir)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class _Killed(Exception):
    """Stands for a run killed before it could checkpoint an epoch."""


def _run(
    run_dir: Path, epochs: int, *, resume: Path | None = None, out: Path | None = None,
    lines: list[str] | None = None, kill_at: int = 0, **kw,
) -> Path | None:  # fmt: skip
    """Like _train, keeping the log lines; `kill_at`: the run dies once epoch `kill_at` is
    trained and scored, before its checkpoint is saved (the epoch line is logged first)."""
    cfg = TrainConfig(epochs=epochs, num_steps=8, batch_size=8, **kw)
    lines = lines if lines is not None else []

    def log(line: str) -> None:
        lines.append(line)
        if kill_at and line.startswith(f"epoch {kill_at}/"):
            raise _Killed(line)

    return train_recurrent(
        ModelConfig("gru", 1, hidden=8, embed=4), cfg, DataConfig(max_tokens=2500), out=out,
        name="t", run_dir=run_dir, resume=resume, progress=False, log=log,
    )  # fmt: skip


# lr 0.3 makes the tiny GRU's validation perplexity go up and down: epoch 1 beats epoch 2,
# epoch 3 beats epoch 4 (so 4 epochs end on epoch 3's weights)
RESTLESS = {"lr": 0.3}


@pytest.mark.parametrize("sampling", ["random", "sequential"])
@pytest.mark.parametrize("bptt", ["full", "random"])
def test_same_seed_same_weights(tmp_path: Path, sampling: str, bptt: str) -> None:
    a = _train(tmp_path / "a", 2, seed=3, sampling=sampling, bptt=bptt)
    b = _train(tmp_path / "b", 2, seed=3, sampling=sampling, bptt=bptt)
    c = _train(tmp_path / "c", 2, seed=4, sampling=sampling, bptt=bptt)
    assert _same(a["state_dict"], b["state_dict"])
    assert not _same(a["state_dict"], c["state_dict"])


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = _train(tmp_path / "full", 3, lr_decay=0.7)
    _train(tmp_path / "part", 1, lr_decay=0.7)
    resumed = _train(tmp_path / "part2", 3, resume=tmp_path / "part", lr_decay=0.7)
    assert resumed["epoch"] == 3
    assert _same(full["state_dict"], resumed["state_dict"])
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    lines = (tmp_path / "part2" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [2, 3]


def test_averaged_weights_are_the_mean_of_the_epochs_and_resume_keeps_them(
    tmp_path: Path,
) -> None:
    snaps = [_train(tmp_path / f"e{e}", e, lr_decay=0.7)["state_dict"] for e in (2, 3, 4)]
    averaged = _train(tmp_path / "avg", 4, lr_decay=0.7, average_from=2)
    for k, v in averaged["state_dict"].items():
        assert torch.allclose(v, sum(s[k] for s in snaps) / 3, atol=1e-6), k
    last = averaged["history"][-1]
    assert last["averaged_epochs"] == 3 and last["val_ppl"] != last["val_ppl_last_weights"]
    _train(tmp_path / "part", 3, lr_decay=0.7, average_from=2)  # stops mid-average
    resumed = _train(tmp_path / "part2", 4, resume=tmp_path / "part", lr_decay=0.7,
                     average_from=2)  # fmt: skip
    assert _same(averaged["state_dict"], resumed["state_dict"])


@pytest.mark.parametrize("average_from", [0, 4])
def test_a_run_resumed_with_a_later_averaging_window_drops_the_old_mean(
    tmp_path: Path, average_from: int
) -> None:
    """A run killed while averaging from epoch 2 and resumed with --average-from 0 exported
    epoch 2's weights (the stale mean, logged as 'averaged over epochs 4-4'); resumed with
    --average-from 4 it averaged epochs 2 and 4, across a gap."""
    with pytest.raises(_Killed):
        _run(tmp_path / "part", 4, average_from=2, kill_at=3)
    assert load_checkpoint(tmp_path / "part")["average"]["count"] == 1
    lines: list[str] = []
    _run(tmp_path / "part", 4, average_from=average_from, resume=tmp_path / "part",
         lines=lines)  # fmt: skip
    _run(tmp_path / "fresh", 4, average_from=average_from)
    resumed, fresh = load_checkpoint(tmp_path / "part"), load_checkpoint(tmp_path / "fresh")
    assert resumed["history"][-1] == fresh["history"][-1]
    assert _same(resumed["state_dict"], fresh["state_dict"])
    assert any(line.startswith("dropped the running mean of epoch 2: ") for line in lines)


def test_resume_restores_a_best_epoch_from_before_the_interruption(tmp_path: Path) -> None:
    """Early stopping's best weights are checkpointed: a run killed after its best epoch and
    resumed ends on them, as the uninterrupted run does."""
    _run(tmp_path / "full", 4, patience=4, **RESTLESS)
    full = load_checkpoint(tmp_path / "full")
    assert full["history"][-1]["restored_epoch"] == 3
    with pytest.raises(_Killed):
        _run(tmp_path / "part", 4, patience=4, kill_at=4, **RESTLESS)
    saved = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["early_stopping"]["best_epoch"] == 3
    _run(tmp_path / "part", 4, patience=4, resume=tmp_path / "part", **RESTLESS)
    resumed = load_checkpoint(tmp_path / "part")
    assert resumed["history"][-1]["restored_epoch"] == 3
    assert resumed["history"] == full["history"]
    assert _same(full["state_dict"], resumed["state_dict"])


def test_a_checkpoint_without_early_stopping_state_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before the state was saved: the counters come from the history,
    the best weights from before the resume are out of reach."""
    with pytest.raises(_Killed):
        _run(tmp_path / "part", 4, patience=4, kill_at=4, **RESTLESS)
    old = load_checkpoint(tmp_path / "part")
    del old["early_stopping"]
    torch.save(old, tmp_path / "part" / "checkpoint.pt")
    _run(tmp_path / "part", 4, patience=4, resume=tmp_path / "part", **RESTLESS)
    resumed = load_checkpoint(tmp_path / "part")
    assert resumed["epoch"] == 4 and "restored_epoch" not in resumed["history"][-1]


def test_resuming_a_run_that_ended_exports_it_and_more_epochs_train_on(tmp_path: Path) -> None:
    """A Job restarted after training (during the export, say) exports the same model instead
    of training it further; --epochs above the run's own continues it."""
    run = tmp_path / "run"
    first = _run(run, 4, patience=1, out=tmp_path / "m1", **RESTLESS)
    ended = load_checkpoint(run)
    assert ended["epoch"] == 2 and ended["history"][-1]["stopped"].startswith("early stopping")
    lines: list[str] = []
    again = _run(run, 4, patience=1, resume=run, out=tmp_path / "m2", lines=lines, **RESTLESS)
    assert [line for line in lines if "without training" in line] == [
        f"resuming {run}: the run stopped after epoch 2 ({ended['history'][-1]['stopped']}): "
        "exporting it without training (--epochs above 4 trains on)"
    ]
    assert not any(line.startswith("epoch ") for line in lines)
    assert load_checkpoint(run)["history"] == ended["history"]  # not written again
    assert first is not None and again is not None
    assert _same(load_checkpoint(first)["state_dict"], load_checkpoint(again)["state_dict"])
    assert Manifest.load(first).metrics == Manifest.load(again).metrics
    lines.clear()
    _run(run, 5, patience=1, resume=run, lines=lines, **RESTLESS)
    assert "resuming" in lines[0] and "after epoch 2" in lines[0]
    assert load_checkpoint(run)["epoch"] > 2


def test_resuming_a_run_that_ran_all_its_epochs_does_not_train_it(tmp_path: Path) -> None:
    _run(tmp_path, 2)
    done = load_checkpoint(tmp_path)
    lines: list[str] = []
    _run(tmp_path, 2, resume=tmp_path, lines=lines)  # was: "raise --epochs to continue"
    assert "the run ended with all its 2 epochs" in lines[0]
    assert load_checkpoint(tmp_path)["history"] == done["history"]
    with pytest.raises(_Killed):
        _run(tmp_path / "part", 4, kill_at=3)
    with pytest.raises(TrainerError, match="raise --epochs"):  # a killed run is not shortened
        _run(tmp_path / "part", 2, resume=tmp_path / "part")


def test_resuming_a_package_checkpoint_goes_on_from_its_last_epoch(tmp_path: Path) -> None:
    """A package's checkpoint records epoch 0; its history says the run trained 2 epochs, so
    --epochs 3 trains epoch 3 only (it trained epochs 1-3 again, each logged twice)."""
    package = _run(tmp_path / "run", 2, out=tmp_path / "m")
    assert package is not None and load_checkpoint(package)["epoch"] == 0
    lines: list[str] = []
    _run(tmp_path / "more", 3, resume=package, lines=lines)
    assert f"resuming {package} after epoch 2" in lines
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["3/3"]
    resumed = load_checkpoint(tmp_path / "more")
    assert resumed["epoch"] == 3 and [r["epoch"] for r in resumed["history"]] == [1, 2, 3]


def test_a_resumed_run_says_which_flags_it_does_not_follow(tmp_path: Path) -> None:
    """The checkpoint's model shape and tokenizer win (the weights need them) and the flags'
    data is used; both used to happen silently (a --corpus left out trains on other text)."""
    _train(tmp_path / "run", 1)
    lines: list[str] = []
    train_recurrent(
        ModelConfig("lstm", 1, hidden=16, embed=4), TrainConfig(epochs=2, num_steps=8,
        batch_size=8), DataConfig(max_tokens=2400), out=None, name="t", run_dir=tmp_path / "run",
        resume=tmp_path / "run", progress=False, log=lines.append,
    )  # fmt: skip
    notes = [line for line in lines if line.startswith("resuming") and "after epoch" not in line]
    assert len(notes) == 2, lines
    assert "the checkpoint's model (arch=gru, hidden=8," in notes[0]
    assert notes[0].endswith("ignored: --arch lstm, --hidden 16")
    assert notes[1].endswith("--max-tokens 2400 (was 2500)")
    assert load_checkpoint(tmp_path / "run")["model_config"]["arch"] == "gru"
    lines.clear()
    _train(tmp_path / "run2", 1)
    _run(tmp_path / "run2", 2, resume=tmp_path / "run2", lines=lines)  # the same flags
    assert [line for line in lines if line.startswith("resuming")] == [
        f"resuming {tmp_path / 'run2'} after epoch 1"
    ]


def test_a_resumed_run_keeps_its_vocabulary_and_says_min_freq_is_ignored(tmp_path: Path) -> None:
    """The checkpoint's vocabulary decides which tokens are <unk>: a changed --min-freq was
    logged as followed (it was not), and one no token reaches refused the run."""
    run = tmp_path / "run"
    _train(run, 1)
    vocab = load_checkpoint(run)["vocab"]
    lines: list[str] = []
    train_recurrent(
        ModelConfig("gru", 1, hidden=8, embed=4), TrainConfig(epochs=2, num_steps=8,
        batch_size=8), DataConfig(max_tokens=2500, min_freq=10**6), out=None, name="t",
        run_dir=run, resume=run, progress=False, log=lines.append,
    )  # fmt: skip
    notes = [line for line in lines if line.startswith("resuming") and "after epoch" not in line]
    assert notes == [
        f"resuming {run}: the checkpoint's vocabulary (|V| = {len(vocab)}, --min-freq 1) is "
        "kept; ignored: --min-freq 1000000"
    ]
    resumed = load_checkpoint(run)
    assert resumed["epoch"] == 2 and resumed["vocab"] == vocab
    assert resumed["data"]["min_freq"] == 1  # what the vocabulary was built with


def test_a_resumed_run_says_its_corpus_was_edited_in_place(tmp_path: Path) -> None:
    """The checkpoint named the corpus by path only: a file edited since trained on its new
    text without a word (a changed --corpus was said, the same path with new text was not)."""
    from rnnserve.trainer.corpus import read_corpus

    corpus = tmp_path / "book.txt"
    corpus.write_text(read_corpus(None)[:3000], encoding="utf-8")
    run = tmp_path / "run"

    def train(epochs: int, resume: Path | None, log) -> None:
        train_recurrent(
            ModelConfig("gru", 1, hidden=8, embed=4), TrainConfig(epochs=epochs, num_steps=8,
            batch_size=8), DataConfig(corpus=str(corpus)), out=None, name="t", run_dir=run,
            resume=resume, progress=False, log=log,
        )  # fmt: skip

    train(1, None, lambda *_: None)
    assert load_checkpoint(run)["data"]["corpus_sha256"]
    same: list[str] = []
    train(2, run, same.append)
    assert not [line for line in same if "changed since the checkpoint" in line]
    corpus.write_text(read_corpus(None)[3000:6000], encoding="utf-8")
    lines: list[str] = []
    train(3, run, lines.append)
    [note] = [line for line in lines if "changed since the checkpoint" in line]
    assert note.startswith(f"resuming {run}: the corpus {corpus.resolve()} changed")


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ({"kind": "ngram", "count_config": {}, "model_config": None}, "no rnn/gru/lstm model"),
        ({"history": [{"train_ppl": 3.0}]}, "cannot be resumed"),
        ({"model_config": {"arch": "gru", "vocab_size": 3, "heads": 2}}, "cannot be resumed"),
        ({"state_dict": {}}, "its weights do not fit"),
    ],
)
def test_a_checkpoint_that_cannot_be_resumed_is_one_error_line(
    tmp_path: Path, damage: dict, said: str
) -> None:
    """An n-gram package or a damaged checkpoint: a TrainerError, not a KeyError traceback."""
    _train(tmp_path / "run", 1)
    data = load_checkpoint(tmp_path / "run")
    data.update(damage)
    if data["model_config"] is None:
        del data["model_config"]
    torch.save(data, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(TrainerError, match=said):
        _run(tmp_path / "more", 3, resume=tmp_path / "run")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save says a full disk as "RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos": it ended the run with that traceback; now one line names the checkpoint
    that is kept, and resuming from it goes on."""
    import rnnserve.trainer.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def full_disk(data, path) -> None:
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK\x03\x04")  # what got out before the disk filled up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        real_save(data, path)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(TrainerError) as info:
        _run(tmp_path / "run", 3)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot save epoch 2 in the run dir" in message and "keeps epoch 1" in message
    assert f"--resume {tmp_path / 'run'}" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt", "curve.png", "log.jsonl",
    ]  # fmt: skip
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    _run(tmp_path / "run", 3, resume=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")["epoch"] == 3


def test_average_from_past_the_last_epoch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="--average-from"):
        _train(tmp_path, 2, average_from=3)


def test_a_fresh_run_starts_a_fresh_log(tmp_path: Path) -> None:
    _train(tmp_path, 2)
    _train(tmp_path, 1)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_checkpoint_holds_no_pickled_module(tmp_path: Path) -> None:
    _train(tmp_path, 1)
    data = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # refuses pickled code
    assert data["model_config"]["arch"] == "gru"


def _movement(clip: float) -> float:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("rnn", 30, hidden=8, embed=4))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    ids = [(i * 7) % 30 for i in range(6000)]
    cfg = TrainConfig(epochs=1, num_steps=8, batch_size=300, lr=1.0, optimizer="sgd", clip=clip)
    fit(model, ids[:5000], ids[5000:], cfg, progress=False, log=lambda *_: None)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return float((after - before).norm())


def test_clipping_bounds_the_update() -> None:
    """SGD with lr 1: each of the <= 2 steps moves the weights by at most --clip (global norm)."""
    steps = 5000 // (300 * 8)
    assert 0 < _movement(clip=0.01) <= 0.01 * steps + 1e-6
    assert _movement(clip=0) > 0.01 * steps  # unclipped it moves further: the bound is real


def test_a_non_finite_gradient_is_refused_before_it_reaches_the_weights() -> None:
    """A finite loss with an inf gradient: clipping turned it into NaN, the step made every
    weight NaN, and the error blamed the next batch's loss and suggested --clip."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("lstm", 9, hidden=8, embed=4))
    next(model.parameters()).register_hook(lambda grad: grad * float("inf"))
    ids = [i % 9 for i in range(3000)]
    cfg = TrainConfig(epochs=1, num_steps=8, batch_size=8)
    with pytest.raises(TrainerError, match="gradient norm became inf at epoch 1, batch 1"):
        fit(model, ids[:2500], ids[2500:], cfg, progress=False, log=lambda *_: None)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_a_validation_split_too_short_names_the_flag() -> None:
    model = RNNLM(ModelConfig("rnn", 9, hidden=4, embed=2))
    ids = [i % 9 for i in range(300)]
    with pytest.raises(TrainerError, match="raise --val-fraction"):
        fit(model, ids, ids[:2], TrainConfig(epochs=1, num_steps=4, batch_size=4),
            progress=False, log=lambda *_: None)  # fmt: skip


@pytest.mark.slow
def test_tiny_zoo_builds_every_text_model(tmp_path: Path) -> None:
    paths = build_zoo(tmp_path, preset="tiny", only=list(TEXT_MODELS), progress=False)
    names = {p.parent.name for p in paths}
    assert {"rnn", "gru", "lstm", "lstm-deep", "bilstm"} <= names
    for path in paths:
        m = Manifest.load(path)
        assert m.version == "1" and m.parity["ok"]
    assert Manifest.load(tmp_path / "bilstm" / "1").task == "infill"
    assert Manifest.load(tmp_path / "lstm-deep" / "1").hyperparameters["layers"] == 2


def test_infill_package_refuses_to_generate(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, num_steps=8, batch_size=8)
    model = ModelConfig("lstm", 1, hidden=8, embed=4, bidirectional=True)
    path = train_recurrent(model, cfg, DataConfig(max_tokens=2500), out=tmp_path, name="bi",
                           progress=False, log=lambda *_: None)  # fmt: skip
    assert path is not None and Manifest.load(path).task == "infill"
    assert "val_infill_perplexity" in Manifest.load(path).metrics
    with pytest.raises(TrainerError, match="only left-to-right"):
        greedy_tokens(path, "the time", 3)


def test_the_manifest_says_which_weights_were_exported(tmp_path: Path) -> None:
    """Settings alone (epochs, average_from) do not say what was exported: the manifest's
    training record also names the epochs averaged and a restored best epoch."""
    averaged = _run(tmp_path / "a", 3, out=tmp_path / "m", average_from=2)
    assert averaged is not None
    record = Manifest.load(averaged).training
    assert record["averaged_epochs"] == 2 and "restored_epoch" not in record
    restored = _run(tmp_path / "r", 6, out=tmp_path / "m2", patience=1, **RESTLESS)
    assert restored is not None
    record = Manifest.load(restored).training
    assert record["restored_epoch"] < record["epochs_run"] < record["epochs"] == 6
    assert record["stopped"].startswith("early stopping")
