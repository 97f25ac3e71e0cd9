"""The mirror's bookkeeping on a failing cache disk, against fsspec's in-memory filesystem (the
real HTTP and S3 servers are in tests/e2e/test_remote_repo.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from rnnserve.server.remote_repo import RemoteRepository, is_downgrade, redact
from rnnserve.server.repository import Repository
from tests.tools import need_module

fsspec = need_module("fsspec", "the [remote] extra")


def _publish(fs, root: str, tag: str) -> None:
    fs.pipe(f"{root}/{tag}/manifest.json", b"{}")
    fs.pipe(f"{root}/{tag}/model.onnx", tag.encode())


def test_a_full_disk_when_recording_a_download_leaves_no_version_behind(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once in the cache without its fingerprint, a version was served for good: a sync only
    removes what it has a fingerprint for."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    mirror = RemoteRepository(address, tmp_path / "cache")
    assert mirror.sync().fetched == ["m/1"]
    _publish(fs, root, "m/2")
    write_text = Path.write_text

    def full(self: Path, *args, **kwargs):
        if self.name.startswith("2.json"):  # the download fitted; its fingerprint does not
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    report = mirror.sync()
    assert [f.split(":")[0] for f in report.failed] == ["m/2"]
    assert not (mirror.cache / "m" / "2").exists(), "failed, yet in the cache"
    monkeypatch.setattr(Path, "write_text", write_text)
    assert mirror.sync().fetched == ["m/2"], "retried at the next sync"
    fs.rm(f"{root}/m/2", recursive=True)
    assert mirror.sync().removed == ["m/2"]
    assert not (mirror.cache / "m" / "2").exists()
    assert (mirror.cache / "m" / "1" / "model.onnx").read_bytes() == b"m/1"


def test_a_failed_download_is_in_the_reload_report_with_the_url(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was only logged: `rnn-client reload` answered an empty reply."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    mirror = RemoteRepository(address, tmp_path / "cache")
    repository = Repository(mirror.cache, lambda path, manifest: None, sync=mirror.sync)
    repository.scan()
    _publish(fs, root, "m/2")
    get_file = mirror.fs.get_file

    def refused(remote: str, local: str, *args, **kwargs):
        if "/m/2/" in remote:
            raise OSError("503 Service Unavailable")
        return get_file(remote, local, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "get_file", refused)
    failed = repository.install(*repository.load_new()).sync_failed
    assert len(failed) == 1 and failed[0].startswith("m/2: cannot fetch from memory://")
    assert "503 Service Unavailable" in failed[0]


def test_downloads_cut_short_by_a_kill_are_cleared_at_the_next_sync(url, tmp_path: Path) -> None:
    """A server killed mid-download (OOM, a liveness probe during a long fetch) left its
    partial copy in the cache's sync folder for good: one more model's size per kill."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    mirror = RemoteRepository(address, tmp_path / "cache")
    state = mirror.cache / ".rnnserve-sync"
    for leftover in ("m-2-abc123", "retired-def456"):  # as mkdtemp names them
        (state / leftover / "v").mkdir(parents=True)
        (state / leftover / "v" / "model.onnx").write_bytes(b"half a model")
    assert mirror.sync().fetched == ["m/1"]
    assert sorted(p.name for p in state.iterdir()) == ["fingerprints", "lock"]
    assert (mirror.cache / "m" / "1" / "model.onnx").read_bytes() == b"m/1"


@pytest.mark.parametrize(
    "address",
    [
        "https://alice:p@ssw0rd@host/models",  # yarl and urllib split at the last '@'
        "https://alice:p@ss@w0rd@host",
        "https://p@ssw0rd@host/models?x=1",
    ],
)
def test_a_password_holding_an_at_sign_stays_out_of_logs(address: str) -> None:
    """The user info was cut at its first '@': the rest of the password ("ssw0rd@host") was
    logged and put in Admin.ReloadModels' failed[] at every sync that failed."""
    shown = redact(f"cannot list {address}: 404, url='{address}/'")
    assert "ssw0rd" not in shown and "w0rd" not in shown and "alice" not in shown, shown
    assert shown.count("://host") == 2, shown


def test_redact_leaves_an_at_sign_after_the_host_alone() -> None:
    for text in ("https://host/models/a@b", "https://host?mail=a@b", "s3://bucket/m x@y"):
        assert redact(text) == text


