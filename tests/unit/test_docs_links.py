"""Every relative link and #anchor in README.md and docs/*.md leads somewhere.

Why: facts live in one place and the others link to it ("each fact once"), so a renamed
heading or a moved file silently turns a doc's pointer into a dead end. Anchors follow
GitHub's rule: lowercase, backticks and punctuation other than '-' and '_' dropped, spaces
to '-', a repeated heading gets -1, -2, ...
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the text may hold one level of [brackets]
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked (their '#' lines are no headings)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower().replace("`", ""))
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: Counter[str] = Counter()
    for line in prose_lines(path.read_text()):
        if m := HEADING.match(line):
            s = slug(m.group(2))
            found.add(f"{s}-{seen[s]}" if seen[s] else s)
            seen[s] += 1
        found.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', line))
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link that is not a URL; links inside code spans are text."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text()), 1):
        # a code span may be a link's text ([`x`](f.md)); one holding "](" is code, not a link
        line = re.sub(r"`[^`]*`", lambda m: "``" if "](" in m.group(0) else m.group(0), line)
        for m in LINK.finditer(line):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                found.append((number, target))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, target in relative_links(path):
        file, _, fragment = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{where} (no such heading)")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_checker_finds_a_dead_file_and_a_dead_anchor(tmp_path: Path, monkeypatch) -> None:
    """The test above cannot pass vacuously: a missing file, a missing heading and a heading
    repeated past its count are each reported; a good link, a URL and code are not."""
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "b.md").write_text("# Top `x` (y)\n## Top x y\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#top-x-y) [ok2](b.md#top-x-y-1) [web](https://example.com/#nope)\n"
        "[gone](c.md) [no](b.md#nowhere) [third](b.md#top-x-y-2) `[code](c.md)`\n"
        "```\n[fenced](c.md)\n```\n"
    )
    assert broken_links(page) == [
        "a.md:2: c.md (no such file)",
        "a.md:2: b.md#nowhere (no such heading)",
        "a.md:2: b.md#top-x-y-2 (no such heading)",
    ]
