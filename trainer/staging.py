"""Writes a model package atomically: build it in a temp dir beside the target, rename it in.

Why: the server scans models/<name>/<version>/ and must never see half a package, a failed
write must leave nothing behind, and a failed re-write must keep the old version. `export`
(trainer models) and `package` (graphs from elsewhere) both publish through this.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnserve.artifact.manifest import is_version_name
from rnnserve.trainer.errors import TrainerError

try:
    import fcntl
except ImportError:  # Windows: no flock, so leftovers of killed publishes stay
    fcntl = None  # type: ignore[assignment]


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
    out = Path(out_dir)
    for folder in (out / name, out, *out.parents):  # checked before any training
        if folder.exists() and not folder.is_dir():
            raise TrainerError(f"--out: {folder} is not a directory; packages go in OUT/NAME/N/")
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
    tmp, lock = _claimed_temp_dir(target)
    _remove_abandoned(target, tmp)
    try:
        try:
            yield tmp
            _replace_dir(tmp, target)
        except OSError as exc:  # a full disk, a quota, EACCES: one line, not a traceback
            where = f" ({exc.filename})" if exc.filename else ""
            raise TrainerError(
                f"cannot write the package {target}: {exc.strerror or exc}{where}"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; rmdir only removes an empty one
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _claimed_temp_dir(target: Path) -> tuple[Path, int | None]:
    """A new temp dir beside `target` and an fd holding a flock on it while this process
    stages there: the kernel drops the lock however the process ends (SIGKILL included), so a
    later publish tells a killed run's folder (removed) from a running one's (kept)."""
    for _ in range(3):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        except OSError as exc:  # e.g. OUT/NAME exists but belongs to the server's user
            raise TrainerError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
        try:
            lock = _lock(tmp)
        except OSError:  # another publish took it for a killed run's before it was locked
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
        return tmp, lock
    raise TrainerError(f"cannot claim a temp dir in {target.parent}: another publish removes it")


def _lock(folder: Path) -> int | None:
    """An fd holding an exclusive flock on `folder`, or None where there are no such locks
    (Windows, some network mounts). Raises OSError when another process holds the lock or
    the folder is gone."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.stat(folder), os.fstat(fd)):  # removed since it was opened
            raise FileNotFoundError(errno.ENOENT, "removed while being locked", str(folder))
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned(target: Path, keep: Path) -> None:
    """Removes the .VERSION.tmp-* folders of publishes killed before they ended (a half-staged
    package, or an old version swapped out but not yet removed): the server skips them, so
    they would fill the disk unseen. A folder a running publish holds is locked: kept."""
    for folder in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if folder == keep or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = _lock(folder)
        except OSError:  # a running publish's, or gone meanwhile
            continue
        if fd is None:  # no locks here: a running publish's folder cannot be told apart
            return
        try:
            _remove(folder)
        finally:
            os.close(fd)


def _replace_dir(new: Path, target: Path) -> None:
    """Moves `new` to `target`. An existing version is exchanged with it in one step where the
    system can (Linux renameat2), then removed: a scan, or a kill between two renames, never
    finds the version missing, and two runs publishing it at once both end with a whole one
    there. Elsewhere the old version is moved aside first, then removed."""
    _sync_tree(new)  # on the disk before it is published: the old version goes after this
    for _ in range(3):  # another publisher may put a version in, or take one out, meanwhile
        swapped = _exchange(new, target)
        if swapped is None:
            break
        if swapped:  # `new` now names the old version
            _sync_dir(target.parent)
            _remove(new)
            return
        try:
            new.rename(target)  # there was none: a plain rename is atomic
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        else:
            _sync_dir(target.parent)
            return
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
    _sync_dir(target.parent)
    if old is not None:
        _remove(old)


_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100
# what renameat2 answers where the kernel, the filesystem or a sandbox cannot exchange
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)


@functools.cache
def _renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+), or None off Linux or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _exchange(new: Path, target: Path) -> bool | None:
    """Swaps the two names atomically: True when done, False when `target` is not there,
    None when this system cannot swap (the caller moves the old version aside instead)."""
    call = _renameat2()
    if call is None:
        return None
    if call(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT and new.exists():
        return False
    if err in _NO_EXCHANGE:
        return None
    raise OSError(err, os.strerror(err), str(target))


def _remove(path: Path) -> None:
    """Removes a replaced version, whatever it was (a folder, a stray file or a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _sync_tree(folder: Path) -> None:
    """fsyncs a staged package's files and folders: without it a power loss soon after the
    rename can leave the published version with empty files, the old one already gone."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(PermissionError):  # a copied file the owner cannot read
                _fsync(path)
        elif path.is_dir():
            _sync_dir(path)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    """fsyncs a folder's entries where the system allows it (not on Windows, some mounts)."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
