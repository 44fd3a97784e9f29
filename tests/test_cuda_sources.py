"""The CUDA kernels compile with nvcc (they use raw pointers and a cudaStream_t only, so this works on a
machine whose torch has no CUDA headers). Skipped when nvcc is absent."""

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles(source, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "-c", str(CSRC / source), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
