"""The loaded model's bytes that --decode-process 1 children open (server/model_image.py),
and the back-off after a child could not open them."""

from __future__ import annotations

import os
import time

import pytest

from rnnserve.server.decode import process
from rnnserve.server.decode.process import OpenBackoff
from rnnserve.server.model_image import ModelImage


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_image_holds_the_bytes_for_every_reader() -> None:
    loaded = os.urandom(3 * (1 << 20) + 17)
    image = ModelImage.of(loaded, "lstm")
    try:
        for _ in range(2):  # each reader (a restarted child) starts at byte 0
            assert ModelImage.path_in_child(image.fd).read_bytes() == loaded
    finally:
        image.close()


def test_the_image_is_sealed() -> None:
    image = ModelImage.of(b"weights")
    try:
        with pytest.raises(PermissionError):
            os.pwrite(image.fd, b"W", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(image.fd, 1)
        with pytest.raises(PermissionError):
            os.pwrite(image.fd, b"more", 7)
        assert ModelImage.path_in_child(image.fd).read_bytes() == b"weights"
    finally:
        image.close()


def test_close_or_drop_releases_the_image() -> None:
    before = _open_fds()
    image = ModelImage.of(b"weights")
    assert _open_fds() != before
    image.close()
    image.close()  # twice is fine
    assert _open_fds() == before
    ModelImage.of(b"weights")  # dropped unclosed: the finalizer closes it
    assert _open_fds() == before


def test_the_back_off_doubles_to_its_cap_and_an_open_resets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process, "OPEN_BACKOFF_S", 1.0)
    monkeypatch.setattr(process, "OPEN_BACKOFF_CAP_S", 3.0)
    backoff = OpenBackoff()
    assert backoff.refusal("rnn") is None
    assert [backoff.failed("no memory") for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]
    refused = backoff.refusal("rnn")
    assert refused is not None and "no memory" in str(refused)
    backoff.opened()
    assert backoff.refusal("rnn") is None and backoff.failures == 0
    backoff.failed("no memory")
    backoff.until = time.monotonic() - 1  # its time has passed
    assert backoff.refusal("rnn") is None and backoff.failures == 1
