"""Version folders are positive integers in ASCII digits; anything else is skipped with a
warning, never an exception that stops every scan ("²".isdigit() is true in Python)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rnnserve.server.repository import Repository, is_version_name


@pytest.mark.parametrize(
    ("name", "ok"), [("1", True), ("12", True), ("0", False), ("²", False), ("１", False),
                     ("-1", False), ("v1", False), ("", False), ("00", False), ("007", True),
                     ("9" * 5000, True), ("0" * 5000, False)],  # past int()'s 4300 digits
)  # fmt: skip
def test_version_names(name: str, ok: bool) -> None:
    assert is_version_name(name) is ok


def test_a_scan_skips_odd_version_folders(tmp_path: Path, caplog) -> None:
    for name in ("²", "0", "x"):
        (tmp_path / "m" / name).mkdir(parents=True)

    def never(path, manifest):  # nothing here is a version: nothing is loaded
        raise AssertionError(path)

    with caplog.at_level(logging.WARNING):
        loaded, seen = Repository(tmp_path, never).load_new()
    assert loaded == [] and seen == set()
    assert caplog.text.count("version directories are positive integers") == 3
