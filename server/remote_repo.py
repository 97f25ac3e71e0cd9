"""A model repository at a URL (http(s)://, s3://, any fsspec protocol), mirrored to a local cache.

The layout at the URL is the local one, <url>/<name>/<version>/<files>. Over HTTP the server
must answer a GET on each folder URL (ending in '/') with an HTML page linking its entries by
relative or same-host links, as `python -m http.server`, nginx `autoindex on` or Apache's
directory index do. S3 (and other object stores) list prefixes natively.

`sync()` runs at start and before every rescan (SIGHUP, --poll-interval, Admin.ReloadModels).
Each version folder is compared by fingerprint (file names, sizes, ETag or Last-Modified) with
what the cache holds. A new or changed version downloads into a temporary folder beside the
cache and is renamed into place only once complete, so a scan never sees half a version; a
version gone from the URL is removed from the cache, so the repository unloads it. Whatever the
download brings is then loaded by the same rules as a local folder: a broken version is
NOT_SERVING with its reason. A version whose download fails keeps its previous cached copy (or
stays absent) and is retried at the next sync. A file lock lets --workers share one cache.

What a URL may make the server do: one version writes at most --max-download-bytes (counted
as the bytes are written, after any gzip decoding: a lying listing or an expanding body stops
there, not at a full disk); one HTTP listing page is read up to MAX_LISTING_BYTES, no further
(it is held in memory); and over HTTP(S) redirects are followed to any host (presigned
S3/GCS URLs redirect elsewhere; aiohttp drops the Authorization header across origins) except
from https to plain http. A version refused for its size is remembered with its fingerprint
and the cap: later syncs do not download it again until either changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from rnnserve.artifact.manifest import is_version_name
from rnnserve.server.settings import DEFAULT_MAX_DOWNLOAD_BYTES

try:  # the [remote] extra; RemoteRepository says so when it is missing
    from fsspec.callbacks import Callback
except ImportError:  # pragma: no cover - only the base class of _Counted is missing then
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

STATE_DIR = ".rnnserve-sync"  # hidden: the repository scan skips folders starting with '.'
# the user info ends at the last '@' before the host (a password may hold '@' unescaped, as
# yarl and urllib read it); the host part ends at the first '/', '?' or '#'
_USERINFO = re.compile(r"(://)[^/?#\s]*@")
LOCAL_SCHEMES = ("", "file")
# one HTTP listing page (a model or version folder's index) is read into memory up to this:
# an nginx or http.server index of 50,000 entries is about 8 MiB
MAX_LISTING_BYTES = 8 * 2**20


def redact(text: str) -> str:
    """`text` with the user and password of every URL in it removed (they go in logs)."""
    return _USERINFO.sub(r"\1", text)


class RemoteRepoError(Exception):
    """The URL cannot be used (unknown protocol, the `remote` extra missing, bad cache dir)."""


class DownloadTooLarge(Exception):
    """A version's files passed --max-download-bytes: the version is not cached."""


class ListingTooLarge(Exception):
    """An HTTP listing page passed MAX_LISTING_BYTES: the folder is not listed."""


class RedirectRefused(Exception):
    """An https URL redirected to plain http: the body could be read or changed on the way."""


def is_remote(location: str | Path) -> bool:
    """True for URLs other than file://; local paths (and Path objects) are not remote."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() not in LOCAL_SCHEMES


def default_cache_dir(url: str) -> Path:
    """$XDG_CACHE_HOME/rnnserve/models/<hash of the URL>: one mirror per URL."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return base / "rnnserve" / "models" / digest


