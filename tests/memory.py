"""A cap on this process's address space, for tests that prove a computation stays small."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def address_space_cap(headroom: int) -> Iterator[None]:
    """Caps this process's address space at what it maps now plus `headroom` bytes, so an
    allocation far past it fails at once whatever the machine's overcommit policy."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc (Linux) to read the address space in use")
    mapped = next(line for line in status.read_text().splitlines() if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (int(mapped.split()[1]) * 1024 + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
