"""The client works at both ends of the protobuf range pyproject declares, and beside
tritonclient[grpc] (which pins protobuf < 7) in one environment.

The committed stubs carry no runtime-version gate (proto/generate.py), so one wheel must
import and talk to a server under the oldest protobuf we declare (with the oldest grpcio) and
under the newest protobuf release below the declared ceiling. Each end gets an empty venv with
`rnnserve[client]` from the wheel, then calls a real server (the dev venv's) over gRPC.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib
from packaging.version import Version

from tests.conftest import REPO_ROOT
from tests.e2e.fresh_venv import make_venv, pip_install, run_python
from tests.e2e.served import rnn_server
from tests.unit.packaging.dist import shared_dist

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


def _declared(package: str) -> tuple[str, str]:
    """(lowest, ceiling) of a base dependency, e.g. ('4.21.6', '8') for protobuf."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{package}\b", d)]
    low = re.search(r">=\s*([\w.]+)", spec)
    high = re.search(r"<\s*([\w.]+)", spec)
    assert low, f"{spec}: declare a lower bound"
    return low.group(1), high.group(1) if high else ""


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("pb-server") / "server.log"
    with rnn_server(model_repo, log) as address:
        yield address


@pytest.fixture(scope="module")
def wheel() -> Path:
    return shared_dist().wheel


CLIENT_CALLS = """
import json, sys
import google.protobuf, grpc
from rnnserve.client import RnnClient
address = sys.argv[1] if len(sys.argv) > 1 else {address!r}
with RnnClient(address, timeout=30) as c:
    names = [m.name for m in c.list_models()]
    info = c.get_model("lstm")
    stream = c.generate("lstm", "the time", max_tokens=10, seed=7)
    events = list(stream)
    scored = c.score("lstm", ["the time traveller"])
print(json.dumps({{
    "protobuf": google.protobuf.__version__, "grpcio": grpc.__version__, "names": names,
    "default": info.default_version, "last": events[-1].is_last, "text": stream.text,
    "perplexity": scored[0].perplexity,
}}))
"""


def _pins(end: str) -> list[str]:
    pb_low, pb_ceiling = _declared("protobuf")
    grpc_low, _ = _declared("grpcio")
    if end == "lowest":
        return [f"protobuf=={pb_low}", f"grpcio=={grpc_low}"]
    if end == "beside-tritonclient":  # pins protobuf < 7: the reason for the range
        return ["tritonclient[grpc]"]
    return [f"protobuf<{pb_ceiling}" if pb_ceiling else "protobuf", "grpcio"]


ENDS = ("lowest", "highest", "beside-tritonclient")


@pytest.fixture(scope="module")
def venvs(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both venvs, installed side by side (the downloads overlap)."""

    def install(end: str) -> Path:
        python = make_venv(tmp_path_factory.mktemp(f"pb-{end}") / "venv")
        pip_install(python, f"rnnserve[client] @ {wheel.as_uri()}", *_pins(end))
        return python

    with ThreadPoolExecutor(len(ENDS)) as pool:
        return dict(zip(ENDS, pool.map(install, ENDS), strict=True))


@pytest.mark.parametrize("end", ENDS)
def test_client_at_each_end_of_the_protobuf_range(
    end: str, venvs: dict[str, Path], server: str
) -> None:
    pb_low, pb_ceiling = _declared("protobuf")
    grpc_low, _ = _declared("grpcio")
    proc = run_python(venvs[end], CLIENT_CALLS.format(address=server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if end == "lowest":
        assert Version(seen["protobuf"]) == Version(pb_low), seen
        assert Version(seen["grpcio"]) == Version(grpc_low), seen
    elif end == "highest":
        assert int(seen["protobuf"].split(".")[0]) == int(pb_ceiling) - 1, seen
    else:
        assert run_python(venvs[end], "import tritonclient.grpc").returncode == 0
        assert Version(seen["protobuf"]) < Version(pb_ceiling), seen
    assert "lstm" in seen["names"] and seen["default"] == "1" and seen["last"], seen
    assert seen["perplexity"] > 1.0, seen
