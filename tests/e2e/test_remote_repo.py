"""`--model-repo URL`: a real HTTP server (http.server's directory listings) and a real
S3-compatible server (moto's server mode) hold the repository; the server mirrors it.

Shows: the mirror fetches new versions, leaves unchanged ones alone, swaps changed ones in
whole (a half-downloaded version is never visible), removes vanished ones, and keeps the
cached copy when a download fails; a served URL answers Generate, and a broken version at the
URL is NOT_SERVING with its reason while the older one serves, exactly as in a local folder.
A version over --max-download-bytes (an endless body, a gzip body that expands) stops
downloading at the cap and is not cached; redirects are followed to other hosts, not from
https to plain http.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import logging
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.client import RnnClient
from rnnserve.server.remote_repo import (
    RemoteRepoError,
    RemoteRepository,
    is_remote,
    open_model_repo,
    redact,
)
from tests.e2e.served import free_port, rnn_server
from tests.tools import need_module

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """http.server's handler, quiet, with switches to fail, stall or cut short chosen paths."""

    failing: set[str]
    stall: dict[str, tuple[threading.Event, threading.Event]]
    cut: set[str]  # GET sends half the file, no Content-Length, and closes (HTTP/1.0)
    redirects: dict[str, str]  # path -> Location of a 302 (GET and HEAD)
    endless: dict[str, list[int]]  # GET sends zeros until the client leaves: bytes sent, here
    gzipped: set[str]  # GET sends the stored (gzip) bytes with Content-Encoding: gzip

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        if self.path in self.failing:
            self.send_error(500, "disk on fire")
            return None
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if self.command == "GET" and self.path in self.endless:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.endless[self.path].append(_send_until_gone(self.wfile))
            return None
        if self.command == "GET" and self.path in self.gzipped:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if self.command == "GET" and self.path in self.stall:
            reached, release = self.stall[self.path]
            reached.set()
            release.wait(30)
        if self.command == "GET" and self.path in self.cut:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            return None
        return super().send_head()


ENDLESS_LIMIT = 64 * 2**20  # an endless body ends here all the same: a failing test must end


def _send_until_gone(out) -> int:  # type: ignore[no-untyped-def]
    """Writes zeros until the client closes the connection; returns the bytes sent."""
    chunk, sent = bytes(2**16), 0
    with contextlib.suppress(OSError):  # BrokenPipeError, ConnectionResetError
        while sent < ENDLESS_LIMIT:
            out.write(chunk)
            sent += len(chunk)
    return sent


@contextlib.contextmanager
def http_repo(
    root: Path, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[str, type[_Handler]]]:
    """Serves `root` over HTTP (HTTPS with `tls`) on a free port; yields the repository URL
    and the handler."""
    switches = {"failing": set(), "stall": {}, "cut": set(), "redirects": {}, "endless": {},
                "gzipped": set()}  # fmt: skip
    handler = type("Handler", (_Handler,), switches)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/models", handler
    finally:
        server.shutdown()
        server.server_close()


def _publish(package: Path, remote_models: Path, name: str, version: str) -> Path:
    target = remote_models / name / version
    shutil.copytree(package, target)
    return target


def _break(version_dir: Path) -> None:
    (version_dir / "manifest.json").write_text("{ this is not json")


def test_urls_are_told_from_paths() -> None:
    assert is_remote("http://h/models") and is_remote("s3://bucket/models")
    assert not is_remote("models") and not is_remote(Path("/srv/models"))
    assert open_model_repo("file:///srv/models") == (Path("/srv/models"), None)


