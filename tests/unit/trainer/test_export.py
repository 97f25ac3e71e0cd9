"""The exporter: a checked, atomic package for every recurrent model; failures leave nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.artifact.manifest import Manifest, sha256_file
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab
from rnnserve.trainer import staging
from rnnserve.trainer.checkpoint import load_checkpoint, save_checkpoint
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.export import export_model
from rnnserve.trainer.exportable import ExportableModel, state_from_spec
from rnnserve.trainer.models import RNNLM, ModelConfig, build_model
from rnnserve.trainer.staging import staged

VOCAB = Vocab.build(list("the time machine"))


def _export(model, out: Path, **kw) -> Path:
    return export_model(model, out, name="m", vocab=VOCAB, tokenizer=TokenizerConfig(), **kw)


@pytest.mark.parametrize(
    ("arch", "layers", "bidirectional"),
    [("rnn", 1, False), ("gru", 2, False), ("lstm", 2, False), ("lstm", 1, True)],
)
def test_export_writes_a_checked_package(tmp_path, arch, layers, bidirectional) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, len(VOCAB), 8, layers, 4, bidirectional))
    assert isinstance(model, ExportableModel)
    path = _export(model, tmp_path, metrics={"val_perplexity": 3.0})
    assert path == tmp_path / "m" / "1"
    assert path.stat().st_mode & 0o755 == 0o755  # readable by a server running as another user
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = Manifest.load(path)
    assert manifest.task == ("infill" if bidirectional else "lm")
    assert manifest.architecture == arch
    assert manifest.parity["ok"] is True and manifest.parity["max_abs_diff"] <= 1e-4
    assert manifest.onnx_sha256 == sha256_file(path / "model.onnx")
    assert manifest.vocab == VOCAB.to_list()
    graph = onnx.load(str(path / "model.onnx")).graph
    tokens = next(i for i in graph.input if i.name == "tokens")
    assert all(d.dim_param for d in tokens.type.tensor_type.shape.dim)


def test_onnx_matches_torch_for_a_fresh_state_built_from_the_manifest(tmp_path) -> None:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("lstm", len(VOCAB), 8, 2, 4))
    manifest = Manifest.load(_export(model, tmp_path))
    session = ort.InferenceSession(str(tmp_path / "m" / "1" / "model.onnx"))
    x = torch.randint(0, len(VOCAB), (3, 17))
    feed = {"tokens": x.numpy()}
    feed.update({s.input: state_from_spec(s, 3) for s in manifest.state})
    got = session.run(["logits"], feed)[0]
    want = model(x, *model.initial_state(3))[0].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_checkpoint_is_saved_beside_when_given(tmp_path) -> None:
    model = RNNLM(ModelConfig("rnn", len(VOCAB), 4, 1, 4))
    path = _export(model, tmp_path, checkpoint={"state_dict": model.state_dict()})
    assert (path / "checkpoint.pt").is_file()


class _Lies(RNNLM):
    """Exports a different function than it computes in torch: parity must catch it."""

    def onnx_module(self):
        other = RNNLM(self.config)
        return other


class _FixedTime(RNNLM):
    """Bakes the example's time length into the graph (a reshape with Python ints)."""

    def forward(self, tokens, *state):
        logits, *rest = super().forward(tokens, *state)
        b, t, v = logits.shape
        return (logits.reshape(int(b), int(t), int(v)), *rest)


