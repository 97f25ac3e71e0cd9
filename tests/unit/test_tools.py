"""tests/tools.py: a prerequisite a test lacks skips it locally and fails it in CI, for Python
packages as for executables; and no test skips around it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tools import need, need_module

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_module_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"no_such_module_xyz.*CI must have it"):
        need_module("no_such_module_xyz", "the [dev] extra")


def test_a_missing_module_or_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_xyz"):
        need_module("no_such_module_xyz", "the [dev] extra")
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz not installed"):
        need("no-such-tool-xyz", "nothing")


def test_a_present_module_and_tool_are_returned(tmp_path: Path) -> None:
    assert need_module("json", "stdlib").dumps([]) == "[]"
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\n")
    assert need("mytool", "here", beside=tmp_path) == str(tool)


def test_no_test_skips_on_a_missing_package_or_tool_by_itself() -> None:
    """pytest.importorskip and skipif(shutil.which(...)) skip in CI as well: a CI image whose
    [dev] extra or tool failed to install passed with those tests silently skipped."""
    pattern = re.compile(r"importorskip\(|skipif\(\s*shutil\.which")
    offenders = [
        f"{path.relative_to(TESTS)}:{n}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != "test_tools.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == [], "use tests.tools.need / need_module instead"
