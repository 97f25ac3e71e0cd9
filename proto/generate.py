"""Generates the committed gRPC stubs for every .proto under proto/ with one pinned protoc.

Why pinned, and why this old one: the gencode of grpcio-tools 1.62 (protobuf 4.25) carries no
runtime-version gate, so the same stubs import under every protobuf runtime from 4.21 to 7.x
(tests/e2e/test_protobuf_range.py proves both ends). grpcio-tools pins the protobuf major it
was built for, which would clash with the dev environment's protobuf 7, so the generator is
installed without its dependencies into its own folder: protoc is compiled into it and needs
no Python protobuf to run. The pin lives in pyproject.toml's `protoc` extra, nowhere else.

    python proto/generate.py              # rewrite the stubs in place (`make proto`)
    python proto/generate.py --out DIR    # write them under DIR (the staleness test)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
TOOLS_HOME = REPO_ROOT / ".venv" / "protoc"


def generator_pin() -> str:
    """The one grpcio-tools requirement, e.g. 'grpcio-tools==1.62.3'."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = project["optional-dependencies"]["protoc"]
    return pin


def proto_files() -> list[Path]:
    """Every .proto of the package, relative to proto/ (their import root)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "rnnserve").rglob("*.proto"))


def ensure_generator(pin: str) -> Path:
    """Installs the pinned grpcio-tools (no dependencies) once; returns its folder."""
    target = TOOLS_HOME / pin.replace("==", "-")
    if not (target / "grpc_tools").is_dir():
        TOOLS_HOME.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=TOOLS_HOME))
        try:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--target",
                    str(staging),
                    pin,
                ],
                check=True,
            )
            with contextlib.suppress(OSError):  # another run finished first: use theirs
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def generate(out: Path) -> list[Path]:
    """Runs protoc over every .proto into `out`; returns the .proto paths it compiled."""
    tools = ensure_generator(generator_pin())
    protos = proto_files()
    env = {**os.environ, "PYTHONPATH": str(tools)}
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *map(str, protos),
        ],
        check=True,
        cwd=PROTO_ROOT,
        env=env,
    )
    return protos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (proto/)")
    args = parser.parse_args()
    for proto in generate(args.out):
        print(f"generated stubs for {proto}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
