"""A loaded model's bytes for its decode processes (`--decode-process 1`): a sealed memfd.

Why: a child that opened `model.onnx` by path ran whatever the file held when it started:
nothing once the version's folder was removed, other weights once it was rewritten, not
what the server loaded and checked. So the loader seals the very bytes it built its session
from (and checked against the manifest's sha256) into a memfd nobody can write, grow or
shrink; every child of the version, a restarted one too, inherits the descriptor
(`pass_fds`) and builds its session from those bytes. The copy lives in the kernel, not in
the server's Python heap, and is not mapped, so it counts to the server's cgroup (as shmem)
but not to its resident memory.
"""

from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class ModelImage:
    """The sealed copy; `fd` stays open (and the memory held) until `close` or until the
    image is dropped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    @classmethod
    def of(cls, data: bytes, name: str = "model") -> ModelImage:
        """`data` in a new sealed memfd."""
        fd = os.memfd_create(f"rnnserve:{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    @staticmethod
    def path_in_child(fd: int) -> Path:
        """Where a process that inherited the descriptor reads the bytes: opening it there
        starts at byte 0 whatever another process read of it."""
        return Path(f"/proc/self/fd/{fd}")

    def close(self) -> None:
        self._close()
