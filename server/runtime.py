"""ONNX Runtime sessions and the recurrent state they carry, batched along `batch_axis`.

One `OnnxModel` per loaded model version. `run` is synchronous (call it from a worker
thread: see `Runtime.call`); state helpers are pure numpy, so the scheduler can batch
streams by concatenation and split them again without knowing the architecture.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.artifact.external_data import check_self_contained
from rnnserve.artifact.manifest import Manifest, ManifestError, StateSpec
from rnnserve.server import decode_head
from rnnserve.server.model_image import ModelImage

log = logging.getLogger(__name__)
T = TypeVar("T")

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}

State = list[np.ndarray]  # one array per manifest.state entry, batch on spec.batch_axis


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Maps short names to ORT providers, keeping only available ones (logged); CPU last resort."""
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    for name in requested:
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full in available:
            chosen.append(full)
        else:
            log.warning(
                "execution provider %s is not available in this onnxruntime build; skipping",
                full,
                extra={"available": sorted(available)},
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class ModelChanged(RuntimeError):
    """A model file differs from the one the server loaded under that version."""


class OnnxModel:
    """An inference session plus the manifest's interface: input, output and state tensors."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        providers: Sequence[str],
        intra_op_threads: int,
        with_head: bool = True,
        sha256: str | None = None,
        keep_image: bool = False,
    ) -> None:
        """`keep_image`: keep the bytes (sealed, `self.image`) for decode processes, which
        build their sessions from them (server/model_image.py); `sha256`: refuse a file
        whose digest differs (the decode process checks its copy against the loaded one)."""
        # One read serves the digest and both sessions: a file replaced in place between
        # reads (a remote repository's sync) would otherwise pass the check and serve other
        # weights.
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise ModelChanged(
                f"{path} changed since the server loaded this version (sha256 {digest[:12]}... "
                f"is not {sha256[:12]}...); publish changes as a new version number"
            )
        expected = (manifest.onnx_sha256 or "").strip().lower()  # hex is case-blind
        if expected and digest != expected:
            raise ManifestError(
                f"{Path(path).name} sha256 {digest[:12]}... does not match the manifest's "
                f"{manifest.onnx_sha256[:12]}..."
            )
        # before onnxruntime sees them: it would read a tensor's external file from wherever
        # its location leads, relative to the working directory (`/` in the image)
        check_self_contained(data)
        self.args = (Path(path), manifest, list(providers), intra_op_threads, with_head, digest)
        folder = Path(path).parent  # <model>/<version>: the memfd's name in /proc/<pid>/fd
        image_name = f"{folder.parent.name}/{folder.name}"
        self.image = ModelImage.of(data, image_name) if keep_image else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ONNX protobuf only, as check_self_contained reads it: onnxruntime otherwise also
        # takes its own ORT flatbuffer format, recognised from the bytes, which it does not
        options.add_session_config_entry("session.load_model_format", "ONNX")
        self.session = ort.InferenceSession(data, options, providers=list(providers))
        self.manifest = manifest
        self.specs: list[StateSpec] = list(manifest.state)
        self.provider = self.session.get_providers()[0]
        self._outputs = [manifest.output_name] + [s.output for s in self.specs]
        self._head_outputs = [decode_head.TOKEN, decode_head.LOGPROB, *self._outputs[1:]]
        self._init = [_init_element(s) for s in self.specs]
        self._check_interface()
        self.has_head = False
        if with_head:
            headed = _headed_session(data, path, manifest, options, self.session.get_providers())
            if headed is not None:  # replaces the plain session: one copy of the weights
                self.session, self.has_head = headed, True

    def _check_interface(self) -> None:
        head = decode_head.PREFIX
        inputs = {i.name for i in self.session.get_inputs() if not i.name.startswith(head)}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = {self.manifest.input_name} | {s.input for s in self.specs}
        want_out = set(self._outputs)
        if want_in != inputs or not want_out <= outputs:
            raise ValueError(
                f"graph interface does not match the manifest: graph inputs {sorted(inputs)}, "
                f"outputs {sorted(outputs)}; manifest wants {sorted(want_in)} -> {sorted(want_out)}"
            )

    # -- state ------------------------------------------------------------------------------
    def initial_state(self, batch: int) -> State:
        """Fresh state for `batch` streams, broadcast from the manifest's init value."""
        return [
            np.repeat(np.expand_dims(init, s.batch_axis), batch, axis=s.batch_axis)
            for s, init in zip(self.specs, self._init, strict=True)
        ]

    def concat(self, states: Sequence[State]) -> State:
        """Joins per-stream (or per-batch) states along each tensor's batch axis."""
        if len(states) == 1:
            return list(states[0])
        return [
            np.concatenate([st[i] for st in states], axis=s.batch_axis)
            for i, s in enumerate(self.specs)
        ]

    def take(self, state: State, index: Sequence[int] | int) -> State:
        """Selects batch elements (an int keeps the batch axis with size 1)."""
        idx = [index] if isinstance(index, int) else list(index)
        return [np.take(t, idx, axis=s.batch_axis) for t, s in zip(state, self.specs, strict=True)]

    def split(self, state: State) -> list[State]:
        """One batch-of-1 state per batch element."""
        if not self.specs:
            return []
        n = state[0].shape[self.specs[0].batch_axis]
        return [self.take(state, i) for i in range(n)]

    # -- inference --------------------------------------------------------------------------
    def run(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One ORT call: x [batch, time] int64 (or [batch, time, 1] float32) -> (output, state)."""
        feeds: dict[str, np.ndarray] = {self.manifest.input_name: x}
        for s, t in zip(self.specs, state, strict=True):
            feeds[s.input] = t
        out = self.session.run(self._outputs, feeds)
        return out[0], list(out[1:])

    def decode(
        self, x: np.ndarray, state: State, rows: decode_head.RowParams, uniform: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, State]:
        """One call through the decode head (`has_head` only): x [batch, time] -> (each row's
        next token [batch] int64, its logprob [batch] float32, state)."""
        feeds = {self.manifest.input_name: x, **rows.feeds}
        if rows.kind != "greedy":
            feeds[decode_head.UNIFORM] = uniform
        for s, t in zip(self.specs, state, strict=True):
            feeds[s.input] = t
        out = self.session.run(self._head_outputs, feeds)
        return out[0], out[1], list(out[2:])


def _headed_session(
    data: bytes,
    path: Path,
    manifest: Manifest,
    options: ort.SessionOptions,
    providers: list[str],
) -> ort.InferenceSession | None:
    """The lm graph with the decode head appended (tokens picked inside ORT). Other tasks,
    graphs the head does not fit, or a head ORT refuses get None: the model still serves,
    picking tokens in numpy."""
    if manifest.task != "lm":
        return None
    try:
        graph = decode_head.attach(onnx.load_model_from_string(data), manifest.output_name)
        if graph is None:
            return None
        return ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
    except Exception as exc:  # the plain session loaded, so this is the head's fault
        log.warning("no decode head for %s (decode steps pick tokens in numpy): %s", path, exc)
        return None


def _init_element(spec: StateSpec) -> np.ndarray:
    """The init value of one batch element: shape without the batch axis."""
    shape = [d for i, d in enumerate(spec.shape) if i != spec.batch_axis]
    value = np.asarray(spec.init, dtype=spec.dtype)
    return np.ascontiguousarray(np.broadcast_to(value, shape))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis (logits may be unnormalised)."""
    z = logits.astype(np.float32, copy=False)
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


class Runtime:
    """The thread pool that keeps ONNX Runtime off the event loop."""

    def __init__(self, threads: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ort")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
