"""Masked weight gradient (circuit rows only) per backend vs the dense weight gradient of the same linear layers.

``python bench/bench_masked_dw.py [--device cuda] [--tokens 4096] [--d 4096] [--fraction 0.1] [--dtype bfloat16]
[--selection strided|blocks|random] [--out FILE]``

Backends: ``torch`` (the gather + GEMM baseline: ``index_select`` copies, then cuBLAS / MKL), ``triton`` (one GEMM
that gathers inside its loads; GPU only), ``cuda`` (no CUDA kernel for this op: reported as skipped). ``dense`` is
the full ``grad_out^T @ x`` of every layer. Times are medians of CUDA-event intervals on a GPU, of wall time on CPU;
on CPU the GPU-only backends are skipped (the Triton interpreter's timings mean nothing). Each record also carries
the largest error of the backend's result against the torch baseline, relative to the baseline's largest value.
Defaults: fp32 and a strided selection on CPU; on a GPU both bf16 and fp32, strided and 64-wide blocks.
"""

import argparse
import os

import torch

from ct_fast import ops
from ct_fast.app import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def selection(kind: str, n: int, fraction: float, device) -> torch.Tensor:
    """``strided``: every (1/fraction)-th feature (scattered neurons); ``blocks``: runs of 64 contiguous features
    (attention heads); ``random``: a random subset, sorted."""
    k = max(1, int(round(n * fraction)))
    if kind == "strided":
        return torch.arange(0, n, max(1, int(1 / fraction)), device=device)
    if kind == "blocks":
        starts = torch.arange(0, n, 64)
        keep = starts[torch.linspace(0, starts.numel() - 1, max(1, -(-k // 64))).long().unique()]  # (>= k: 5% is 5%)
        return (keep[:, None] + torch.arange(64)).flatten().clamp(max=n - 1).unique().to(device)
    g = torch.Generator().manual_seed(n)
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)


def _with_backend(backend, fn):
    old = os.environ.get("CT_FAST_BACKEND")
    os.environ["CT_FAST_BACKEND"] = backend
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("CT_FAST_BACKEND", None)
        else:
            os.environ["CT_FAST_BACKEND"] = old


def skip_reason(backend: str, device: str):
    dev = torch.device(device)
    if backend == "cuda":
        return "no CUDA kernel for masked_weight_grad (the Triton kernel is the gathering GEMM)"
    if backend == "triton":
        if dev.type != "cuda":
            return "GPU-only (the Triton interpreter's timings mean nothing)"
        return ops.triton_available(dev)
    return None


def run(device="cpu", tokens=512, d=768, d_ff=3072, fraction=0.1, dtype=torch.float32, select="strided",
        backends=("torch", "triton", "cuda")):
    """One record per backend (``masked_ms``, ratios to dense and to the torch baseline, error), skipped ones with
    ``skipped``; the first record is the torch baseline."""
    g = torch.Generator(device=device).manual_seed(0)
    layers = [(d, 3 * d, True), (d, d, False), (d, d_ff, True), (d_ff, d, False)]  # (in, out, select outputs)
    data = [(torch.randn(tokens, i, device=device, dtype=dtype, generator=g),
             torch.randn(tokens, o, device=device, dtype=dtype, generator=g), sel_out) for i, o, sel_out in layers]
    idx = [selection(select, o if s else i, fraction, device) for (i, o, s) in layers]

    def masked():
        return [ops.masked_weight_grad(x, go, ix, s) for (x, go, s), ix in zip(data, idx)]

    def dense():
        for x, go, _ in data:
            go.t() @ x

    flops = sum(2 * tokens * i * o for i, o, _ in layers)
    masked_flops = sum(2 * tokens * ix.numel() * (i if s else o) for (i, o, s), ix in zip(layers, idx))
    td = harness.median_time(dense, device)
    base = dict(bench="masked_dw", device=device, dtype=str(dtype), tokens=tokens, d=d, d_ff=d_ff, fraction=fraction,
                selection=select, selected=sum(ix.numel() for ix in idx), dense_ms=td * 1e3,
                dense_tflops=flops / td / 1e12)
    records, ref, t_ref = [], None, None
    for b in backends:
        why = skip_reason(b, device)
        if why:
            records.append({**base, "backend": b, "skipped": why})
            continue
        out = _with_backend(b, masked)
        tm = _with_backend(b, lambda: harness.median_time(masked, device))
        if ref is None:
            ref, t_ref = out, tm
        scale = max(float(r.abs().max()) for r in ref)
        err = max(float((o - r).abs().max()) for o, r in zip(out, ref)) / max(scale, 1e-30)
        records.append({**base, "backend": b, "masked_ms": tm * 1e3, "ratio_to_dense": tm / td,
                        "ratio_to_torch": tm / t_ref, "masked_tflops": masked_flops / tm / 1e12,
                        "max_rel_err_vs_torch": err})
    def variant(bench, fn, **fields):  # a torch-path variant beside the backends (not an auto backend)
        out, tm = fn(), harness.median_time(fn, device)
        scale = max(float(r.abs().max()) for r in ref)
        err = max(float((o - r).abs().max()) for o, r in zip(out, ref)) / max(scale, 1e-30)
        records.append({**base, "bench": bench, "backend": "torch", **fields, "masked_ms": tm * 1e3,
                        "ratio_to_dense": tm / td, "ratio_to_torch": tm / t_ref,
                        "masked_tflops": masked_flops / tm / 1e12, "max_rel_err_vs_torch": err})

    if ref is not None and ops.gemm.aligns(torch.device(device)):  # the torch path before its padding (ops.gemm)
        def unaligned():
            aligns, ops.gemm.aligns = ops.gemm.aligns, lambda device: False
            try:
                return _with_backend("torch", masked)
            finally:
                ops.gemm.aligns = aligns

        variant("masked_dw_unaligned", unaligned)
    for splits in SPLITS if ref is not None else ():  # the torch path with K (the tokens) split by hand
        if tokens % splits == 0:
            variant("masked_dw_split", lambda: [split_weight_grad(x, go, ix, s, splits) for (x, go, s), ix
                                                 in zip(data, idx)], splits=splits)
    return records


# the torch path's GEMM has M = the k selected features (5% of 4096: 205) — a few output tiles, under a wave of an
# H100 unless cuBLAS splits K itself (it ran at 127 TFLOP/s there); these split the tokens by hand, one bmm into
# [splits, k, m] and an fp32 sum (records "masked_dw_split": not an auto backend, the data to decide by). On a GPU
# "masked_dw_unaligned" times the torch path without its padding to 16-byte aligned k (ops.gemm): the H200 ran
# 64-aligned blocks at 307 TFLOP/s, strided k (615, 205, 820, ...) at 127
SPLITS = (2, 4, 8)


def split_weight_grad(x, grad_out, index, out_features: bool, splits: int) -> torch.Tensor:
    """``reference.masked_weight_grad`` with the token dimension split into ``splits`` blocks: ``[k, m]`` fp32."""
    g, other = (grad_out, x) if out_features else (x, grad_out)
    k = g.shape[1] if index is None else index.numel()
    g = g if index is None else g.index_select(1, ops.gemm.padded_index(index, g.dtype))  # aligned, as the torch path
    n = g.shape[0] // splits
    parts = torch.bmm(g.reshape(splits, n, -1).transpose(1, 2), other.reshape(splits, n, -1))
    return parts.sum(0, dtype=torch.float32)[:k]


def test_masked_dw(benchmark):
    x, go = torch.randn(256, 128), torch.randn(256, 384)
    idx = torch.arange(0, 384, 10)
    benchmark(ops.masked_weight_grad, x, go, idx, True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 and fp32 on GPU")
    ap.add_argument("--selection", default=None, choices=["strided", "blocks", "random"],
                    help="default: strided on CPU, strided and blocks on GPU")
    ap.add_argument("--backends", default="torch,triton,cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gpu = torch.device(a.device).type == "cuda"
    dtypes = [DTYPES[a.dtype]] if a.dtype else ([torch.bfloat16, torch.float32] if gpu else [torch.float32])
    selections = [a.selection] if a.selection else (["strided", "blocks"] if gpu else ["strided"])
    recs = []
    for dt in dtypes:
        for sel in selections:
            rs = run(a.device, a.tokens, a.d, 4 * a.d, a.fraction, dt, sel, tuple(a.backends.split(",")))
            recs += rs
            for r in rs:
                name = r["backend"] + (f" split {r['splits']}" if "splits" in r else
                                       " unaligned" if r["bench"] == "masked_dw_unaligned" else "")
                head = f"{str(dt)[6:]:>8} {sel:>7} {name:>6}:"
                if "skipped" in r:
                    print(f"{head} skipped ({r['skipped']})")
                else:
                    print(f"{head} masked dW ({100 * a.fraction:.0f}% rows) {r['masked_ms']:.3f} ms vs dense "
                          f"{r['dense_ms']:.3f} ms ({r['ratio_to_dense']:.3f}x dense, {r['ratio_to_torch']:.3f}x torch; "
                          f"rel err {r['max_rel_err_vs_torch']:.1e})")
    print(harness.write(f"{a.device}_masked_dw", recs, a.out))
