"""Packaging and the native build.

``kernels/`` (Triton) ships inside the package as ``ct_fast.kernels`` — a top-level ``kernels`` package
would clash with an existing PyPI distribution. ``ct_fast._C`` is built with ``BuildExtension`` + ninja:
a CUDAExtension (C++ CPU kernels + CUDA kernels) when torch has CUDA and a CUDA toolkit is
found (``cuda_toolkit``), else a CppExtension (C++ CPU kernels with OpenMP). Environment switches:

    CT_FAST_SKIP_NATIVE=1   build no native code (pure Python; ops run the torch reference)
    CT_FAST_NO_CUDA=1       build the C++ CPU kernels only, even with a CUDA torch
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default: the machine's GPUs; without one, GENERIC_CUDA_ARCHS)
    CUDA_HOME               the CUDA toolkit (default: found next to nvcc or at /usr/local/cuda)

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup


def cuda_toolkit() -> str | None:
    """The CUDA toolkit to build with: ``$CUDA_HOME`` / ``$CUDA_PATH`` when set, else the first of the folder above
    ``nvcc`` and ``/usr/local/cuda`` that holds ``include/cuda_runtime.h``. torch guesses the folder above ``nvcc``
    only, which has no headers when ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` running the toolkit's):
    the build would then fail on ``cuda_runtime.h`` instead of using the toolkit next to it."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        return given
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    return next((c for c in candidates if all(os.path.isfile(os.path.join(c, *f)) for f in (
        ("include", "cuda_runtime.h"), ("bin", "nvcc")))), None)


GENERIC_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"  # T4, A100, RTX 30xx/A6000, RTX 40xx/L4/L40, H100/H200 (+ newer: PTX)


def default_cuda_archs(torch) -> str:
    """The architectures of this machine's GPUs (what the kernels will run on; capped at the newest this torch
    builds for), else — a build machine without a GPU — Turing to Hopper, with Hopper's PTX for newer GPUs to JIT.
    CUDA 13 builds nothing older than sm_75. A build that lacks a GPU's architecture is never launched there:
    ``ct_fast.ops`` asks it first and names the rebuild."""
    built = [int("".join(ch for ch in a[3:] if ch.isdigit())) for a in torch.cuda.get_arch_list()
             if a.startswith("sm_")] if torch.cuda.is_available() else []  # "sm_90a" -> 90
    newest = (max(built) // 10, max(built) % 10) if built else None
    found = {tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())} if newest else ()
    caps = sorted({min(c, newest) for c in found if c >= (7, 5)})
    if not caps:
        return GENERIC_CUDA_ARCHS
    archs = [f"{a}.{b}" for a, b in caps]
    return ";".join(archs) + ("+PTX" if max(found) > newest else "")  # a GPU newer than torch builds for: its PTX


packages = find_packages(include=["ct_fast", "ct_fast.*"]) + ["ct_fast.kernels"]
ext_modules, cmdclass = [], {}

if os.environ.get("CT_FAST_SKIP_NATIVE") != "1":
    import torch

    toolkit = cuda_toolkit() if torch.version.cuda is not None else None
    if toolkit:  # read by torch.utils.cpp_extension at import
        os.environ["CUDA_HOME"] = toolkit
    elif torch.version.cuda is not None and shutil.which("nvcc"):
        print("ct_fast setup: nvcc is on PATH but no CUDA toolkit with include/cuda_runtime.h was found: building "
              "the C++ CPU kernels only (set CUDA_HOME to the toolkit for the CUDA kernels)", file=sys.stderr)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]  # no errno: lets sqrt vectorise
    sources = ["csrc/module.cpp", "csrc/cpu/ops_cpu.cpp"]
    with_cuda = toolkit is not None and CUDA_HOME is not None and os.environ.get("CT_FAST_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_cuda_archs(torch))
        ext = CUDAExtension("ct_fast._C", sources + ["csrc/cuda/kernels.cu", "csrc/cuda/binding.cpp"],
                            extra_compile_args={"cxx": cxx + ["-DCT_FAST_WITH_CUDA"],
                                                "nvcc": ["-O3", "-std=c++17", "-DCT_FAST_WITH_CUDA"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("ct_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=packages,
    package_dir={"ct_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
