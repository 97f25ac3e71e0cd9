"""Writes a model package atomically: build it in a temp dir beside the target, rename it in.

Why: the server scans models/<name>/<version>/ and must never see half a package, a failed
write must leave nothing behind, and a failed re-write must keep the old version. `export`
(trainer models) and `package` (graphs from elsewhere) both publish through this.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rnnserve.artifact.manifest import is_version_name
from rnnserve.trainer.errors import TrainerError


def package_dir(out_dir: Path, name: str, version: str) -> Path:
    """OUT/NAME/VERSION, refusing names that are not plain directory names and versions the
    server would skip (server/repository.py loads only positive integers): train, export,
    precision and package would otherwise write a package no server ever serves."""
    if not name or "/" in name or name.startswith("."):
        raise TrainerError(f"model name {name!r} must be a plain, non-empty directory name")
    if not is_version_name(version):
        raise TrainerError(
            f"--version {version!r}: the server loads only versions named by a positive"
            " integer (1, 2, ...)"
        )
    if version.startswith("0"):  # "01" beside "1" is one version: the server serves only "1"
        raise TrainerError(
            f"--version {version!r}: write it without leading zeros ({version.lstrip('0')!r});"
            " the server counts both spellings as one version and serves only one of them"
        )
    return Path(out_dir) / name / version


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yields an empty temp dir; on success it replaces `target`, on any failure it goes,
    and so do the folders above it that this call created (OUT/NAME, OUT), if still empty."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainerError(f"cannot create {target.parent}: {exc.strerror}") from exc
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:  # e.g. OUT/NAME exists but belongs to the server's user
        raise TrainerError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; rmdir only removes an empty one
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Moves `new` to `target`; an existing version is swapped out, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:  # put the old version back rather than leave no version
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
