"""Where a step's time goes: torch.profiler over one timed step of a ``ct-fast bench`` method (after warm-up),
and over one masked AdamW step of ``bench_masked_adamw``'s parameters. Prints the kernels and host ops that
take the most device and host time, the launch count, and device-busy vs wall time (a step whose device is
idle most of the wall time is bound by its host: launches, Python, synchronisations).

    python bench/profile_step.py --device cuda --model llama-1B --dtype bf16 --batch 8 --seq 512 \
        --methods circuit_refresh1,full [--optimizer-params 1.06e9 --optimizer-d 4096] [--out profile.json]
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ct_fast.app import harness, step_bench  # noqa: E402


def _profiled(fn, device: str, rows: int = 25) -> dict:
    """One call of ``fn`` under the profiler: wall time, device-busy time, launches and the top ops."""
    cuda = device != "cpu"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    harness.sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        harness.sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # ranges such as "Optimizer.step#CircuitAdamW.step" show up as device events too: not kernels
    ranges = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}
    kernels = [e for e in events if cuda and getattr(e, "self_device_time_total", 0) > 0
               and e.device_type.name == "CUDA" and e.key not in ranges]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if cuda else None
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                         "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaMemcpyAsync"))

    def top(evs, attr, n):
        evs = sorted(evs, key=lambda e: getattr(e, attr, 0), reverse=True)[:n]
        return [{"name": e.key[:90], "count": e.count, "ms": getattr(e, attr, 0) / 1e3} for e in evs]

    host_ops = [e for e in events if e.device_type.name == "CPU" and e.key.startswith("aten::")]
    return {"wall_ms": wall * 1e3, "device_busy_ms": None if busy is None else busy * 1e3, "launches": launches,
            "syncs_and_copies": syncs,
            "top_device": top(kernels, key, rows) if cuda else [],
            "top_host_self": top(host_ops, "self_cpu_time_total", rows),
            "top_host_count": top(host_ops, "count", rows)}


def _print(title: str, rec: dict) -> None:
    busy = "n/a" if rec["device_busy_ms"] is None else f"{rec['device_busy_ms']:.1f} ms"
    print(f"\n=== {title}: wall {rec['wall_ms']:.1f} ms, device busy {busy}, {rec['launches']} kernel launches, "
          f"{rec['syncs_and_copies']} syncs/memcpys")
    for name in ("top_device", "top_host_self", "top_host_count"):
        if rec[name]:
            print(f"--- {name}")
            for r in rec[name]:
                print(f"{r['ms']:10.2f} ms {r['count']:7d}x  {r['name']}")


def profile_methods(model: str, methods, device: str, dtype, batch: int, seq: int) -> dict:
    base = step_bench.build(model, device, dtype)
    arch = "gpt2" if model.startswith("gpt2") else "llama"
    data = step_bench.make_batches(base.config.vocab_size, batch, seq, 3, device)
    top_n = step_bench.choose_top_n(base, data[0], 0.05)
    out = {}
    for method in methods:
        m = step_bench._Method(method, copy.deepcopy(base), top_n, arch)
        m.step(data[0])  # warm-up: compiles, allocates state
        m.step(data[1])
        rec = _profiled(lambda: m.step(data[2]), device)
        if m.last is not None:
            rec["split_ms"] = {k: v * 1e3 for k, v in m.last.timings.items()}
        out[method] = rec
        _print(f"{model} {method} (top_n {top_n})", rec)
        if "split_ms" in rec:
            print("phase split (ms):", {k: round(v, 1) for k, v in rec["split_ms"].items()})
        del m
        step_bench._free(device)
    return out


def profile_optimizer(device: str, total: float, d: int, fraction: float = 0.05) -> dict:
    from bench_masked_adamw import make_params

    from ct_fast import CircuitAdamW, ParamSelection

    params = [p.requires_grad_() for p in make_params(total, d, device, torch.float32)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = CircuitAdamW(params, lr=1e-4)
    opt.set_circuit({p: ParamSelection(0, p.shape[0], ((0, max(1, int(fraction * p.shape[0]))),)) for p in params})
    opt.step(), opt.step()
    rec = _profiled(opt.step, device)
    _print(f"CircuitAdamW.step, {len(params)} tensors, {sum(p.numel() for p in params):.3g} params, {fraction} rows",
           rec)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--methods", default="circuit_refresh1,full")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--optimizer-params", type=float, default=0.0, help="also profile a masked AdamW step (0: no)")
    ap.add_argument("--optimizer-d", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rec = {"env": harness.env(), "model": a.model, "batch": a.batch, "seq": a.seq, "dtype": a.dtype}
    if a.optimizer_params:
        rec["optimizer"] = profile_optimizer(a.device, a.optimizer_params, a.optimizer_d)
    if a.methods:
        rec["methods"] = profile_methods(a.model, a.methods.split(","), a.device, dtype, a.batch, a.seq)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
