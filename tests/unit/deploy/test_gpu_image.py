"""deploy/Dockerfile.gpu: the pinned onnxruntime-gpu is built for the CUDA major version of
the image it is installed on (a mismatch only shows on a GPU host, as a CUDA provider that
silently falls back to CPU), and the build step checks the pin took effect."""

from __future__ import annotations

import re

from tests.unit.deploy.deployfiles import DEPLOY, dockerfile_stages


# From PyPI's metadata of the onnxruntime-gpu wheels (Requires-Dist of extra "cuda"):
# nvidia-cuda-runtime-cu12 ~=12.0 for 1.19..1.26, CUDA 13 (nvidia-cuda-runtime ~=13.0 or
# -cu13) from 1.27 on. Recorded in the Dockerfile's comment too, where the pin is chosen.
def cuda_major_of_ort_gpu(version: str) -> int:
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (1, 19), "before 1.19 PyPI's default build was CUDA 11.8"
    return 12 if (major, minor) <= (1, 26) else 13


def _cuda_major(image: str) -> int:
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu[\d.]+", image)
    assert match, f"expected an nvidia/cuda cudnn runtime base, got {image}"
    return int(match.group(1))


def _pin() -> str:
    build = dockerfile_stages(DEPLOY / "Dockerfile.gpu")[0]
    (arg,) = [a for a in build.args("ARG") if a.startswith("ORT_GPU_VERSION=")]
    return arg.split("=", 1)[1]


def test_mapping_matches_what_pypi_says() -> None:
    assert cuda_major_of_ort_gpu("1.26.0") == 12
    assert cuda_major_of_ort_gpu("1.27.0") == 13
    assert cuda_major_of_ort_gpu("1.31.1") == 13


def test_pinned_onnxruntime_gpu_matches_the_cuda_base() -> None:
    stages = dockerfile_stages(DEPLOY / "Dockerfile.gpu")
    majors = {_cuda_major(stage.base) for stage in stages}
    assert len(majors) == 1, "build and runtime stages on the same CUDA"
    assert cuda_major_of_ort_gpu(_pin()) == majors.pop()


def test_the_build_installs_and_verifies_the_pin() -> None:
    build = dockerfile_stages(DEPLOY / "Dockerfile.gpu")[0]
    (install,) = [r for r in build.args("RUN") if "pip install" in r and ".[gpu,remote,otel]" in r]
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in install
    assert "ort.__version__ == '${ORT_GPU_VERSION}'" in install
    assert "CUDAExecutionProvider" in install
