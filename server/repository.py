"""The model repository: models/<name>/<version>/{model.onnx,manifest.json}, every version loaded.

A version that cannot be used (bad manifest, unknown format, sha256 mismatch, ORT refuses
the graph) is kept as NOT_SERVING with its reason, so GetModel can say what is wrong while the
other models serve. The default version of a model is its highest SERVING version. A version
is its number, as in Triton: "7" finds folder "007", and of two folders of one number only one
is that version (`Repository._keepers`); the other is NOT_SERVING, naming it.
`load_new()` + `install()` are the seam for hot reload: load new directories (off the event
loop), then publish them and report removed ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rnnserve.artifact.manifest import (
    ONNX_FILE,
    Manifest,
    ManifestError,
    is_version_name,
)
from rnnserve.artifact.ort_errors import ort_reason
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
    same_as: str = ""  # the folder of the same number that is this version (set: NOT_SERVING)

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
    """What a scan changed, as "name/version" strings (failed ones carry ": reason"), and what
    the sync of a URL repository before it failed to do (no change: it is retried each time).
    Admin.ReloadModels replies with both in `failed`."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    sync_failed: list[str] = field(default_factory=list)


Loader = Callable[[Path, Manifest], OnnxModel]
LoadObserver = Callable[[ModelVersion], None]


class SyncOutcome(Protocol):
    """What a sync reports (server/remote_repo.py's SyncReport): its failed downloads, as
    "name/version: reason" strings."""

    failed: list[str]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isascii() and version.isdigit() else (-1, version)


def _spelling_key(version: str) -> tuple[int, str]:
    """Among folders of one number, the shortest spelling ("7" before "07" before "007")."""
    return (len(version), version)


