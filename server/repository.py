"""The model repository: models/<name>/<version>/{model.onnx,manifest.json}, every version loaded.

A version that cannot be used (bad manifest, unknown format, sha256 mismatch, ORT refuses
the graph) is kept as NOT_SERVING with its reason, so GetModel can say what is wrong while the
other models serve. The default version of a model is its highest SERVING version.
`load_new()` + `install()` are the seam for hot reload: load new directories (off the event
loop), then publish them and report removed ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rnnserve.artifact.manifest import ONNX_FILE, Manifest, ManifestError, sha256_file
from rnnserve.server.errors import BadRequest, UnknownModel, UnsupportedTask
from rnnserve.server.runtime import OnnxModel

log = logging.getLogger(__name__)

RPCS_BY_TASK = {
    "lm": ["Generate", "Score", "Infill"],
    "infill": ["Infill"],
    "forecast": ["Forecast"],
}


@dataclass
class ModelVersion:
    """One version directory: its manifest and session when SERVING, its reason when not."""

    name: str
    version: str
    path: Path
    manifest: Manifest | None = None
    model: OnnxModel | None = None
    reason: str = ""
    load_seconds: float = 0.0
    mtime: float = 0.0  # newest change time in the directory when it was loaded

    @property
    def serving(self) -> bool:
        return self.model is not None

    @property
    def status(self) -> str:
        return "SERVING" if self.serving else "NOT_SERVING"

    @property
    def rpcs(self) -> list[str]:
        return RPCS_BY_TASK.get(self.manifest.task, []) if self.manifest else []


@dataclass
class ReloadReport:
    """What a scan changed, as "name/version" strings (failed ones carry ": reason")."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


Loader = Callable[[Path, Manifest], OnnxModel]
LoadObserver = Callable[[ModelVersion], None]


def is_version_name(name: str) -> bool:
    """A version folder is a positive integer in ASCII digits ("²".isdigit() is true too)."""
    return name.isascii() and name.isdigit() and int(name) >= 1


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isascii() and version.isdigit() else (-1, version)