def test_a_download_cut_short_is_retried_not_recorded_as_complete(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that ends with its connection looks whole to the HTTP client: the cut copy was
    swapped in with the listing's fingerprint, so no later sync ever fetched it again."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    mirror = RemoteRepository(address, tmp_path / "cache")
    get_file = mirror.fs.get_file

    def cut(remote: str, local: str, *args, **kwargs):
        get_file(remote, local, *args, **kwargs)
        if remote.endswith("model.onnx"):
            Path(local).write_bytes(Path(local).read_bytes()[:1])

    monkeypatch.setattr(mirror.fs, "get_file", cut)
    report = mirror.sync()
    assert report.fetched == [] and len(report.failed) == 1, report
    assert "model.onnx: got 1 bytes, its listing says 3" in report.failed[0]
    assert not (mirror.cache / "m" / "1").exists()
    monkeypatch.setattr(mirror.fs, "get_file", get_file)
    assert mirror.sync().fetched == ["m/1"], "retried at the next sync"
    assert (mirror.cache / "m" / "1" / "model.onnx").read_bytes() == b"m/1"


@pytest.mark.parametrize("cap, fetched", [(0, True), (13, True), (12, False)])
def test_a_version_listed_over_the_download_cap_is_never_downloaded(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int, fetched: bool
) -> None:
    """m/1 is 13 bytes (manifest 2, model 3, weights 8): at the cap it fits, 0 is no cap,
    one byte less and no file of it is fetched at all (the listing already says so)."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    fs.pipe(f"{root}/m/1/weights.bin", bytes(8))
    mirror = RemoteRepository(address, tmp_path / "cache", max_bytes=cap)
    asked: list[str] = []
    get_file = mirror.fs.get_file

    def counted(remote: str, local: str, *args, **kwargs):
        asked.append(remote)
        return get_file(remote, local, *args, **kwargs)

    monkeypatch.setattr(mirror.fs, "get_file", counted)
    report = mirror.sync()
    if fetched:
        assert report.fetched == ["m/1"] and len(asked) == 3
        assert (mirror.cache / "m/1/weights.bin").read_bytes() == bytes(8)
    else:
        assert report.fetched == [] and asked == [], report
        refused = "weights.bin: the version's files pass --max-download-bytes (12 bytes)"
        assert refused in report.failed[0], report
        assert not (mirror.cache / "m").exists()


def test_a_file_longer_than_its_listing_is_stopped_at_the_cap_as_it_is_written(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing may lie: the cap counts what the driver writes, chunk by chunk, and the
    file is refused at the chunk that passes it, not once it is whole."""
    address, fs, root = url
    _publish(fs, root, "m/1")
    mirror = RemoteRepository(address, tmp_path / "cache", max_bytes=100)
    written: list[int] = []

    def endless(remote: str, local: str, callback, **kwargs):
        callback.set_size(None)  # no Content-Length
        with open(local, "wb") as out:
            for _ in range(1000):  # 64 KiB, were it not stopped
                out.write(bytes(64))
                written.append(64)
                callback.relative_update(64)

    monkeypatch.setattr(mirror.fs, "get_file", endless)
    report = mirror.sync()
    assert report.fetched == [] and "--max-download-bytes (100 bytes)" in report.failed[0]
    assert sum(written) == 128, "not stopped at the chunk that passed the cap"


@pytest.mark.parametrize(
    "source, target, downgrade",
    [
        ("https://repo/m/1/model.onnx", "http://bucket.s3.amazonaws.com/x?sig=1", True),
        ("HTTPS://repo/m/1/model.onnx", "HTTP://repo/x", True),
        ("https://repo/m/1/model.onnx", "https://bucket.s3.amazonaws.com/x?sig=1", False),
        ("https://repo/m/1/model.onnx", "/elsewhere/model.onnx", False),  # same scheme
        ("https://repo/m/1/model.onnx", "//cdn.example/model.onnx", False),
        ("http://repo/m/1/model.onnx", "http://cdn.example/model.onnx", False),
        ("http://repo/m/1/model.onnx", "https://cdn.example/model.onnx", False),
    ],
)
def test_only_a_redirect_from_https_to_plain_http_is_a_downgrade(
    source: str, target: str, downgrade: bool
) -> None:
    assert is_downgrade(source, target) is downgrade