class Repository:
    """Loaded model versions, keyed by name then version."""

    def __init__(
        self,
        root: Path,
        loader: Loader,
        on_load: LoadObserver | None = None,
        sync: Callable[[], SyncOutcome | None] | None = None,
    ) -> None:
        self.root = Path(root)
        self._loader = loader
        self._on_load = on_load
        self._sync = sync  # fills `root` from a URL first (server/remote_repo.py); None: local
        self._sync_failed: list[str] = []  # the last load_new's sync failures, for install
        self._odd: set[Path] = set()  # folders the last scan warned about (once each)
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
        entries and every (name, version) directory present; the sync's failures wait for
        `install` to report them (rescans run one at a time).
        """
        loaded: list[ModelVersion] = []
        seen: set[tuple[str, str]] = set()
        self._sync_failed = []
        if self._sync is not None:
            try:
                outcome = self._sync()
            except Exception as exc:  # the URL is down: keep serving what the cache holds
                log.error("model repository sync failed, scanning the cached copy: %s", exc)
                self._sync_failed.append(
                    f"model repository sync: {_one_line(exc)} (the cached copy was scanned)"
                )
            else:  # a failed download is logged by the sync; the reply must say so too
                self._sync_failed.extend(getattr(outcome, "failed", None) or [])
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
        odd: set[Path] = set()
        for model_dir in model_dirs:
            if model_dir.name.startswith("."):
                continue
            if not _is_text(model_dir.name):
                odd.add(model_dir)
                if model_dir not in self._odd:  # once, not at every poll
                    log.warning(
                        "ignoring model folder %s: its name is not UTF-8, which no gRPC "
                        "reply or /metrics page can carry (rename it)",
                        ascii(str(model_dir)),
                    )
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
            numbered = []
            for version_dir in version_dirs:
                if is_version_name(version_dir.name):
                    numbered.append(version_dir)
                elif not version_dir.name.startswith("."):  # hidden: `..data`, `.git`
                    odd.add(version_dir)
                    if version_dir not in self._odd:  # once, not at every poll
                        log.warning(
                            "ignoring %s: version directories are positive integers", version_dir
                        )
            keepers = self._keepers(model_dir.name, [p.name for p in numbered])
            for version_dir in numbered:
                name, version = model_dir.name, version_dir.name
                seen.add((name, version))
                known = self.models.get(name, {}).get(version)
                keeper = keepers[int(version)]
                if keeper != version:  # "007" beside "7": one version, not two
                    if known is None or known.same_as != keeper:
                        loaded.append(self._same_number(name, version, version_dir, keeper))
                    continue
                if (
                    known is not None
                    and not known.same_as
                    and (known.serving or known.mtime == _changed(version_dir))
                ):
                    continue
                loaded.append(self._load(name, version, version_dir))
        self._odd = odd
        return loaded, seen

    def _keepers(self, name: str, versions: list[str]) -> dict[int, str]:
        """For each version number, the folder that is that version: the one SERVING now (a
        SERVING version is never replaced in place), else the shortest spelling ("7", not
        "007"). The other folders of that number are NOT_SERVING."""
        known = self.models.get(name, {})
        by_number: dict[int, list[str]] = {}
        for version in versions:
            by_number.setdefault(int(version), []).append(version)
        keepers: dict[int, str] = {}
        for number, spellings in by_number.items():
            serving = [v for v in spellings if v in known and known[v].serving]
            keepers[number] = min(serving or spellings, key=_spelling_key)
        return keepers

    def _same_number(self, name: str, version: str, path: Path, keeper: str) -> ModelVersion:
        """A folder whose number another folder already is: NOT_SERVING, naming that one."""
        entry = ModelVersion(name=name, version=version, path=path, same_as=keeper)
        entry.reason = (
            f"version folder {version!r} has the same number as {keeper!r}, which is version "
            f"{int(version)}: remove or renumber one of them"
        )
        _log_not_serving(entry)
        if self._on_load:
            self._on_load(entry)
        return entry

    def install(self, loaded: list[ModelVersion], seen: set[tuple[str, str]]) -> ReloadReport:
        """Publishes what `load_new` loaded; reports the versions whose directory vanished,
        and what its sync failed to bring (a URL repository)."""
        report = ReloadReport(sync_failed=self._sync_failed)
        self._sync_failed = []
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
            # the loader checks onnx_sha256 on the bytes it builds the session from
            entry.model = self._loader(onnx_path, entry.manifest)
        except Exception as exc:  # any failure makes this one version NOT_SERVING
            entry.model = None
            entry.reason = _one_line(exc)
            _log_not_serving(entry)
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
            entry = _find(versions, version)
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
        entry = _find(self.versions(name), version)
        if entry is None:
            raise UnknownModel(f"model {name!r} has no version {version!r}")
        return entry

    def all_versions(self) -> Sequence[ModelVersion]:
        return [v for name in self.names() for v in self.versions(name)]


def _find(versions: list[ModelVersion], version: str) -> ModelVersion | None:
    """A version is its number: "7" finds the folder that is version 7, whether it is spelled
    "7" or "007" (one folder per number is; the others of that number are NOT_SERVING)."""
    if is_version_name(version):
        number = version.lstrip("0")  # digits without leading zeros: equal iff equal numbers
        found = next(
            (v for v in versions if not v.same_as and v.version.lstrip("0") == number), None
        )
        if found is not None:
            return found
    return next((v for v in versions if v.version == version), None)


def _is_text(name: str) -> bool:
    """False for a file name that is not UTF-8 (Python keeps its bytes as lone surrogates):
    served, it broke every ListModels reply and the whole /metrics page, which encode it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _changed(path: Path) -> float:
    """Newest change of a version directory and its files (0 if unreadable): modification or
    status change time, so a fix that writes nothing (chmod, chown) is seen as a change too.
    Links count by themselves and by their target, so a re-pointed link is a change, and a
    dangling one (a file it cannot stat) does not hide the changes of the others."""
    try:
        entries = [path, *path.iterdir()]
    except OSError:
        return 0.0
    newest = 0.0
    for entry in entries:
        for stat in (entry.lstat, entry.stat):
            try:
                s = stat()
            except OSError:  # dangling, or removed since the listing
                continue
            newest = max(newest, s.st_mtime, s.st_ctime)
    return newest


def _log_not_serving(entry: ModelVersion) -> None:
    log.error(
        "model %s/%s is NOT_SERVING: %s",
        entry.name,
        entry.version,
        entry.reason,
        extra={"model": entry.name, "version": entry.version},
    )


def _one_line(exc: BaseException) -> str:
    """A failure's reason for NOT_SERVING and the log: ORT's without its C++ noise."""
    return ort_reason(str(exc), limit=500) or type(exc).__name__
