"""The wheel in empty venvs, as a user installs it: `rnnserve[serve]` serves a model package
and answers Generate without torch or dev tools; `rnnserve[train]` trains and exports; a
user's own `client/` and `server/` packages live beside ours without shadowing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.fresh_venv import clean_env, importable, make_venv, pip_install, run_python
from tests.e2e.served import rnn_server
from tests.unit.packaging.dist import shared_dist

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]

TORCH_PIN = "torch==2.13.0"  # any other spec may pull a multi-GB CUDA build


@pytest.fixture(scope="module")
def wheel() -> Path:
    return shared_dist().wheel


@pytest.fixture(scope="module")
def serve_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    python = make_venv(tmp_path_factory.mktemp("serve") / "venv")
    pip_install(python, f"rnnserve[serve] @ {wheel.as_uri()}")
    return python


def test_serve_install_has_no_torch_and_no_dev_tools(serve_python: Path) -> None:
    for absent in ("torch", "pytest", "grpc_tools", "client", "server", "trainer"):
        assert not importable(serve_python, absent), absent
    for present in ("rnnserve.server.main", "rnnserve.client", "onnxruntime"):
        assert importable(serve_python, present), present
    for cli in ("rnn-server", "rnn-client", "rnn-trainer"):
        proc = subprocess.run(
            [str(serve_python.parent / cli), "--version"], capture_output=True, text=True,
            env=clean_env(), timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.strip() == f"{cli} 0.1.0", proc


def test_serve_install_serves_and_answers_generate(
    serve_python: Path, model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "lstm", repo / "lstm")
    with rnn_server(repo, tmp_path / "server.log", python=serve_python) as address:
        code = (
            "from rnnserve.client import RnnClient\n"
            f"with RnnClient({address!r}, timeout=30) as c:\n"
            "    s = c.generate('lstm', 'the time', max_tokens=12, seed=3)\n"
            "    events = list(s)\n"
            "    assert events[-1].is_last, events[-1]\n"
            "    print(len(events), repr(s.text))\n"
        )
        proc = run_python(serve_python, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] != "0"


def test_user_packages_named_client_and_server_neither_shadow_nor_are_shadowed(
    serve_python: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    for name in ("client", "server", "trainer"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    code = (
        "import client, server, trainer\n"
        "from rnnserve.client import RnnClient\n"
        "import rnnserve.server.main, rnnserve.client.cli\n"
        "assert client.OWNER == 'user client' and server.OWNER == 'user server', 'shadowed'\n"
        "assert trainer.OWNER == 'user trainer'\n"
        "assert RnnClient.__module__.startswith('rnnserve.client'), RnnClient.__module__\n"
        "print('ok')\n"
    )
    proc = run_python(serve_python, code, cwd=project)  # the cwd comes first on sys.path
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_train_install_trains_and_exports(wheel: Path, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv")
    pip_install(python, TORCH_PIN)  # first, so the extra's identical pin finds it installed
    pip_install(python, f"rnnserve[train] @ {wheel.as_uri()}")
    assert not importable(python, "pytest")
    out = tmp_path / "models"
    proc = subprocess.run(
        [str(python.parent / "rnn-trainer"), "zoo", "--out", str(out), "--preset", "tiny",
         "--only", "gru", "--no-progress"],
        capture_output=True, text=True, env=clean_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    manifest = json.loads((out / "gru" / "1" / "manifest.json").read_text())
    assert manifest["task"] == "lm"
    assert (out / "gru" / "1" / "model.onnx").stat().st_size > 0
