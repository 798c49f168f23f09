"""Builds pykernels._C: the CPU kernels always, the CUDA kernels when the
installed torch has CUDA and nvcc is found.

Environment:
  PYKERNELS_CUDA=1 / 0     force the CUDA kernels in / out
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0")
  CUDA_HOME                CUDA toolkit (default /usr/local/cuda when it exists)
  MAX_JOBS                 parallel compile jobs (ninja)

Install without build isolation, so the build uses the torch already installed:
  pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    forced = os.environ.get("PYKERNELS_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda = _want_cuda()
    sources = _sources("csrc/cpu/*.cpp") + _sources("csrc/torch/*.cpp")
    # No -std: torch's build helper picks the standard its headers need (C++20
    # for torch 2.14, whose headers no longer compile as C++17).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template over `#pragma omp parallel` when torch
        # uses OpenMP: without -fopenmp the pragma is dropped and every op runs on one
        # thread (NF4 dequantize 4096x4096 bf16, 2 cores: 5.6 ms on 1 or 2 threads
        # without, 2.6 ms with).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    macros = []
    if not with_cuda:
        return cpp_extension.CppExtension(
            "pykernels._C", [s for s in sources if not s.endswith("_cuda.cpp")],
            include_dirs=[os.path.join(ROOT, "csrc/include")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            define_macros=macros)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    macros.append(("PYKERNELS_WITH_CUDA", None))
    return cpp_extension.CUDAExtension(
        "pykernels._C", sources + _sources("csrc/cuda/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc/include")],
        # Never --use_fast_math: NF4's bytes need IEEE division and denormals.
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags, define_macros=macros)


if cpp_extension.CUDA_HOME is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper elsewhere.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cpp_extension.CUDA_HOME = "/usr/local/cuda"

setup(
    name="pykernels",
    version="0.1.0",
    description="Fused C++/CUDA kernels for parameter-efficient fine-tuning: NF4, LoRA, QLoRA, adapters",
    packages=find_packages(include=["pykernels", "pykernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["pykernels=pykernels.__main__:main"]},
)
