"""Nothing trained is lost: when an export fails, the trained weights stay on disk and the
error says where they are and the exact command that retries the export.

Why here and not in export.py: export_model is atomic and leaves nothing behind on failure,
which is right for the model repository but wrong for hours of training; the callers that
hold a freshly trained model (train, zoo) wrap it with this.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rnnserve.trainer.checkpoint import CHECKPOINT_FILE, save_checkpoint
from rnnserve.trainer.errors import TrainerError

KEPT_DIR = ".unexported"  # under the model repository; the server skips dot directories


def retry_command(
    checkpoint: Path, out: Path, name: str, version: str, flags: Sequence[str] = ()
) -> str:
    args = ["rnn-trainer", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
    return shlex.join([*args, "--name", name, "--version", version, *flags])


# What a failed write raises: OSError from Python's own calls (mkdir, rename), RuntimeError
# (c10::Error) from torch.save's C++ zip writer, e.g. on a full disk ("unexpected pos ...") or
# for a file it cannot open. A RuntimeError of torch's about the data itself fails in the
# temp dir too, and is raised from there.
WRITE_ERRORS = (OSError, RuntimeError)


def keep(checkpoint: dict[str, Any], out: Path, name: str, version: str) -> Path:
    """Saves the checkpoint under OUT/.unexported/NAME/VERSION/ (or a temp dir if it cannot be
    written there: not writable, disk full) and returns its path."""
    try:
        return save_checkpoint(checkpoint, Path(out) / KEPT_DIR / name / version / CHECKPOINT_FILE)
    except WRITE_ERRORS:
        spare = Path(tempfile.mkdtemp(prefix=f"rnn-trainer-{name}-{version}-"))
        try:
            return save_checkpoint(checkpoint, spare / CHECKPOINT_FILE)
        except BaseException:
            shutil.rmtree(spare, ignore_errors=True)  # no empty temp dir left behind
            raise


def export_or_keep(
    export: Callable[[], Path],
    checkpoint: dict[str, Any],
    saved: Path | None,
    *,
    out: Path,
    name: str,
    version: str,
    retry_flags: Sequence[str] = (),
) -> Path:
    """Runs `export()`; on any failure keeps the model (at `saved` when that file exists, else
    it saves `checkpoint`) and raises a TrainerError naming the checkpoint and the retry.
    `out` is where the user asked the model to go (train --precision exports fp32 to a temp
    dir first: the retry goes to `out`, with `retry_flags` such as --precision int8)."""
    try:
        return export()
    except BaseException as exc:
        if isinstance(exc, TrainerError):
            reason = str(exc)
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"export failed: {type(exc).__name__}: {first}"
        if saved is not None and saved.is_file():
            path = saved
        else:
            try:
                path = keep(checkpoint, out, name, version)
            except WRITE_ERRORS as kept_exc:  # the spare place failed too: say so, no traceback
                if not isinstance(exc, Exception):  # Ctrl-C stays an interrupt (exit 130)
                    raise exc from kept_exc
                why = getattr(kept_exc, "strerror", None) or str(kept_exc).splitlines()[0][:200]
                raise TrainerError(
                    f"{reason}; the trained model could not be kept either (under {out} nor in"
                    f" a temp dir: {why})"
                ) from exc
        if not isinstance(exc, Exception):  # Ctrl-C: the model is kept, the interrupt goes on
            raise
        raise TrainerError(
            f"{reason}; the trained model is kept in {path}; retry the export with: "
            f"{retry_command(path, out, name, version, retry_flags)}"
        ) from exc
