"""Packaging and the native build.

``kernels/`` (Triton) ships inside the package as ``ct_fast.kernels`` — a top-level ``kernels`` package
would clash with an existing PyPI distribution. ``ct_fast._C`` is built with ``BuildExtension`` + ninja:
a CUDAExtension (C++ CPU kernels + CUDA kernels, default arch sm_90) when torch has CUDA and nvcc is found,
else a CppExtension (C++ CPU kernels with OpenMP). Environment switches:

    CT_FAST_SKIP_NATIVE=1   build no native code (pure Python; ops run the torch reference)
    CT_FAST_NO_CUDA=1       build the C++ CPU kernels only, even with a CUDA torch
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "9.0")

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["ct_fast", "ct_fast.*"]) + ["ct_fast.kernels"]
ext_modules, cmdclass = [], {}

if os.environ.get("CT_FAST_SKIP_NATIVE") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]  # no errno: lets sqrt vectorise
    sources = ["csrc/module.cpp", "csrc/cpu/ops_cpu.cpp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("CT_FAST_NO_CUDA") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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
