"""ct_fast's CUDA kernels and their torch binding, run on the CPU under an emulation of the CUDA execution model
(``emu.h``): the kernels' code as it is in ``csrc/cuda`` (only the ``<<<...>>>`` launches, dynamic shared memory and
the binding's device guard and stream are rewritten), compiled with g++ and the CUDA toolkit's headers, so the
CUDA paths no CPU test could execute — the optimizer's tiles for column views, its ILP row loop, the binding's
packing of descriptors, the scoring kernel — run against the torch reference here. ``test_ops`` runs its masked
optimizer and scoring tests through it as the ``cuda_emu`` backend.

    module = cuda_emu.load()   # built once (~1 min), cached by torch.utils.cpp_extension; None without g++/CUDA
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
OPS = ("masked_adamw_", "masked_sgd_", "score_edges")  # the ops with CUDA kernels, as the emulated module names them

_SHIM = """
namespace c10::cuda {  // the binding's device guard and stream, on the host
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct HostStream {
  cudaStream_t stream() const { return nullptr; }
};
inline HostStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
"""

_MODULE = """
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using V = std::vector<at::Tensor>;
  using T = std::optional<at::Tensor>;
  m.def("masked_adamw_", [](V p, V g, V m1, V m2, V mx, V st, V r, V sl, double lr, double b1, double b2, double eps,
                            double wd, bool maximize, T lr_t, T flag) {
    ct_fast::masked_adamw_cuda(p, g, m1, m2, mx, st, r, sl, lr, b1, b2, eps, wd, maximize, lr_t, flag);
  });
  m.def("masked_sgd_", [](V p, V g, V buf, V st, V r, V sl, double lr, double mom, double damp, double wd, bool nest,
                          bool maximize, T lr_t, T flag) {
    ct_fast::masked_sgd_cuda(p, g, buf, st, r, sl, lr, mom, damp, wd, nest, maximize, lr_t, flag);
  });
  m.def("score_edges", &ct_fast::score_edges_cuda);
  m.def("set_reverse_order", [](bool reverse) { emu::reverse_order = reverse; });
}
"""


def cuda_include() -> str | None:
    """The CUDA toolkit's include folder (``cuda_runtime.h``), or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    proc = subprocess.run([nvcc, "-v", "-E", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("#$ INCLUDES="):
            path = line.split("=", 1)[1].strip().strip('"').split()[0].removeprefix("-I").strip('"')
            return path if (pathlib.Path(path) / "cuda_runtime.h").is_file() else None
    return None


def unavailable() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "no CUDA toolkit headers (nvcc)"
    return None


def source() -> str:
    """One translation unit: the emulation, kernels.cu and binding.cpp rewritten for it, a pybind module."""
    kernels = (CSRC / "cuda" / "kernels.cu").read_text()
    kernels = re.sub(r"(\w+)<<<(.*?)>>>\(", r"::emu::launch(\1, \2, ", kernels)
    kernels = kernels.replace("extern __shared__ float smem[];", "float* smem = ::emu::dynamic_shared<float>();")
    binding = (CSRC / "cuda" / "binding.cpp").read_text()
    for include in ("#include <c10/cuda/CUDAGuard.h>", "#include <c10/cuda/CUDAStream.h>", '#include "kernels.h"'):
        binding = binding.replace(include, "")
    binding = binding.replace("is_cuda()", "is_cpu()")  # the emulated device is the host
    if "<<<" in kernels or "extern __shared__" in kernels or "is_cuda" in binding:
        raise RuntimeError("csrc/cuda uses a construct tests/cuda_emu does not rewrite yet")
    return '#include "emu.h"\n' + kernels + "\n#include <torch/extension.h>\n" + _SHIM + binding + _MODULE


@functools.cache
def load():
    """The emulated ``ct_fast._C`` CUDA ops (``masked_adamw_``, ``masked_sgd_``, ``score_edges``: the signatures of
    ``torch.ops.ct_fast``), built once per source; None where it cannot be built (``unavailable()``)."""
    if unavailable():
        return None
    from torch.utils.cpp_extension import load as load_extension

    import torch

    # one build per torch version: environments with different torch builds share the temp folder, and torch's
    # cache key (sources and flags) does not see the version
    folder = pathlib.Path(tempfile.gettempdir()) / f"ct_fast_cuda_emu_{os.getuid()}_{torch.__version__}"
    folder.mkdir(exist_ok=True)
    lock = folder / "lock"  # torch waits for a build's lock file to go: one left by a killed build would hang here
    if lock.exists() and time.time() - lock.stat().st_mtime > 900:
        lock.unlink(missing_ok=True)
    path = folder / "emu_kernels.cpp"
    text = source()
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return load_extension(
        name="ct_fast_cuda_emu", sources=[str(path)], build_directory=str(folder),
        extra_cflags=["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", f"-I{cuda_include()}", f"-I{HERE}",
                      f"-I{CSRC / 'cuda'}"],
        # -Bsymbolic-functions: the kernels' calls to the emulated runtime (cudaGetLastError...) bind to emu.h's
        # definitions even where a CUDA build of torch has loaded the real libcudart first (whose answer, on a
        # machine without a driver, is an error)
        extra_ldflags=["-pthread", "-Wl,-Bsymbolic-functions"])