@pytest.mark.parametrize("cls", [_Lies, _FixedTime])
def test_failed_check_leaves_nothing_behind(tmp_path, cls) -> None:
    torch.manual_seed(0)
    model = cls(ModelConfig("gru", len(VOCAB), 4, 1, 4))
    with pytest.raises(TrainerError, match="export check"):
        _export(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_re_export_keeps_the_old_version(tmp_path) -> None:
    torch.manual_seed(0)
    good = _export(RNNLM(ModelConfig("gru", len(VOCAB), 4, 1, 4)), tmp_path)
    digest = sha256_file(good / "model.onnx")
    with pytest.raises(TrainerError):
        _export(_Lies(ModelConfig("gru", len(VOCAB), 4, 1, 4)), tmp_path)
    assert sha256_file(good / "model.onnx") == digest
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_a_re_export_that_fails_at_the_rename_keeps_the_old_version(tmp_path, monkeypatch) -> None:
    """The old version is moved aside before the new one is renamed in: a failure between
    the two left no version at all (the old one under a hidden .1.old-* name)."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "old.txt").write_text("old")
    rename = Path.rename

    def failing(self: Path, target):
        if self.name.startswith(".1.tmp-"):
            raise OSError("no rename today")
        return rename(self, target)

    monkeypatch.setattr(staging, "_exchange", lambda new, target: None)  # cannot swap: 2 steps
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(TrainerError, match="no rename today"), staged(tmp_path / "m" / "1") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    assert (tmp_path / "m" / "1" / "old.txt").read_text() == "old"


def _skip_unless_exchange(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if staging._exchange(tmp_path / "a", tmp_path / "b") is None:
        pytest.skip("this system cannot exchange two names in one step")
    (tmp_path / "a").rmdir()
    (tmp_path / "b").rmdir()


def _publish(target: Path, text: str) -> None:
    with staged(target) as tmp:
        (tmp / "who.txt").write_text(text)


def test_a_republished_version_is_never_missing(tmp_path, monkeypatch) -> None:
    """A server scan (or a SIGKILL) between "old version aside" and "new one in" found no
    version: the scan unloaded a serving model, the kill left it under a hidden .1.old-* name.
    Where the system can, the two are exchanged in one step instead."""
    _skip_unless_exchange(tmp_path)
    target = tmp_path / "m" / "1"
    _publish(target, "old")
    seen: list[bool] = []
    rename = Path.rename

    def spy(self: Path, to):
        seen.append(target.exists())  # what a scan would find at this instant
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", spy)
    _publish(target, "new")
    assert all(seen)
    assert (target / "who.txt").read_text() == "new"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]


def test_two_runs_publishing_one_version_at_once_both_succeed(tmp_path, monkeypatch) -> None:
    """Another run published the version between this one's check and its rename: the rename
    failed on the now non-empty folder with a raw OSError; now this run swaps its package in
    and the other's goes, so a whole version is there and nothing hidden is left behind."""
    _skip_unless_exchange(tmp_path)
    target = tmp_path / "m" / "1"
    rename = Path.rename

    def other_run_first(self: Path, to):
        if Path(to) == target and not target.exists():
            monkeypatch.setattr(Path, "rename", rename)
            _publish(target, "other run")
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", other_run_first)
    _publish(target, "this run")
    assert (target / "who.txt").read_text() == "this run"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]


def test_a_stray_file_where_the_version_goes_leaves_nothing_hidden(tmp_path) -> None:
    """A file (or a link) named like the version was moved to .1.old-* and, rmtree refusing
    it, stayed there for good."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1").write_text("stray")
    _publish(tmp_path / "m" / "1", "new")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]
    assert (tmp_path / "m" / "1" / "who.txt").read_text() == "new"


@pytest.mark.skipif(os.name != "posix", reason="needs flock")
def test_what_killed_publishes_left_is_removed_and_a_running_ones_kept(tmp_path) -> None:
    """A publish killed while staging (or after swapping the old version out) left a hidden
    .1.tmp-* folder that the server skips and nothing ever removed: each killed export of a
    large model took its size of disk for good. A folder a running publish holds stays."""
    import fcntl

    (tmp_path / "m").mkdir()
    for name in (".1.tmp-killed", ".1.tmp-running", ".10.tmp-other", ".git"):
        (tmp_path / "m" / name).mkdir()
        (tmp_path / "m" / name / "model.onnx").write_bytes(b"half")
    held = os.open(tmp_path / "m" / ".1.tmp-running", os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _publish(tmp_path / "m" / "1", "new")
    finally:
        os.close(held)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        ".1.tmp-running", ".10.tmp-other", ".git", "1",
    ]  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_a_package_is_on_the_disk_before_it_replaces_the_old_version(tmp_path, monkeypatch) -> None:
    """Its files are fsynced before it is renamed in, as a checkpoint's are: a power loss soon
    after could leave the new version's files empty, the old version already removed."""
    target = tmp_path / "m" / "1"
    _publish(target, "old")
    done: list[str] = []
    real_fsync, rename, exchange = os.fsync, Path.rename, staging._exchange

    def fsync(fd: int) -> None:
        done.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def renamed(self: Path, to):
        done.append("publish")
        return rename(self, to)

    def exchanged(new: Path, to: Path):
        done.append("publish")
        return exchange(new, to)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", renamed)
    monkeypatch.setattr(staging, "_exchange", exchanged)
    with staged(target) as tmp:
        (tmp / "model.onnx").write_bytes(b"graph")
        (tmp / "manifest.json").write_text("{}")
    first = done.index("publish")
    assert {"fsync model.onnx", "fsync manifest.json"} <= set(done[:first])
    assert (target / "model.onnx").read_bytes() == b"graph"


