"""Rescans of a local repository: what a listing failure does to the versions already loaded,
and when a NOT_SERVING version is retried. Broken manifests stand in for models: every version
here is NOT_SERVING, which is all the scan rules need."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED
from rnnserve.server.errors import UnknownModel
from rnnserve.server.repository import Repository


def _never(path, manifest):  # the manifests are broken: no session is ever built
    raise AssertionError(path)


def _repo(root: Path, *tags: str) -> Repository:
    for tag in tags:
        version = root / tag
        version.mkdir(parents=True)
        (version / "manifest.json").write_text("{ broken")
    repository = Repository(root, _never)
    repository.scan()
    return repository


def _rescan(repository: Repository):
    return repository.install(*repository.load_new())


def test_an_unreadable_model_folder_keeps_its_versions_and_the_others_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    repository = _repo(tmp_path, "a/1", "b/1")
    shutil.rmtree(tmp_path / "b" / "1")
    listing = Path.iterdir

    def iterdir(self: Path):
        if self == tmp_path / "a":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with caplog.at_level(logging.ERROR):
        report = _rescan(repository)  # raised PermissionError: the whole rescan failed
    assert report.unloaded == ["b/1"], "a/1 cannot be seen, not gone; b/1 is gone"
    assert "cannot list" in caplog.text and "Permission denied" in caplog.text


def test_a_model_folder_removed_during_the_scan_unloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = _repo(tmp_path, "a/1", "b/1")
    listing = Path.iterdir

    def iterdir(self: Path):
        if self == tmp_path / "a":  # listed by the root, gone before its own listing
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert _rescan(repository).unloaded == ["a/1"]


def test_a_repository_folder_that_cannot_be_listed_unloads_nothing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    repository = _repo(root, "a/1", "b/2")
    root.rename(tmp_path / "models.old")  # mid-swap (mv models models.old; mv new models)
    report = _rescan(repository)
    assert report.unloaded == [], "every model was unloaded: health NOT_SERVING"
    assert repository.names() == ["a", "b"]


def test_a_failed_version_is_retried_after_a_chmod(tmp_path: Path) -> None:
    """chmod changes no modification time; a fixed permission must still count as a fix."""
    repository = _repo(tmp_path, "a/1")
    assert _rescan(repository).failed == [], "untouched: not retried"
    manifest = tmp_path / "a" / "1" / "manifest.json"
    failed_at = repository.get_any("a", "1").mtime
    while manifest.stat().st_ctime <= failed_at:  # the kernel's clock ticks coarsely
        manifest.chmod(0o644)  # the fix: permissions, no write
    report = _rescan(repository)
    assert [f.split(":")[0] for f in report.failed] == ["a/1"], "never retried"


def _serving_repo(root: Path, *tags: str) -> Repository:
    """Versions with a valid manifest and a stand-in session: SERVING."""
    for tag in tags:
        _publish(root, tag)
    repository = Repository(root, lambda path, manifest: SimpleNamespace(provider="fake"))
    repository.scan()
    return repository


def _publish(root: Path, tag: str) -> None:
    version = root / tag
    version.mkdir(parents=True)
    Manifest(
        name="m", version=tag.split("/")[1], task="lm", architecture="lstm",
        hyperparameters={}, input_name="tokens", output_name="logits", state=[],
        tokenizer=TokenizerConfig(), vocab=[*RESERVED, "a"],
    ).save(version)  # fmt: skip
    (version / "model.onnx").write_bytes(b"onnx")


def test_two_folders_of_one_version_number_are_one_version(tmp_path: Path) -> None:
    """Versions are numbers (Triton's rule): "7" and "007" are one version, not two."""
    repository = _serving_repo(tmp_path, "m/007", "m/7")
    assert [(v.version, v.status) for v in repository.versions("m")] == [
        ("7", "SERVING"),
        ("007", "NOT_SERVING"),
    ], "the shortest spelling is the version"
    shadowed = next(v for v in repository.versions("m") if v.version == "007")
    assert "same number as '7'" in shadowed.reason
    assert repository.get("m", "007").version == "7", "version 007 is version 7"
    assert _rescan(repository).failed == [], "reported again at every rescan"
    shutil.rmtree(tmp_path / "m" / "7")
    report = _rescan(repository)
    assert (report.loaded, report.unloaded) == (["m/007"], ["m/7"])
    repository.remove("m", "7")  # as Admin.ReloadModels does with what is unloaded
    assert repository.get("m", "7").version == "007", "a request for 7 finds folder 007"


def test_a_serving_folder_keeps_its_number_when_another_spelling_of_it_appears(
    tmp_path: Path,
) -> None:
    repository = _serving_repo(tmp_path, "m/07")
    _publish(tmp_path, "m/7")
    report = _rescan(repository)
    assert report.loaded == [] and len(report.failed) == 1
    assert report.failed[0].startswith("m/7: ") and "'07'" in report.failed[0]
    assert repository.get("m", "7").version == "07", "version 7 went on serving"


def test_a_version_of_thousands_of_digits_is_not_found_not_an_internal_error(
    tmp_path: Path,
) -> None:
    """int() of more than 4300 digits raises ValueError: GetModel, Score and KServe's
    ModelReady (open without a token) answered INTERNAL for a client's long version."""
    repository = _serving_repo(tmp_path, "m/7")
    with pytest.raises(UnknownModel, match="has no version"):
        repository.get("m", "7" * 5000)
    with pytest.raises(UnknownModel, match="has no version"):
        repository.get_any("m", "1" + "0" * 5000)
    assert repository.get("m", "0" * 5000 + "7").version == "7", "zeros in front: still 7"


def test_sync_failures_are_in_the_reload_report(tmp_path: Path) -> None:
    """A URL repository's failed downloads, or a URL that cannot be listed, were only logged:
    `rnn-client reload` printed an empty reply."""
    outcomes: list = [
        SimpleNamespace(failed=["m/2: cannot fetch from https://host/models: 503"]),
        RuntimeError("cannot list https://host/models: Connection refused"),
    ]

    def sync():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    repository = Repository(tmp_path, _never, sync=sync)
    report = repository.scan()
    assert report.sync_failed == ["m/2: cannot fetch from https://host/models: 503"]
    assert report.failed == [], "no version was refused: a rescan that changed nothing"
    failed = _rescan(repository).sync_failed
    assert len(failed) == 1 and "cannot list https://host/models: Connection refused" in failed[0]


def test_odd_version_folders_are_warned_about_once_and_hidden_ones_not_at_all(
    tmp_path: Path, caplog
) -> None:
    """A poll every few seconds logged a WARNING per odd folder at every rescan, for good:
    `..data` (a Kubernetes ConfigMap or projected volume), `.git`, `lost+found`, `v2`."""
    repository = _repo(tmp_path, "m/1")
    for name in ("..data", "..2024_01_01_00_00_00.1", ".git", "v2"):
        (tmp_path / "m" / name).mkdir()
    with caplog.at_level(logging.WARNING):
        _rescan(repository)
        _rescan(repository)
    warned = [r.getMessage() for r in caplog.records if "positive integers" in r.getMessage()]
    assert len(warned) == 1 and "v2" in warned[0], warned
    caplog.clear()
    (tmp_path / "m" / "v2").rmdir()
    _rescan(repository)
    (tmp_path / "m" / "v2").mkdir()
    with caplog.at_level(logging.WARNING):
        _rescan(repository)
    assert "positive integers" in caplog.text, "back again: worth a word again"


def test_a_dangling_symlink_does_not_hide_a_fix_in_place(tmp_path: Path) -> None:
    """One entry that cannot be stat'ed made the folder's change time 0 at every scan: a
    NOT_SERVING version was never retried, whatever was fixed beside it."""
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{ broken")
    (version / "checkpoint.pt").symlink_to(tmp_path / "gone")  # a training run cleaned up
    repository = Repository(tmp_path, _never)
    repository.scan()
    assert _rescan(repository).failed == [], "untouched: not retried"
    failed_at = repository.get_any("m", "1").mtime
    while (version / "manifest.json").stat().st_ctime <= failed_at:  # coarse kernel clock
        (version / "manifest.json").write_text("{ still broken")
    assert [f.split(":")[0] for f in _rescan(repository).failed] == ["m/1"], "never retried"


def test_a_model_folder_whose_name_is_not_utf8_is_ignored_with_one_warning(
    tmp_path: Path, caplog
) -> None:
    """A folder copied from a Latin-1 system ("mod\\xe8le") was served under a name with a lone
    surrogate: every ListModels then failed INTERNAL and the whole /metrics page 500, since
    both encode every model name as UTF-8."""
    latin1 = tmp_path / os.fsdecode(b"mod\xe8le") / "1"
    latin1.mkdir(parents=True)
    (latin1 / "manifest.json").write_text("{ broken")
    with caplog.at_level(logging.WARNING):
        repository = _repo(tmp_path, "m/1")
        _rescan(repository)
    assert repository.names() == ["m"]
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warned) == 1 and "mod\\udce8le" in warned[0], warned


def test_a_graph_too_new_for_onnxruntime_says_which_opset_to_export(tmp_path: Path) -> None:
    """ORT's refusal starts with its C++ source line and signature: cut at 500 characters, the
    NOT_SERVING reason lost the one part a user can act on (the opset this onnxruntime runs)."""
    import onnx
    from onnx import TensorProto, helper

    from rnnserve.server.runtime import OnnxModel

    _publish(tmp_path, "m/1")
    x = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "time"])
    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["logits"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1000)])
    onnx.save(model, str(tmp_path / "m" / "1" / "model.onnx"))
    repository = Repository(tmp_path, lambda path, manifest: OnnxModel(path, manifest, [], 1))
    repository.scan()
    (entry,) = [v for v in repository.versions("m") if v.version == "1"]
    assert entry.status == "NOT_SERVING"
    assert "opset 1000 is newer than onnxruntime" in entry.reason, entry.reason
    assert "onnxruntime_src" not in entry.reason