class Repository:
    """Loaded model versions, keyed by name then version."""

    def __init__(
        self,
        root: Path,
        loader: Loader,
        on_load: LoadObserver | None = None,
        sync: Callable[[], object] | None = None,
    ) -> None:
        self.root = Path(root)
        self._loader = loader
        self._on_load = on_load
        self._sync = sync  # fills `root` from a URL first (server/remote_repo.py); None: local
        self.models: dict[str, dict[str, ModelVersion]] = {}

    # -- loading ----------------------------------------------------------------------------
    def scan(self) -> ReloadReport:
        """Loads and installs in one go (startup, before the server takes calls)."""
        return self.install(*self.load_new())

    def load_new(self) -> tuple[list[ModelVersion], set[tuple[str, str]]]:
        """Loads every version directory not loaded yet, and every NOT_SERVING one whose files
        changed since it failed (fixed in place: retried under the same number).

        Changes nothing the server reads, so hot reload runs it in a worker thread while
        streams go on; `install` then publishes the result on the event loop. Returns the new
        entries and every (name, version) directory present.
        """
        loaded: list[ModelVersion] = []
        seen: set[tuple[str, str]] = set()
        if self._sync is not None:
            try:
                self._sync()
            except Exception as exc:  # the URL is down: keep serving what the cache holds
                log.error("model repository sync failed, scanning the cached copy: %s", exc)
        try:
            model_dirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as exc:  # a mount gone, a folder being swapped: not "every model removed"
            log.error(
                "cannot list model repository %s (%s): the %d loaded versions are kept",
                self.root,
                exc.strerror or exc,
                len(self._present()),
            )
            return loaded, self._present()
        for model_dir in model_dirs:
            if model_dir.name.startswith("."):
                continue
            try:
                version_dirs = sorted(p for p in model_dir.iterdir() if p.is_dir())
            except FileNotFoundError:  # removed while this scan ran: its versions unload
                continue
            except OSError as exc:  # unreadable: what it served keeps serving, the rest go on
                log.error(
                    "cannot list %s (%s): its loaded versions are kept",
                    model_dir,
                    exc.strerror or exc,
                    extra={"model": model_dir.name},
                )
                seen.update(k for k in self._present() if k[0] == model_dir.name)
                continue
            for version_dir in version_dirs:
                if not is_version_name(version_dir.name):
                    log.warning(
                        "ignoring %s: version directories are positive integers", version_dir
                    )
                    continue
                seen.add((model_dir.name, version_dir.name))
                known = self.models.get(model_dir.name, {}).get(version_dir.name)
                if known is not None and (known.serving or known.mtime == _changed(version_dir)):
                    continue
                loaded.append(self._load(model_dir.name, version_dir.name, version_dir))
        return loaded, seen

    def install(self, loaded: list[ModelVersion], seen: set[tuple[str, str]]) -> ReloadReport:
        """Publishes what `load_new` loaded; reports the versions whose directory vanished."""
        report = ReloadReport()
        for entry in loaded:
            self.models.setdefault(entry.name, {})[entry.version] = entry
            tag = f"{entry.name}/{entry.version}"
            if entry.serving:
                report.loaded.append(tag)
            else:
                report.failed.append(f"{tag}: {entry.reason}")
        for name, versions in self.models.items():
            for version in versions:
                if (name, version) not in seen:
                    report.unloaded.append(f"{name}/{version}")
        return report

    def _present(self) -> set[tuple[str, str]]:
        """Every (name, version) loaded now, whatever its status."""
        return {(name, version) for name, versions in self.models.items() for version in versions}

    def remove(self, name: str, version: str) -> None:
        """Forgets a version: no new call reaches it (running streams hold their entry)."""
        versions = self.models.get(name, {})
        versions.pop(version, None)
        if not versions:
            self.models.pop(name, None)

    def _load(self, name: str, version: str, path: Path) -> ModelVersion:
        entry = ModelVersion(name=name, version=version, path=path, mtime=_changed(path))
        start = time.perf_counter()
        try:
            entry.manifest = Manifest.load(path)
            if entry.manifest.task == "forecast":  # a series it cannot undo: said now, not per call
                from rnnserve.server.forecasting import Series  # it imports this module

                Series.from_manifest(entry.manifest.series)
            onnx_path = path / ONNX_FILE
            if not onnx_path.is_file():
                raise ManifestError(f"{ONNX_FILE} is missing")
            if entry.manifest.onnx_sha256:
                digest = sha256_file(onnx_path)
                if digest != entry.manifest.onnx_sha256:
                    raise ManifestError(
                        f"{ONNX_FILE} sha256 {digest[:12]}... does not match the manifest's "
                        f"{entry.manifest.onnx_sha256[:12]}..."
                    )
            entry.model = self._loader(onnx_path, entry.manifest)
        except Exception as exc:  # any failure makes this one version NOT_SERVING
            entry.model = None
            entry.reason = _one_line(exc)
            log.error(
                "model %s/%s is NOT_SERVING: %s",
                name,
                version,
                entry.reason,
                extra={"model": name, "version": version},
            )
        entry.load_seconds = time.perf_counter() - start
        if entry.serving:
            log.info(
                "loaded model %s/%s (%s, %s) in %.3fs on %s",
                name,
                version,
                entry.manifest.task,
                entry.manifest.architecture,
                entry.load_seconds,
                entry.model.provider,
                extra={"model": name, "version": version},
            )
        if self._on_load:
            self._on_load(entry)
        return entry

    # -- lookup -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.models)

    def versions(self, name: str) -> list[ModelVersion]:
        """Every loaded version of `name`, highest first."""
        if name not in self.models:
            raise UnknownModel(f"model {name!r} is not in the repository")
        found = self.models[name].values()
        return sorted(found, key=lambda v: _version_key(v.version), reverse=True)

    def default_version(self, name: str) -> ModelVersion | None:
        return next((v for v in self.versions(name) if v.serving), None)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The requested version (or the default); NOT_FOUND or FAILED_PRECONDITION otherwise."""
        if not name:
            raise BadRequest("model", "is required")
        versions = self.versions(name)
        if version:
            entry = next((v for v in versions if v.version == version), None)
            if entry is None:
                raise UnknownModel(f"model {name!r} has no version {version!r}")
        else:
            entry = next((v for v in versions if v.serving), versions[0] if versions else None)
            if entry is None:
                raise UnknownModel(f"model {name!r} has no versions")
        if not entry.serving:
            raise UnsupportedTask(f"model {name}/{entry.version} is NOT_SERVING: {entry.reason}")
        return entry

    def get_any(self, name: str, version: str) -> ModelVersion:
        """A version whatever its status (GetModel describes NOT_SERVING ones too)."""
        entry = next((v for v in self.versions(name) if v.version == version), None)
        if entry is None:
            raise UnknownModel(f"model {name!r} has no version {version!r}")
        return entry

    def all_versions(self) -> Sequence[ModelVersion]:
        return [v for name in self.names() for v in self.versions(name)]


def _changed(path: Path) -> float:
    """Newest change of a version directory and its files (0 if unreadable): modification or
    status change time, so a fix that writes nothing (chmod, chown) is seen as a change too."""
    try:
        stats = [path.stat(), *(p.stat() for p in path.iterdir())]
    except OSError:
        return 0.0
    return max(max(s.st_mtime, s.st_ctime) for s in stats)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:500]
