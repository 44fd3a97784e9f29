"""The drop-in optimizer's step against the tuner's and full fine-tuning's, interleaved on one machine.

    python bench/bench_dropin.py [--model gpt2-small] [--batch 8 --seq 64] [--rounds 8] [--device cpu|cuda]

Three copies of one model take turns, step by step on the same batches (round-robin, so drift of a shared
machine hits every method alike): ``full`` (torch.optim.AdamW, plain loop), ``tuner`` (``CircuitTuner.step``,
faithful mode) and ``dropin`` (``CircuitAdamW(..., model=model, top_n=N)`` in a plain loop: forward,
backward, step, zero_grad). Reports the median step time of each, the ratio dropin / tuner (the issue's
bound: 1.05) and peak memory (persistent + transient, as ``ct-fast bench``); writes
``bench/results/<device>_dropin.json``.
"""

import argparse
import copy
import statistics
import time

import torch

from ct_fast.app import harness
from ct_fast.app.step_bench import _Method, _persistent_bytes, build, choose_top_n, make_batches

METHODS = {"full": "full", "tuner": "circuit_refresh1", "dropin": "circuit_dropin"}


def run(model_name="gpt2-small", device="cpu", batch=8, seq=64, rounds=8, warmup=2, fraction=0.05) -> dict:
    base = build(model_name, device, torch.float32)
    arch = "gpt2" if model_name in ("tiny", "gpt2-small") else "llama"
    data = make_batches(base.config.vocab_size, batch, seq, warmup + rounds + 1, device)
    top_n = choose_top_n(base, data[0], fraction)
    methods = {name: _Method(kind, copy.deepcopy(base), top_n, arch) for name, kind in METHODS.items()}
    times = {name: [] for name in methods}
    for i, b in enumerate(data[:warmup + rounds]):
        for name, m in methods.items():
            harness.sync(device)
            t0 = time.perf_counter()
            m.step(b)
            harness.sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    out = {"model": model_name, "batch": batch, "seq": seq, "rounds": rounds, "top_n": top_n, "methods": {}}
    for name, m in methods.items():
        peak = harness.peak_bytes(lambda: m.step(data[-1]), device) + (
            _persistent_bytes(m.model, m) if torch.device(device).type == "cpu" else 0)
        out["methods"][name] = {"median_ms": 1e3 * statistics.median(times[name]),
                                "times_ms": [1e3 * t for t in times[name]], "peak_mem_gib": peak / 2**30}
    med = {k: v["median_ms"] for k, v in out["methods"].items()}
    # per-round ratios (same batch, adjacent in time) are steadier than the ratio of medians
    out["dropin_over_tuner"] = statistics.median(d / t for d, t in zip(times["dropin"], times["tuner"]))
    out["dropin_over_full"] = med["dropin"] / med["full"]
    out["tuner_over_full"] = med["tuner"] / med["full"]
    dp, tp = methods["dropin"].model.parameters(), methods["tuner"].model.parameters()
    out["dropin_equals_tuner"] = all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(dp, tp))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    result = run(a.model, a.device, a.batch, a.seq, a.rounds)
    for name, r in result["methods"].items():
        print(f"{name:>7}: {r['median_ms']:8.1f} ms/step (median of {a.rounds}), peak {r['peak_mem_gib']:.2f} GiB")
    print(f"dropin / tuner {result['dropin_over_tuner']:.3f}x (median of per-round ratios), dropin / full "
          f"{result['dropin_over_full']:.2f}x, tuner / full {result['tuner_over_full']:.2f}x; "
          f"same parameters: {result['dropin_equals_tuner']}")
    print(harness.write(f"{a.device}_dropin", [result], a.out))


if __name__ == "__main__":
    main()
