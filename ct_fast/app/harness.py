"""One benchmark harness: device-synchronised timing (median of many), peak memory, bandwidth/FLOP rates,
and results tied to the machine, versions and commit in ``bench/results/*.json``.

Used by the scripts in ``bench/`` (``python bench/bench_masked_adamw.py [--device cuda] [--out FILE]``) and by
``ct-fast bench``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# results go to bench/results of the source checkout (ct_fast/app/harness.py -> repository root), else ./bench-results
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(_ROOT, "bench", "results") if os.path.isdir(os.path.join(_ROOT, "bench")) else "bench-results"


def env() -> dict:
    """Machine, versions and commit a result belongs to."""
    import platform
    import subprocess

    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=_ROOT, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version(), "commit": commit}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device="cpu", warmup=2, reps=10) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created while active and still alive (CPU peak-memory proxy). A storage counts
    from its first tensor until the last tensor seen on it dies (views such as ``F.linear``'s 3-D output keep
    their base's memory alive)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, int] = {}  # storage -> live tensors seen on it
        self.size: dict[int, int] = {}

    def _track(self, t, inputs: set):
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0 or (key in inputs and key not in self.users):
            return  # a view of, or an in-place write into, memory that existed before (parameters, states)
        if key not in self.users:
            self.users[key], self.size[key] = 0, n
            self.live += n
            self.peak = max(self.peak, self.live)
        self.users[key] += 1
        weakref.finalize(t, self._release, key)  # the tensor object: storages' Python wrappers are transient

    def _release(self, key):
        self.users[key] -= 1
        if self.users[key] == 0:
            del self.users[key]
            self.live -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                try:
                    inputs.add(t.untyped_storage().data_ptr())
                except (RuntimeError, TypeError):
                    pass
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                try:
                    self._track(t, inputs)
                except (RuntimeError, TypeError):
                    pass
        return out


def peak_bytes(fn, device="cpu") -> int:
    """Extra peak memory of one ``fn()`` call (CUDA allocator stats on GPU, live-tensor tracking on CPU)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _LiveBytes() as m:
        fn()
    return m.peak


def copy_bandwidth(device="cpu", nbytes=256 << 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, warmup=2, reps=5)
    return 2 * nbytes / t


def write(name: str, records: list[dict], path: str | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = path or os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": env(), "results": records}, f, indent=1)
    return path


# leaf ops that make the host wait for the device: a value read back (``.item()``, ``bool(t)``, ``int(t)`` all end
# in _local_scalar_dense) or an output whose size depends on data (``nonzero``, boolean indexing, ``unique``)
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim")


def count_host_syncs(fn) -> dict:
    """Host-synchronising operations of one ``fn()`` call, counted on any device: the profiler's ``SYNC_OPS``
    events plus ``Tensor.tolist`` calls (a device-to-host copy on a GPU; no aten event on CPU).
    Returns ``{"total": n, op: count, ...}``."""
    from torch.profiler import ProfilerActivity, profile

    counts = {"tensor.tolist": 0}
    original = torch.Tensor.tolist

    def tolist(self):
        counts["tensor.tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = original
    for event in prof.events():
        if event.name in SYNC_OPS:
            counts[event.name] = counts.get(event.name, 0) + 1
    counts["total"] = sum(counts.values())
    return counts
