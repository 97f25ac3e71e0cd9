"""Fixtures the URL-repository tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def url(tmp_path: Path):
    """A memory:// repository of its own (the memory filesystem is one per process):
    (its URL, the filesystem, its root path)."""
    import fsspec  # the [remote] extra: the modules that use this skip without it

    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"
    yield f"memory://{root}", fs, root
    fs.rm(root, recursive=True)
