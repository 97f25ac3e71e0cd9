"""The one exception the trainer raises for bad input or a failed check.

Why one class: the CLI turns exactly this into ``error: <message>`` and exit status 2, so a
user never sees a traceback for a mistake they can fix; anything else is a bug.
"""

from __future__ import annotations


class TrainerError(Exception):
    """A one-line, user-facing reason why training, sampling or export cannot go on."""


class AgreedError(TrainerError):
    """Every rank of a data-parallel run reaches it together, from all-reduced values (a loss
    that is not finite, a diverged run): rank 0 says it, the others end quietly."""


def os_reason(exc: OSError) -> str:
    """Why a write failed, in words: `mkdir(exist_ok=True)` over a file raises "File exists",
    which read as if the folder were there already (`--run-dir small.txt`)."""
    if isinstance(exc, FileExistsError) and exc.filename is not None:
        return f"{exc.filename} is a file, not a directory"
    return exc.strerror or str(exc)