def test_a_failed_first_package_leaves_no_empty_folders_behind(tmp_path) -> None:
    """OUT and OUT/NAME made for a package that then failed go with it; folders that were
    there before stay."""
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError), staged(tmp_path / "keep" / "models" / "m" / "1"):
        raise RuntimeError("the export check failed")
    assert list((tmp_path / "keep").iterdir()) == []
    assert (tmp_path / "keep").is_dir()


def test_an_unwritable_model_dir_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    """OUT/NAME may exist and belong to another user (the server's): PermissionError from
    the temp dir escaped as a traceback instead of the promised TrainerError."""

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    model = RNNLM(ModelConfig("rnn", len(VOCAB), 4, 1, 4))
    with pytest.raises(TrainerError, match=r"cannot write to .+m: Permission denied"):
        _export(model, tmp_path)


def _disk_full_at_checkpoint(monkeypatch) -> None:
    def full(data, path) -> None:
        Path(path).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 2")

    monkeypatch.setattr(torch, "save", full)


def _disk_full_at_manifest(monkeypatch) -> None:
    def full(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Manifest, "save", full)


@pytest.mark.parametrize("fill", [_disk_full_at_checkpoint, _disk_full_at_manifest])
def test_a_full_disk_while_writing_a_package_is_one_line_and_keeps_the_old(
    tmp_path, monkeypatch, fill
) -> None:
    """`rnn-trainer export` onto a full disk ended in torch's zip-writer RuntimeError or an
    OSError traceback: a TrainerError (one `error:` line) now, the old version untouched."""
    model = RNNLM(ModelConfig("rnn", len(VOCAB), 4, 1, 4))
    old = _export(model, tmp_path)
    digest = sha256_file(old / "model.onnx")
    fill(monkeypatch)
    with pytest.raises(TrainerError, match=r"cannot write the package .+1\b") as info:
        _export(model, tmp_path, checkpoint={"state_dict": model.state_dict()})
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    assert sha256_file(old / "model.onnx") == digest


def test_an_interrupted_checkpoint_save_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pt")

    def half_written(data, path) -> None:
        Path(path).write_bytes(b"PK")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True) == {"epoch": 1}


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_a_checkpoint_is_on_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch) -> None:
    """The temp file is fsynced before the rename and the directory after it: a crash right
    after a save (power loss, a node lost under a Job) could otherwise leave checkpoint.pt
    empty, the old one already replaced."""
    done: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        done.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def replace(src, dst) -> None:
        done.append(f"replace {Path(src).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint({"epoch": 1}, tmp_path / "run" / "checkpoint.pt")
    assert done == ["fsync checkpoint.pt.tmp", "replace checkpoint.pt.tmp", "fsync run"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True) == {"epoch": 1}


@pytest.mark.parametrize("keep", [0, 30, 0.5, 0.99])
def test_a_truncated_checkpoint_is_said_to_be_truncated(tmp_path, keep: float) -> None:
    """torch.load's own words for a cut-off file are "[Errno 22] Invalid argument" or a zip
    reader's internals: the error line says what is wrong with the file."""
    save_checkpoint({"state_dict": {"w": torch.zeros(256)}, "vocab": ["a"]}, tmp_path / "c.pt")
    whole = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(whole[: int(keep if keep >= 1 else len(whole) * keep)])
    with pytest.raises(TrainerError, match=r"c\.pt is not a readable .* truncated or damaged"):
        load_checkpoint(tmp_path / "c.pt")


def test_bad_names_are_refused(tmp_path) -> None:
    model = RNNLM(ModelConfig("rnn", len(VOCAB), 4, 1, 4))
    for name in ("", "../x", ".hidden"):
        with pytest.raises(TrainerError, match="name"):
            export_model(model, tmp_path, name=name, vocab=VOCAB, tokenizer=TokenizerConfig())