@dataclass
class SyncReport:
    """What one sync changed in the cache, as "name/version" strings."""

    fetched: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class RemoteRepository:
    """Mirrors <url>/<name>/<version>/ folders into `cache`, one version at a time."""

    def __init__(
        self,
        url: str,
        cache: Path | None = None,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_listing_bytes: int = MAX_LISTING_BYTES,
    ) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise RemoteRepoError(
                f"--model-repo {redact(url)} needs fsspec: pip install 'rnnserve[remote]'"
            ) from exc
        self.max_bytes = max_bytes  # per version; 0 = no cap
        try:
            if url.partition("://")[0].lower() in ("http", "https"):
                trace = {"trace_configs": [_redirect_policy()]}
                self.fs, self.root = _capped_http_fs(trace, max_listing_bytes), url
            else:
                self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise RemoteRepoError(f"--model-repo {redact(url)}: {redact(str(exc))}") from exc
        self.url = url
        self.shown = redact(url)  # for logs and errors
        self.root = self.root.rstrip("/")
        self.cache = Path(cache) if cache else default_cache_dir(url)
        try:
            foreign = self.cache.is_dir() and not (self.cache / STATE_DIR).is_dir()
            if foreign and any(self.cache.iterdir()):
                raise RemoteRepoError(
                    f"model cache {self.cache} holds files that are not a mirror of a model "
                    "repository (a sync removes what the URL does not list): give an empty "
                    "or a new folder"
                )
            (self.cache / STATE_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RemoteRepoError(f"model cache {self.cache}: {exc}") from exc

    # -- listing ---------------------------------------------------------------------------------
    def _children(self, path: str) -> list[dict[str, Any]]:
        """Direct children of a folder, each with 'base' (its last name, the local one) and
        'path' (where to fetch it). An HTTP listing links names percent-encoded ("my%20model",
        "mod%C3%A8le"): the local name is the decoded one, as a local repository spells it."""
        entries = self.fs.ls(path + "/" if self._is_http else path, detail=True)
        children = []
        for entry in entries:
            child = entry["name"].rstrip("/")
            parent, _, link = child.rpartition("/")
            if parent != path or not link or "?" in link:
                continue  # parent links, sort links
            base = unquote(link) if self._is_http else link
            if base.startswith(".") or "/" in base or "\0" in base:
                continue  # hidden files, and names that would be paths in the cache
            children.append({**entry, "base": base, "path": child})
        return children

    @property
    def _is_http(self) -> bool:
        protocols = self.fs.protocol
        protocols = protocols if isinstance(protocols, tuple) else (protocols,)
        return bool({"http", "https"} & set(protocols))

    def _files(self, path: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every file under a version folder, by relative path, with its listing details."""
        found: dict[str, dict[str, Any]] = {}
        for entry in self._children(path):
            rel = prefix + entry["base"]
            if entry.get("type") == "directory":
                found.update(self._files(entry["path"], rel + "/"))
            else:
                found[rel] = entry
        return found

    def _fingerprint(self, files: dict[str, dict[str, Any]]) -> list[list[Any]]:
        """[name, size, change marker] per file; HTTP listings carry none, so HEAD each file."""
        marks = []
        for rel, entry in sorted(files.items()):
            info = entry
            if self._is_http:
                info = {**entry, **self.fs.info(entry["path"])}
            change = next(
                (str(info[k]) for k in ("ETag", "LastModified", "Last-Modified", "mtime")
                 if info.get(k) is not None),
                "",
            )  # fmt: skip
            marks.append([rel, info.get("size"), change])
        return marks

    def _listed(self) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
        """(name, version) -> the version folder's remote path (positive integer versions),
        and the models whose folder's listing was too large to read (name -> why): those are
        skipped, the others synced; any other listing failure raises."""
        found, unlisted = {}, {}
        for model in self._children(self.root):
            if model.get("type") != "directory":
                continue
            try:
                versions = self._children(model["path"])
            except ListingTooLarge as exc:
                unlisted[model["base"]] = redact(str(exc))
                continue
            for version in versions:
                if version.get("type") == "directory" and is_version_name(version["base"]):
                    found[(model["base"], version["base"])] = version["path"]
        return found, unlisted

    # -- syncing ---------------------------------------------------------------------------------
    def sync(self) -> SyncReport:
        """Brings the cache in line with the URL (see the module docstring for the rules)."""
        report = SyncReport()
        remembered = 0  # refusals of earlier syncs: logged then, not at every poll
        with self._locked():
            self._clear_leftovers()
            self.fs.invalidate_cache()
            try:  # a listing failure raises: the cache stays as it is
                remote, unlisted = self._listed()
            except Exception as exc:
                raise RemoteRepoError(f"cannot list {self.shown}: {redact(str(exc))}") from exc
            mirrored = self._cached_versions()
            if not remote and not unlisted and mirrored:  # an error page answered 200, a wrong URL
                raise RemoteRepoError(
                    f"{self.shown} lists no model versions; the {len(mirrored)} cached ones "
                    f"are kept (empty {self.cache} to drop them)"
                )
            for name, why in sorted(unlisted.items()):  # its cached versions stay as they are
                log.error("cannot list model %s at %s: %s", name, self.shown, why)
                report.failed.append(
                    f"{name}: cannot list its versions at {self.shown} (its cached versions "
                    f"are kept; retried at the next sync): {why}"
                )
            for (name, version), path in sorted(remote.items()):
                tag = f"{name}/{version}"
                try:
                    if self._sync_version(name, version, path):
                        report.fetched.append(tag)
                except RefusedBefore as exc:  # logged at ERROR when it was refused
                    log.debug("not fetching %s again: %s", tag, exc)
                    remembered += 1
                    report.failed.append(
                        f"{tag}: not fetched from {self.shown} (refused before; fetched again "
                        f"once its files at the URL or --max-download-bytes change): {exc}"
                    )
                except Exception as exc:
                    why = redact(str(_reason(exc)))
                    log.error("cannot fetch %s from %s: %s", tag, self.shown, why)
                    report.failed.append(
                        f"{tag}: cannot fetch from {self.shown} (retried at the next sync): {why}"
                    )
            kept = {(n, v) for n, v in mirrored if n in unlisted}
            for name, version in sorted(mirrored - set(remote) - kept):
                self._remove(name, version)
                report.removed.append(f"{name}/{version}")
            self._forget_refusals(set(remote) | kept)
        if report.fetched or report.removed or len(report.failed) > remembered:
            log.info(
                "model repository %s synced into %s",
                self.shown,
                self.cache,
                extra={"fetched": report.fetched, "removed": report.removed},
            )
        return report

    def _sync_version(self, name: str, version: str, path: str) -> bool:
        files = self._files(path)
        marks = self._fingerprint(files)
        fingerprint = json.dumps(marks)
        sizes = {rel: size for rel, size, _ in marks}
        state = self._state_file(name, version)
        target = self.cache / name / version
        if target.is_dir() and state.is_file() and state.read_text() == fingerprint:
            return False
        refusal = json.dumps({"fingerprint": fingerprint, "max_bytes": self.max_bytes})
        why = _refused(state, refusal)
        if why is not None:
            raise RefusedBefore(why)
        try:
            self._fetch(name, version, files, sizes, fingerprint)
        except Exception as exc:
            if isinstance(_reason(exc), DownloadTooLarge):  # the same files will be again
                _remember_refusal(state, refusal, redact(str(_reason(exc))))
            raise
        _refusal_file(state).unlink(missing_ok=True)
        return True

    def _fetch(
        self,
        name: str,
        version: str,
        files: dict[str, dict[str, Any]],
        sizes: dict[str, int | None],
        fingerprint: str,
    ) -> None:
        """Downloads one version whole, then swaps it into the cache with its fingerprint."""
        state = self._state_file(name, version)
        target = self.cache / name / version
        budget = DownloadBudget(self.max_bytes)
        budget.check_listed(sizes)  # a version listed over the cap is not even started
        incoming = Path(tempfile.mkdtemp(prefix=f"{name}-{version}-", dir=self.cache / STATE_DIR))
        staged = state.with_name(f"{version}.json.new")  # not a *.json: not a fetched version
        try:
            for rel, entry in files.items():
                local = incoming / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(entry["path"], str(local), callback=budget.counter(rel))
                budget.landed(rel, local)
                _check_size(rel, local, sizes[rel])
            # the fingerprint is written before the swap: a full disk fails here, with the old
            # copy in place, not after it, leaving a version no later sync would ever remove
            state.parent.mkdir(parents=True, exist_ok=True)
            staged.write_text(fingerprint)
            self._swap_in(incoming, target)
            staged.replace(state)  # a rename: it needs no space
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
            staged.unlink(missing_ok=True)

    def _swap_in(self, incoming: Path, target: Path) -> None:
        """Renames the complete download into place; an older copy is moved aside first."""
        target.parent.mkdir(parents=True, exist_ok=True)
        retired = None
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix="retired-", dir=self.cache / STATE_DIR))
            target.rename(retired / "v")
        incoming.rename(target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def _clear_leftovers(self) -> None:
        """Removes the download and retired folders of a sync that was killed (OOM, a liveness
        probe during a long fetch): each would hold a model's size in the cache for good. Only
        under the lock: another worker's sync, running, holds it."""
        for entry in (self.cache / STATE_DIR).iterdir():
            if entry.is_dir() and entry.name != "fingerprints":
                log.info("removing %s, left by a sync that did not finish", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def _cached_versions(self) -> set[tuple[str, str]]:
        """The versions this mirror fetched (each has its fingerprint): only those may go."""
        prints = self.cache / STATE_DIR / "fingerprints"
        if not prints.is_dir():
            return set()
        return {
            (model.name, state.stem)
            for model in prints.iterdir()
            if model.is_dir()
            for state in model.glob("*.json")
        }

    def _forget_refusals(self, listed: set[tuple[str, str]]) -> None:
        """Drops the refusals of versions the URL no longer lists."""
        prints = self.cache / STATE_DIR / "fingerprints"
        for refusal in prints.glob(f"*/*{REFUSED}") if prints.is_dir() else ():
            if (refusal.parent.name, refusal.name.removesuffix(REFUSED)) not in listed:
                refusal.unlink(missing_ok=True)

    def _remove(self, name: str, version: str) -> None:
        shutil.rmtree(self.cache / name / version, ignore_errors=True)
        self._state_file(name, version).unlink(missing_ok=True)
        _refusal_file(self._state_file(name, version)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.cache / name).rmdir()  # only once its last version is gone

    def _state_file(self, name: str, version: str) -> Path:
        return self.cache / STATE_DIR / "fingerprints" / name / f"{version}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.cache / STATE_DIR / "lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class RefusedBefore(Exception):
    """The version's files, as listed now, were refused for their size by an earlier sync
    under the same --max-download-bytes: not downloaded again (each try wrote up to the cap)."""


REFUSED = ".refused"  # beside a version's fingerprint: not a *.json, so no fetched version


def _refusal_file(state: Path) -> Path:
    return state.with_name(state.stem + REFUSED)


def _refused(state: Path, key: str) -> str | None:
    """Why the version was refused, if it was with this `key` (fingerprint and cap)."""
    try:
        record = json.loads(_refusal_file(state).read_text())
    except (OSError, ValueError):  # none, or unreadable: try the download
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    return str(record.get("why", "over --max-download-bytes"))


def _remember_refusal(state: Path, key: str, why: str) -> None:
    """Records a refusal beside the fingerprints (the cache's own, shared by --workers); a
    full disk only means the next sync downloads it again."""
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
        _refusal_file(state).write_text(json.dumps({"key": key, "why": why}))
    except OSError as exc:
        log.warning("cannot record that %s was refused: %s", state.stem, exc)


def _reason(exc: BaseException) -> BaseException:
    """The exception a failed fetch reports: a refusal of ours where one caused it. fsspec's
    HTTP driver turns any failure of a HEAD into a bare FileNotFoundError(url), which said
    nothing of a redirect refused."""
    cause: BaseException | None = exc
    for _ in range(8):  # a chain, not a cycle
        if cause is None:
            break
        if isinstance(cause, (RedirectRefused, DownloadTooLarge, ListingTooLarge)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return exc


def _check_size(rel: str, local: Path, listed: int | None) -> None:
    """Raises OSError when a download is not the size its listing gave. Why: a body that ends
    with its connection (no Content-Length) cut short looks complete to the HTTP client, and
    with the listing's fingerprint recorded, no later sync would ever fetch it again."""
    got = local.stat().st_size
    if listed is not None and got != listed:
        raise OSError(f"{rel}: got {got} bytes, its listing says {listed} (cut short or changed)")


class DownloadBudget:
    """The bytes one version's download may write (--max-download-bytes; 0 = no cap).

    Counted while the bytes stream in: fsspec's drivers (HTTP, S3, ...) report each chunk
    they write to the transfer callback, which raises as the count passes the cap, so at most
    one read (5 MiB over HTTP) more reaches the disk, and the download stops there. A driver
    that reports nothing is caught as soon as its file is written."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0  # bytes of the files already written

    def check(self, rel: str, more: int) -> None:
        """Raises DownloadTooLarge when `more` bytes of `rel` do not fit beside the others."""
        if self.cap and self.used + more > self.cap:
            raise DownloadTooLarge(
                f"{rel}: the version's files pass --max-download-bytes ({self.cap} bytes); "
                "raise it, or 0 for no cap"
            )

    def check_listed(self, sizes: dict[str, int | None]) -> None:
        """Refuses a version whose listed sizes alone pass the cap, before any download."""
        listed = 0
        for rel, size in sizes.items():
            listed += size or 0
            self.check(rel, listed)

    def counter(self, rel: str) -> _Counted:
        return _Counted(self, rel)

    def landed(self, rel: str, local: Path) -> None:
        """Counts a written file by its size on disk (the truth, whatever the driver said)."""
        self.used += local.stat().st_size
        self.check(rel, 0)


class _Counted(Callback):
    """fsspec's transfer callback for one file: `size` is what the server announced
    (Content-Length), `value` what has been written so far."""

    def __init__(self, budget: DownloadBudget, rel: str) -> None:
        super().__init__()
        self.budget = budget
        self.rel = rel

    def call(self, hook_name: str | None = None, **kwargs: Any) -> None:
        announced = self.size if isinstance(self.size, int) else 0
        self.budget.check(self.rel, max(self.value, announced))


def is_downgrade(source: str, target: str) -> bool:
    """True for a redirect from https to plain http (`target` may be relative)."""
    from yarl import URL

    try:
        resolved = URL(source).join(URL(target))
    except ValueError:
        return False  # aiohttp refuses a Location that is no URL itself
    return URL(source).scheme == "https" and resolved.scheme == "http"


def _redirect_policy() -> Any:
    """aiohttp's hook on every redirect a listing, HEAD or download meets: a downgrade from
    https to plain http is refused (RedirectRefused); any other is followed, to any host,
    up to aiohttp's 10 redirects."""
    import aiohttp

    async def on_redirect(session: Any, context: Any, params: Any) -> None:
        location = params.response.headers.get("Location", "")
        if is_downgrade(str(params.url), location):
            params.response.close()
            # no query string in the message: a presigned URL's signature is a credential
            shown = redact(str(params.url.with_query(None)))
            raise RedirectRefused(
                f"{shown} redirects to plain http ({redact(location.split('?')[0])}): refused, "
                "a redirect may not downgrade https"
            )

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    return trace


def _capped_http_fs(client_kwargs: dict[str, Any], max_listing_bytes: int) -> Any:
    """fsspec's HTTP filesystem, whose listings read at most `max_listing_bytes` of a page.
    fsspec reads a whole listing page into memory: an endless or huge index (a wrong URL, a
    hostile server) would take all of it. A fresh instance, not fsspec's cached one."""
    from fsspec.implementations.http import HTTPFileSystem

    class ListingCapped(HTTPFileSystem):
        async def _ls_real(self, url: str, detail: bool = True, **kwargs: Any) -> Any:
            """HTTPFileSystem._ls_real (fsspec 2024-2026), the page read up to the cap."""
            session = await self.set_session()
            async with session.get(self.encode_url(url), **self.kwargs) as r:
                self._raise_not_found_for_status(r, url)
                mimetype = r.headers.get("Content-Type", "").partition(";")[0] or None
                links: list[str] = []
                if mimetype in ("text/html", None):
                    page = await _read_capped(r, max_listing_bytes, url)
                    links = _links(_text(page, r.charset), self.simple_links)
            out = _resolve_links(url, links, self.same_schema)
            if not out and url.endswith("/"):
                out = set(await self._ls_real(url.rstrip("/"), detail=False))
            if detail:
                return [
                    {"name": u, "size": None, "type": "directory" if u.endswith("/") else "file"}
                    for u in out
                ]
            return sorted(out)

    return ListingCapped(client_kwargs=client_kwargs, skip_instance_cache=True)


async def _read_capped(response: Any, cap: int, url: str) -> bytes:
    """The body of an aiohttp response (decoded, if gzip: what is held in memory), or
    ListingTooLarge as soon as it passes `cap` bytes; the rest is never read."""
    too_large = ListingTooLarge(
        f"the listing {redact(url)} is over {cap} bytes, the most a listing page is read: "
        "check the URL, or split the folder"
    )
    announced = response.content_length
    if announced is not None and not response.headers.get("Content-Encoding") and announced > cap:
        raise too_large
    body = bytearray()
    async for chunk in response.content.iter_chunked(2**16):
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)


def _text(page: bytes, charset: str | None) -> str:
    try:
        return page.decode(charset or "utf-8", "ignore")
    except LookupError:  # a charset Python does not know
        return page.decode("utf-8", "ignore")


_HREF = re.compile(r"""<(a|A)\s+(?:[^>]*?\s+)?(href|HREF)=["'](?P<url>[^"']+)""")
_SIMPLE_LINK = re.compile(r"""(?P<url>http[s]?://[-a-zA-Z0-9@:%_+.~#?&/=]+)""")


def _links(text: str, simple_links: bool) -> list[str]:
    """The links of a listing page, as fsspec's HTTP driver finds them."""
    links = [m.group("url") for m in _HREF.finditer(text)]
    if simple_links:
        links = [m.group("url") for m in _SIMPLE_LINK.finditer(text)] + links
    return links


def _resolve_links(url: str, links: list[str], same_schema: bool) -> set[str]:
    """The entries of folder `url` among `links` (fsspec's rules): same-host absolute paths
    and relative links below it, full URLs below it, no parent link."""
    out: set[str] = set()
    parts = urlparse(url)
    below = url.rstrip("/") + "/"
    for link in links:
        if link.startswith("/") and len(link) > 1:  # an absolute path on this server
            link = f"{parts.scheme}://{parts.netloc}{link}"
        if link.startswith("http"):
            if same_schema and link.startswith(below):
                out.add(link)
            elif link.replace("https", "http").startswith(below.replace("https", "http")):
                out.add(link)  # http <-> https may cross
        elif link not in ("..", "../"):
            out.add("/".join([url.rstrip("/"), link.lstrip("/")]))
    return out


def open_model_repo(
    location: str | Path, cache: str = "", max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
) -> tuple[Path, RemoteRepository | None]:
    """The local folder the Repository scans, and the mirror that fills it (None if local)."""
    if not is_remote(location):
        text = str(location)
        return Path(text.removeprefix("file://")), None
    remote = RemoteRepository(str(location), Path(cache) if cache else None, max_bytes)
    return remote.cache, remote
