"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Servers the tests start (in process or as `rnn-server`) leave the HTTP port off unless a test
# asks for one: a fixed default port would collide between tests and between test runs.
os.environ.setdefault("RNNSERVE_HTTP_PORT", "0")

# CI runs the suite once and must not meet a counterexample by chance: there Hypothesis draws
# the same examples every run (new ones are found by running it locally, where it is random).
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile("ci", derandomize=True)
    hypothesis_settings.load_profile("ci")


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
