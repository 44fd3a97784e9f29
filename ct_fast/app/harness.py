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

import torch

from ..memory import LiveStorages, replay_peak
from ..ops import measured

# results go to bench/results of the source checkout (ct_fast/app/harness.py -> repository root), else ./bench-results
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(_ROOT, "bench", "results") if os.path.isdir(os.path.join(_ROOT, "bench")) else "bench-results"


def env() -> dict:
    """Machine, versions and commit a result belongs to."""
    import platform
    import subprocess

    import transformers

    commit = os.environ.get("CT_FAST_COMMIT")  # a copy of the tree with no .git (a GPU machine) is told its commit
    if not commit:
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
    capability = measured.device_architecture(torch.device("cuda")) if gpu else None
    return {"gpu": gpu, "capability": capability, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cuda": torch.version.cuda, "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": commit}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def peak_bytes(fn, device="cpu") -> int:
    """Extra peak memory of one ``fn()`` call (CUDA allocator stats on GPU, live-tensor tracking on CPU)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveStorages() as tracker:  # storages created during fn, each alive until its last view dies
        fn()
    return replay_peak(tracker.events, tracker.size, {})["transients"]


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


# ``Tensor.tolist`` callers that read a host copy queued earlier (pinned, non-blocking, with an event): on a GPU the
# read waits, if at all, for that copy and not for the work queued since — not a sync of the device's queue
HOST_COPY_READERS = {("pruning.py", "settle")}


def reads_a_host_copy() -> bool:
    """Whether the ``Tensor.tolist`` being called comes from a ``HOST_COPY_READERS`` function."""
    import sys

    frame = sys._getframe(2)  # (this function, the patched tolist, its caller)
    return (os.path.basename(frame.f_code.co_filename), frame.f_code.co_name) in HOST_COPY_READERS


def count_host_syncs(fn) -> dict:
    """Host-synchronising operations of one ``fn()`` call, counted on any device: the profiler's ``SYNC_OPS``
    events plus ``Tensor.tolist`` calls (a device-to-host copy on a GPU; no aten event on CPU) other than reads of
    a host copy made earlier (``HOST_COPY_READERS``). Returns ``{"total": n, op: count, ...}``."""
    from torch.profiler import ProfilerActivity, profile

    counts = {"tensor.tolist": 0}
    original = torch.Tensor.tolist

    def tolist(self):
        counts["tensor.tolist"] += not reads_a_host_copy()
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