def test_mirror_fetches_swaps_removes_and_keeps_copies(model_repo: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    models = served / "models"
    lstm = model_repo / "lstm" / "1"
    _publish(lstm, models, "lstm", "1")
    cache = tmp_path / "cache"
    good = (lstm / "manifest.json").read_bytes()
    with http_repo(served) as (url, handler):
        mirror = RemoteRepository(url, cache)
        assert mirror.sync().fetched == ["lstm/1"]
        for f in lstm.iterdir():
            assert (cache / "lstm/1" / f.name).read_bytes() == f.read_bytes()

        assert mirror.sync().fetched == []  # unchanged: not downloaded again

        v2 = _publish(lstm, models, "lstm", "2")
        _break(v2)
        assert mirror.sync().fetched == ["lstm/2"]
        assert (cache / "lstm/2/manifest.json").read_text() == "{ this is not json"

        (v2 / "manifest.json").write_text((lstm / "manifest.json").read_text())  # fixed
        assert mirror.sync().fetched == ["lstm/2"]
        assert (cache / "lstm/2/manifest.json").read_bytes() == good

        # a failing download keeps the cached copy and is reported
        (v2 / "manifest.json").write_text((lstm / "manifest.json").read_text() + "\n")
        handler.failing.add("/models/lstm/2/manifest.json")
        report = mirror.sync()
        assert report.fetched == [] and report.failed[0].startswith("lstm/2: ")
        assert (cache / "lstm/2/manifest.json").read_bytes() == good
        handler.failing.clear()
        assert mirror.sync().fetched == ["lstm/2"]  # retried once the server recovers

        shutil.rmtree(v2)
        assert mirror.sync().removed == ["lstm/2"]
        assert not (cache / "lstm/2").exists() and (cache / "lstm/1").is_dir()


def test_the_mirror_removes_only_what_it_fetched_and_keeps_the_cache_when_the_url_lists_nothing(
    model_repo: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    _publish(model_repo / "lstm" / "1", served / "models", "lstm", "1")
    foreign = tmp_path / "home"
    (foreign / "projects" / "important").mkdir(parents=True)
    with http_repo(served) as (url, _):
        with pytest.raises(RemoteRepoError, match="not a mirror"):  # would delete projects/
            RemoteRepository(url, foreign)
        assert (foreign / "projects" / "important").is_dir()
        cache = tmp_path / "cache"
        mirror = RemoteRepository(url, cache)
        assert mirror.sync().fetched == ["lstm/1"]
        (cache / "mine" / "7").mkdir(parents=True)  # put there by hand: not the mirror's
        shutil.rmtree(served / "models" / "lstm")  # the URL now lists nothing (an error page)
        with pytest.raises(RemoteRepoError, match="lists no model versions"):
            mirror.sync()
        assert (cache / "lstm" / "1" / "model.onnx").is_file()
        _publish(model_repo / "lstm" / "1", served / "models", "gru", "1")
        assert mirror.sync().removed == ["lstm/1"]
        assert (cache / "mine" / "7").is_dir()


def test_credentials_in_the_url_stay_out_of_logs_and_errors() -> None:
    text = "cannot fetch m/1 from https://alice:s3cret@host/models: https://alice:s3cret@host/x"
    assert "s3cret" not in redact(text) and "alice" not in redact(text)
    assert redact(text).endswith("https://host/x")


def test_a_half_downloaded_version_is_never_visible(model_repo: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    _publish(model_repo / "lstm" / "1", served / "models", "lstm", "3")
    cache = tmp_path / "cache"
    reached, release = threading.Event(), threading.Event()
    with http_repo(served) as (url, handler):
        handler.stall["/models/lstm/3/model.onnx"] = (reached, release)
        mirror = RemoteRepository(url, cache)
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(mirror.sync()))
        worker.start()
        try:
            assert reached.wait(60), "the download never started"
            assert not (cache / "lstm" / "3").exists()
        finally:
            release.set()
            worker.join(60)
        assert done and (cache / "lstm/3/model.onnx").is_file()


def test_a_download_cut_short_is_not_swapped_in(tmp_path: Path) -> None:
    """A body without Content-Length ends when its connection does: cut short, it looked
    whole, was swapped in with its fingerprint and never fetched again."""
    version = tmp_path / "served" / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    (version / "model.onnx").write_bytes(bytes(range(200)))
    with http_repo(tmp_path / "served") as (url, handler):
        handler.cut.add("/models/m/1/model.onnx")
        mirror = RemoteRepository(url, tmp_path / "cache")
        report = mirror.sync()
        assert report.fetched == [], report
        assert "model.onnx: got 100 bytes, its listing says 200" in report.failed[0]
        assert not (mirror.cache / "m" / "1").exists()
        handler.cut.clear()
        assert mirror.sync().fetched == ["m/1"], "retried at the next sync"
    assert (mirror.cache / "m" / "1" / "model.onnx").read_bytes() == bytes(range(200))


def test_names_that_a_directory_listing_escapes_keep_their_spelling(
    model_repo: Path, tmp_path: Path
) -> None:
    """Listings link entries percent-encoded: "my model" was served as "my%20model", "modèle"
    as "mod%C3%A8le", a local repository's names under other ones. A link whose name would
    be a path ("%2E%2E%2F", "../") is no entry of that folder."""
    served = tmp_path / "served"
    for name in ("my model", "modèle", "a+b"):
        _publish(model_repo / "lstm" / "1", served / "models", name, "1")
    cache = tmp_path / "cache"
    with http_repo(served) as (url, _):
        mirror = RemoteRepository(url, cache)
        assert mirror.sync().fetched == ["a+b/1", "modèle/1", "my model/1"]
        assert (cache / "modèle" / "1" / "model.onnx").is_file()
        assert mirror.sync().fetched == [], "unchanged: not downloaded again"
        base = f"{mirror.root}/my%20model"
        listed = [{"name": f"{base}/%2E%2E%2Fescape", "type": "directory", "size": 0}]
        mirror.fs.ls = lambda path, detail=True: listed
        assert mirror._children(base) == []


def _generate(address: str, model: str) -> str:
    with RnnClient(address, timeout=30) as client:
        stream = client.generate(model, "the time", max_tokens=8, seed=1)
        tokens = list(stream)
        assert tokens and tokens[-1].is_last
        return stream.text


def _check_reload_rules(address: str, remote_models: Path, package: Path) -> None:
    """A broken version at the URL is NOT_SERVING; v1 keeps serving; removal unloads."""
    v2 = _publish(package, remote_models, "lstm", "2")
    _break(v2)
    with RnnClient(address, timeout=60) as client:
        result = client.reload_models()
        assert [f.split(":")[0] for f in result.failed] == ["lstm/2"], result
        info = client.get_model("lstm")
        broken = info.version("2")
        assert broken is not None and broken.status == "NOT_SERVING"
        assert "manifest" in broken.status_reason.lower() or "json" in broken.status_reason.lower()
        assert info.default_version == "1"
    assert _generate(address, "lstm")
    shutil.rmtree(v2)
    with RnnClient(address, timeout=60) as client:
        assert list(client.reload_models().unloaded) == ["lstm/2"]


@pytest.mark.slow
def test_server_serves_an_http_url(model_repo: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    package = model_repo / "lstm" / "1"
    _publish(package, served / "models", "lstm", "1")
    env = {"RNNSERVE_MODEL_CACHE": str(tmp_path / "cache")}
    with (
        http_repo(served) as (url, _),
        rnn_server(url, tmp_path / "server.log", env=env) as address,
    ):
        assert _generate(address, "lstm")
        _check_reload_rules(address, served / "models", package)


@pytest.mark.slow
def test_server_serves_an_s3_url(model_repo: Path, tmp_path: Path) -> None:
    boto3 = need_module("boto3", "the [dev] extra (moto[server])")
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # botocore's own setting: what an operator would set
    }
    try:
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        s3.create_bucket(Bucket="zoo")
        package = model_repo / "lstm" / "1"
        for f in package.iterdir():
            s3.upload_file(str(f), "zoo", f"repo/lstm/1/{f.name}")
        env = {**aws, "RNNSERVE_MODEL_CACHE": str(tmp_path / "cache")}
        with rnn_server("s3://zoo/repo", tmp_path / "server.log", env=env) as address:
            assert _generate(address, "lstm")
            s3.put_object(Bucket="zoo", Key="repo/lstm/2/manifest.json", Body=b"{ not json")
            s3.upload_file(str(package / "model.onnx"), "zoo", "repo/lstm/2/model.onnx")
            with RnnClient(address, timeout=60) as client:
                result = client.reload_models()
                assert [f.split(":")[0] for f in result.failed] == ["lstm/2"], result
                assert client.get_model("lstm").default_version == "1"
            assert _generate(address, "lstm")
    finally:
        moto.stop()


def test_unknown_protocol_stops_the_server_with_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rnnserve.server.main", "--model-repo", "nosuch://bucket/models",
         "--model-cache", str(tmp_path / "cache"), "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "nosuch://bucket/models" in proc.stderr and "nosuch" in proc.stderr.splitlines()[-1]


# -- what a URL may make the server do: bytes written, redirects followed -------------------
@pytest.mark.parametrize("body", ["endless", "gzip"])
def test_a_version_over_the_download_cap_stops_at_the_cap_and_is_not_cached(
    tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No cap: a repository that lists 100 bytes and sends an endless body (or 16 KiB of gzip
    that expands to 16 MiB) filled the cache's disk. The download stops at the cap, the
    version is failed like any other fetch, and the others are fetched."""
    served = tmp_path / "served" / "models"
    for name in ("small", "big"):
        (served / name / "1").mkdir(parents=True)
        (served / name / "1" / "manifest.json").write_text("{}")
    (served / "small" / "1" / "model.onnx").write_bytes(bytes(1000))
    path, cap = "/models/big/1/model.onnx", 2**20
    with http_repo(served.parent) as (url, handler):
        if body == "endless":
            (served / "big" / "1" / "model.onnx").write_bytes(bytes(100))  # what HEAD says
            handler.endless[path] = []
        else:
            (served / "big" / "1" / "model.onnx").write_bytes(gzip.compress(bytes(16 * 2**20)))
            handler.gzipped.add(path)
        mirror = RemoteRepository(url, tmp_path / "cache", max_bytes=cap)
        with caplog.at_level(logging.ERROR, logger="rnnserve.server.remote_repo"):
            report = mirror.sync()
    refused = f"model.onnx: the version's files pass --max-download-bytes ({cap} bytes)"
    assert report.fetched == ["small/1"], report
    assert len(report.failed) == 1 and report.failed[0].startswith("big/1: "), report
    assert refused in report.failed[0]
    assert "cannot fetch big/1" in caplog.text and refused in caplog.text
    assert not (mirror.cache / "big").exists()
    left = sorted(p.name for p in (mirror.cache / ".rnnserve-sync").iterdir())
    assert left == ["fingerprints", "lock"], "the partial download was left behind"
    if body == "endless":  # the handler's thread sees the client gone at its next write
        end = time.monotonic() + 30  # a bound, not a speed assertion
        while not handler.endless[path] and time.monotonic() < end:
            time.sleep(0.05)
        (sent,) = handler.endless[path]
        assert sent < ENDLESS_LIMIT, "the download went on past the cap"


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ...]:
    """(server context, client context that trusts it) for a self-signed 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return server, ssl.create_default_context(cafile=str(folder / "cert.pem"))


@pytest.mark.parametrize(
    "repo_scheme, blob_scheme, followed",
    [("http", "http", True), ("https", "https", True), ("https", "http", False)],
)
def test_redirects_to_other_hosts_are_followed_but_not_from_https_to_http(
    tmp_path: Path,
    tls_contexts: tuple[ssl.SSLContext, ...],
    repo_scheme: str,
    blob_scheme: str,
    followed: bool,
) -> None:
    """A presigned S3/GCS link redirects to another host: followed. One from https to plain
    http would hand the model to anyone on the path: refused, and its signature (a
    credential) stays out of the report."""
    server_tls, client_tls = tls_contexts
    blobs = tmp_path / "blobs"
    (blobs / "models").mkdir(parents=True)
    (blobs / "models" / "blob").write_bytes(b"weights" * 100)
    version = tmp_path / "served" / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    (version / "model.onnx").write_bytes(b"not what the redirect points at")
    with (
        http_repo(blobs, server_tls if blob_scheme == "https" else None) as (blob_url, _),
        http_repo(version.parents[2], server_tls if repo_scheme == "https" else None) as (
            url,
            handler,
        ),
    ):
        handler.redirects["/models/m/1/model.onnx"] = f"{blob_url}/blob?X-Amz-Signature=s3kr1t"
        mirror = RemoteRepository(url, tmp_path / "cache")
        mirror.fs.kwargs["ssl"] = client_tls  # what a CA bundle does for a real host
        report = mirror.sync()
    if followed:
        assert report.fetched == ["m/1"], report
        assert (mirror.cache / "m/1/model.onnx").read_bytes() == b"weights" * 100
    else:
        assert report.fetched == [] and len(report.failed) == 1, report
        assert "redirects to plain http" in report.failed[0], report.failed[0]
        assert "s3kr1t" not in report.failed[0]
        assert not (mirror.cache / "m").exists()


@pytest.mark.slow
def test_server_serves_the_rest_when_a_version_passes_the_download_cap(
    model_repo: Path, tmp_path: Path
) -> None:
    """RNNSERVE_MAX_DOWNLOAD_BYTES reaches the mirror; the version over it is absent, named
    in the log and in `reload`'s failed[], and the others serve."""
    served = tmp_path / "served"
    package = model_repo / "lstm" / "1"
    _publish(package, served / "models", "lstm", "1")
    big = _publish(package, served / "models", "big", "1")
    cap = sum(f.stat().st_size for f in package.iterdir()) + 2**20
    env = {
        "RNNSERVE_MODEL_CACHE": str(tmp_path / "cache"),
        "RNNSERVE_MAX_DOWNLOAD_BYTES": str(cap),
    }
    refused = f"model.onnx: the version's files pass --max-download-bytes ({cap} bytes)"
    log = tmp_path / "server.log"
    with http_repo(served) as (url, handler):
        handler.endless["/models/big/1/model.onnx"] = []
        with rnn_server(url, log, env=env) as address:
            assert _generate(address, "lstm")
            with RnnClient(address, timeout=60) as client:
                assert "big" not in [m.name for m in client.list_models()]
                failed = client.reload_models().failed
            assert len(failed) == 1 and failed[0].startswith("big/1: ") and refused in failed[0]
            assert _generate(address, "lstm")
    assert refused in log.read_text() and big.is_dir()
