"""The CUDA kernels compile with nvcc (they use raw pointers and a cudaStream_t only, so this works on a
machine whose torch has no CUDA headers). Skipped when nvcc is absent.

``CT_FAST_CHECK_BINDING=1`` also syntax-checks the torch binding (csrc/cuda/binding.cpp) and the module with g++
against this torch's headers and the CUDA toolkit's (about a minute on 2 cores, so opt-in)."""

import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import cuda_emu
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", "sm_75"])  # the GPU check's, and the oldest setup.py builds for (a T4)
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles(source, arch, tmp_path):
    """With ptxas's resource report: no kernel spills registers to local memory."""
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-Xptxas", "-v", "-c", str(CSRC / source),
           "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert counts and all(a == b == "0" for a, b in counts), proc.stderr[-4000:]


@pytest.mark.skipif(os.environ.get("CT_FAST_CHECK_BINDING") != "1", reason="opt-in: CT_FAST_CHECK_BINDING=1")
@pytest.mark.parametrize("source", ["cuda/binding.cpp", "module.cpp"])
def test_cuda_binding_syntax(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    cuda_inc = cuda_emu.cuda_include()
    if cuda_inc is None or shutil.which("g++") is None:
        pytest.skip("nvcc or g++ not found")
    stub = tmp_path / "c10" / "cuda" / "impl"  # generated at torch's build time; absent from CPU wheels
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DCT_FAST_WITH_CUDA", f"-I{tmp_path}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_inc}",
           "-isystem", f"{cuda_inc}/cccl", str(ROOT / "csrc" / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0 and not errors, "\n".join(errors)[-4000:] or proc.stderr[-4000:]


def _setup_function(name, **names):
    """One function of setup.py, without running setup() (``names``: the module globals it reads)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"os": os, "shutil": shutil, **names}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns[name]


def test_setup_finds_the_toolkit_behind_an_nvcc_link_or_wrapper(tmp_path, monkeypatch):
    """torch guesses the folder above ``nvcc``; setup.py looks for the headers, so an ``nvcc`` linked or wrapped
    from outside the toolkit (``/usr/local/bin/nvcc``) still builds the CUDA kernels."""
    cuda_toolkit = _setup_function("cuda_toolkit")
    toolkit = tmp_path / "cuda-13.0"
    for f in ("bin/nvcc", "include/cuda_runtime.h"):
        (toolkit / f).parent.mkdir(parents=True, exist_ok=True)
        (toolkit / f).write_text("")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    linked, wrapped = tmp_path / "linked", tmp_path / "wrapped"
    linked.mkdir(), wrapped.mkdir()
    (linked / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    (wrapped / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrapped / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(linked))
    assert cuda_toolkit() == str(toolkit)
    monkeypatch.setenv("PATH", str(wrapped))  # the wrapper's folder has no headers: /usr/local/cuda, if it is one
    usr_local = "/usr/local/cuda"
    has = all(os.path.isfile(os.path.join(usr_local, *f)) for f in (("include", "cuda_runtime.h"), ("bin", "nvcc")))
    assert cuda_toolkit() == (usr_local if has else None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "given"))  # the user's choice stands
    assert cuda_toolkit() == str(tmp_path / "given")


def test_setup_builds_for_the_machines_gpus():
    """Without ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels are built for the machine's GPUs (capped at the newest
    architecture torch builds for, none older than sm_75), else for Turing to Hopper with PTX for newer GPUs."""
    import types

    default_cuda_archs = _setup_function("default_cuda_archs", GENERIC_CUDA_ARCHS="7.5;8.0;8.6;8.9;9.0+PTX")

    def fake(caps, archs=("sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
        return types.SimpleNamespace(cuda=types.SimpleNamespace(
            is_available=lambda: bool(caps), get_arch_list=lambda: list(archs), device_count=lambda: len(caps),
            get_device_capability=lambda i: caps[i]))

    assert default_cuda_archs(fake([(9, 0)])) == "9.0"  # the GPU check's H100/H200
    assert default_cuda_archs(fake([(8, 9), (9, 0), (8, 9)])) == "8.9;9.0"
    assert default_cuda_archs(fake([(12, 1)], archs=("sm_80", "sm_90"))) == "9.0+PTX"  # newer than torch: JIT
    assert default_cuda_archs(fake([])) == "7.5;8.0;8.6;8.9;9.0+PTX"  # a build machine without a GPU
    assert default_cuda_archs(fake([(7, 5)])) == "7.5"  # a T4
    assert default_cuda_archs(fake([(7, 0)])) == "7.5;8.0;8.6;8.9;9.0+PTX"  # older than CUDA 13 builds: generic
