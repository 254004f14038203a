"""Builds genfast and its compiled extension genfast._C.

- C++ CPU kernels (csrc/genfast.cpp, csrc/cpu/*.cpp): always, unless GENFAST_SKIP_EXT=1.
- CUDA kernels (csrc/cuda/*.cu + their torch bindings, csrc/cuda/bindings/<family>.cpp): when torch has CUDA and
  nvcc is found, unless GENFAST_SKIP_CUDA=1. Architectures: GENFAST_CUDA_ARCHS (default "80;90a").
Without the extension genfast still imports and runs through its reference and Triton paths.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    if os.environ.get("GENFAST_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = _rel("csrc/genfast.cpp") + _rel("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is a header template that runs on one thread unless OpenMP is on here.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags: list[str] = []  # no -lgomp of our own: GOMP_* resolve to the libgomp torch itself loads
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("GENFAST_SKIP_CUDA") != "1"
    )
    if with_cuda:
        archs = os.environ.get("GENFAST_CUDA_ARCHS", "80;90a").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + gencode
        ext = CUDAExtension(
            "genfast._C",
            sources + _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/bindings/*.cpp"),
            define_macros=[("GENFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("genfast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="genfast",
    packages=find_packages(include=["genfast", "genfast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
