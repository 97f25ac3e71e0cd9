"""The wheel installs one top-level package, `rnnserve`, with every module, its data and types.

A user's own `client/`, `server/` or `trainer/` package must not collide with ours, so
nothing but `rnnserve` may sit at the top of site-packages; and a subpackage missing from
pyproject's package list would silently leave the wheel without it, so the wheel is compared
with the source folders package-dir maps.
"""

from __future__ import annotations

import re
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO_ROOT
from tests.unit.packaging.dist import BuiltDist

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DIST_INFO = re.compile(r"^rnnserve-[^/]+\.dist-info/")


def _wheel_names(dist: BuiltDist) -> list[str]:
    with zipfile.ZipFile(dist.wheel) as zf:
        return zf.namelist()


def _wheel_text(dist: BuiltDist, suffix: str) -> str:
    with zipfile.ZipFile(dist.wheel) as zf:
        (name,) = [n for n in zf.namelist() if DIST_INFO.match(n) and n.endswith(suffix)]
        return zf.read(name).decode()


def test_build_prints_no_warning(built_dist: BuiltDist) -> None:
    noisy = [
        line
        for line in built_dist.log.splitlines()
        if re.search(r"warn|deprecat", line, re.IGNORECASE)
    ]
    assert not noisy, "\n".join(noisy)


def test_only_rnnserve_is_top_level(built_dist: BuiltDist) -> None:
    assert _wheel_text(built_dist, "/top_level.txt").split() == ["rnnserve"]
    names = _wheel_names(built_dist)
    strays = [n for n in names if not n.startswith("rnnserve/") and not DIST_INFO.match(n)]
    assert not strays, strays


def test_wheel_ships_data_types_license_and_protos(built_dist: BuiltDist) -> None:
    names = set(_wheel_names(built_dist))
    for required in (
        "rnnserve/__init__.py",
        "rnnserve/py.typed",
        "rnnserve/v1/rnnserve.proto",
        "rnnserve/v1/rnnserve_pb2.py",
        "rnnserve/v1/rnnserve_pb2.pyi",
        "rnnserve/trainer/data/timemachine.txt",
    ):
        assert required in names, required
    assert any(DIST_INFO.match(n) and n.endswith("licenses/LICENSE") for n in names)


def _mapped_modules() -> set[str]:
    """Every .py inside a package folder that pyproject's package-dir maps, as wheel paths."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    wanted: set[str] = set()
    for package, folder in config["package-dir"].items():
        root = REPO_ROOT / folder
        prefix = package.replace(".", "/")
        for py in root.rglob("*.py"):
            rel = py.relative_to(root)
            parts = rel.parts[:-1]
            # only folders that are packages all the way down (examples and scripts are not)
            is_package = all(
                (root.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts) + 1)
            )
            if is_package and "__pycache__" not in parts:
                wanted.add(f"{prefix}/{rel.as_posix()}")
    return wanted


def test_every_source_module_is_in_the_wheel(built_dist: BuiltDist) -> None:
    """A subpackage left out of [tool.setuptools] packages would be missing after install."""
    missing = sorted(_mapped_modules() - set(_wheel_names(built_dist)))
    assert not missing, f"add their packages to pyproject's package list: {missing}"


def test_metadata_declares_the_tested_protobuf_range(built_dist: BuiltDist) -> None:
    metadata = _wheel_text(built_dist, "/METADATA")
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    requires = [n for n in metadata.splitlines() if n.startswith("Requires-Dist: protobuf")]
    assert requires == ["Requires-Dist: protobuf<8,>=4.21.6"], requires


def test_sdist_holds_license_and_sources(built_dist: BuiltDist) -> None:
    with tarfile.open(built_dist.sdist) as tf:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tf.getnames() if "/" in n}
    for required in ("LICENSE", "pyproject.toml", "README.md", "proto/rnnserve/v1/rnnserve.proto"):
        assert required in names, required
