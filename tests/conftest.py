"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one tiny model of every architecture, trained once per session.

    Layout: <repo>/<name>/1/{model.onnx,manifest.json}; see trainer.zoo for the names.
    """
    from rnnserve.trainer.zoo import build_zoo

    out = tmp_path_factory.mktemp("models")
    build_zoo(out, preset="tiny")
    return out


def pytest_configure(config: pytest.Config) -> None:
    """Tiny models train and run far faster on one thread, and tests share two cores."""
    try:
        import torch
    except ImportError:  # a serve-only install has no torch
        return
    torch.set_num_threads(1)
