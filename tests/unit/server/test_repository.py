"""Rescans of a local repository: what a listing failure does to the versions already loaded,
and when a NOT_SERVING version is retried. Broken manifests stand in for models: every version
here is NOT_SERVING, which is all the scan rules need."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

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
