"""Masked weight gradient (circuit rows only) vs the dense weight gradient of the same linear layers.
``python bench/bench_masked_dw.py [--device cuda] [--tokens 4096] [--d 4096] [--fraction 0.1]``"""

import argparse
import os
import sys

import torch

from ct_fast.app import harness  # noqa: E402

from ct_fast import ops  # noqa: E402


def run(device="cpu", tokens=512, d=768, d_ff=3072, fraction=0.1, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    layers = [(d, 3 * d, True), (d, d, False), (d, d_ff, True), (d_ff, d, False)]  # (in, out, select outputs)
    data = [(torch.randn(tokens, i, device=device, dtype=dtype, generator=g),
             torch.randn(tokens, o, device=device, dtype=dtype, generator=g), sel_out) for i, o, sel_out in layers]
    idx = [torch.arange(0, (o if s else i), int(1 / fraction), device=device) for (i, o, s) in layers]

    def masked():
        for (x, go, s), ix in zip(data, idx):
            ops.masked_weight_grad(x, go, ix, s)

    def dense():
        for x, go, _ in data:
            go.t() @ x

    flops = sum(2 * tokens * i * o for i, o, _ in layers)
    tm, td = harness.median_time(masked, device), harness.median_time(dense, device)
    return {"bench": "masked_dw", "device": device, "dtype": str(dtype), "tokens": tokens, "d": d, "d_ff": d_ff,
            "fraction": fraction, "masked_ms": tm * 1e3, "dense_ms": td * 1e3, "ratio_to_dense": tm / td,
            "dense_tflops": flops / td / 1e12}


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
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    r = run(a.device, a.tokens, a.d, 4 * a.d, a.fraction)
    print(f"masked dW ({100 * a.fraction:.0f}% rows): {r['masked_ms']:.2f} ms vs dense {r['dense_ms']:.2f} ms "
          f"({r['ratio_to_dense']:.3f}x)")
    print(harness.write(f"{a.device}_masked_dw", [r], a.out))
