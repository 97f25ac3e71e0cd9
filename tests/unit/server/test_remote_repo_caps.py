"""What a URL repository may cost a sync: a listing page is read up to a cap, not whole, and
a version refused for its size is not downloaded again at every sync."""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.server.remote_repo import RemoteRepoError, RemoteRepository
from rnnserve.server.repository import Repository
from tests.tools import need_module

fsspec = need_module("fsspec", "the [remote] extra")

LISTING_CAP = 4096
SENT_LIMIT = 4 * 2**20  # an endless page ends here all the same: a failing test must end


class _Handler(http.server.SimpleHTTPRequestHandler):
    """http.server's listings; `endless` paths answer a listing page that never ends."""

    endless: dict[str, list[int]]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        if self.command == "GET" and self.path in self.endless:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            line, sent = b'<li><a href="x/">x/</a></li>\n' * 512, 0
            with contextlib.suppress(OSError):  # the client left
                while sent < SENT_LIMIT:
                    self.wfile.write(line)
                    sent += len(line)
            self.endless[self.path].append(sent)
            return None
        return super().send_head()


@contextlib.contextmanager
def _served(root: Path) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"endless": {}})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/models", handler
    finally:
        server.shutdown()
        server.server_close()


def _package(folder: Path, size: int = 10) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "model.onnx").write_bytes(bytes(size))


def test_a_listing_page_over_the_cap_is_not_read_whole_and_the_rest_syncs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fsspec read a listing page whole into memory: an endless or huge index took all of
    it. A model folder whose page is over the cap is skipped (its cached versions kept and
    served), the others sync; a root page over it fails the sync (the cache is scanned)."""
    served = tmp_path / "served"
    _package(served / "models" / "small" / "1")
    _package(served / "models" / "big" / "1")
    with _served(served) as (url, handler):
        mirror = RemoteRepository(url, tmp_path / "cache", max_listing_bytes=LISTING_CAP)
        assert mirror.sync().fetched == ["big/1", "small/1"]
        for n in range(2, 200):  # big's page grows past the cap
            (served / "models" / "big" / str(n)).mkdir()
        _package(served / "models" / "small" / "2")
        with caplog.at_level(logging.ERROR, logger="rnnserve.server.remote_repo"):
            report = mirror.sync()
        assert report.fetched == ["small/2"] and report.removed == [], report
        (failed,) = report.failed
        assert failed.startswith("big: cannot list its versions at http://"), failed
        assert f"is over {LISTING_CAP} bytes, the most a listing page is read" in failed
        assert "cannot list model big" in caplog.text
        assert (mirror.cache / "big" / "1" / "model.onnx").is_file(), "the cached copy went"

        handler.endless["/models/"] = []  # the root page never ends
        repository = Repository(mirror.cache, lambda path, manifest: None, sync=mirror.sync)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            repository.scan()
        assert sorted(repository.models) == ["big", "small"], "the cached copy was not scanned"
        (failed,) = repository.install(*repository.load_new()).sync_failed
        assert failed.startswith(f"model repository sync: cannot list {url}: the listing"), failed
        assert "model repository sync failed, scanning the cached copy" in caplog.text
        with pytest.raises(RemoteRepoError, match=f"is over {LISTING_CAP} bytes"):
            mirror.sync()
    assert all(sent < SENT_LIMIT for sent in handler.endless["/models/"]), "read whole"


def test_a_version_refused_for_its_size_is_not_downloaded_again_until_it_changes(
    url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A body longer than its listing is stopped at --max-download-bytes, after the cap's
    worth of bytes: every sync (a poll every few seconds) downloaded that much again. The
    refusal is remembered with the version's fingerprint and the cap: a changed file or a
    changed cap fetches it again; a version gone from the URL takes its refusal along."""
    address, fs, root = url
    fs.pipe(f"{root}/m/1/manifest.json", b"{}")
    fs.pipe(f"{root}/m/1/model.onnx", b"m/1")
    cache = tmp_path / "cache"
    mirror = RemoteRepository(address, cache, max_bytes=100)
    asked: list[str] = []
    get_file = mirror.fs.get_file

    def lying(remote: str, local: str, callback, **kwargs):
        asked.append(remote)
        if not remote.endswith("model.onnx"):
            return get_file(remote, local, callback=callback, **kwargs)
        with open(local, "wb") as out:  # far longer than its listing says
            for _ in range(1000):
                out.write(bytes(64))
                callback.relative_update(64)

    monkeypatch.setattr(mirror.fs, "get_file", lying)
    refused = "model.onnx: the version's files pass --max-download-bytes (100 bytes)"
    first = mirror.sync()
    assert first.fetched == [] and refused in first.failed[0] and asked
    asked.clear()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rnnserve.server.remote_repo"):
        again = mirror.sync()
    assert asked == [], "downloaded again"
    (failed,) = again.failed
    assert failed.startswith(f"m/1: not fetched from {address} (refused before;"), failed
    assert refused in failed
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG], "logged again"

    fs.pipe(f"{root}/m/1/model.onnx", b"m/1 fixed")  # another size: a new try
    assert mirror.sync().failed and asked, "a changed version was not tried again"
    asked.clear()
    assert mirror.sync().failed and not asked
    monkeypatch.setattr(mirror.fs, "get_file", get_file)
    raised = RemoteRepository(address, cache, max_bytes=1000)  # another cap: a new try
    assert raised.sync().fetched == ["m/1"]
    assert (cache / "m" / "1" / "model.onnx").read_bytes() == b"m/1 fixed"

    fs.pipe(f"{root}/m/2/model.onnx", bytes(200))  # listed over the cap
    assert "m/2: cannot fetch" in mirror.sync().failed[0]
    assert list(cache.rglob("*.refused")), "not remembered"
    fs.rm(f"{root}/m/2", recursive=True)
    assert mirror.sync().failed == []
    assert not list(cache.rglob("*.refused")), "a version gone from the URL left its refusal"
