"""The host time of a training step at negligible compute: what an eager GPU step waits on when its host is slower
than its kernels (the H200's llama-1B step between refreshes: 61 ms of kernels in a 78 ms step).

The llama-1B topology (16 layers, 32 heads, 8 KV heads: every module, hook and autograd node of the real model) at
d_model 128, fp32, 1 x 8 tokens, on the CPU with one thread: the ops are tiny, so the time is Python, dispatch and
autograd. Each method's best of ``repeats`` runs of ``steps`` steps (after warm-up):

    python bench/host_step.py [--methods full,reused,two_pass,deferred] [--out host_step.json]

``full``: a full fine-tuning step with fused AdamW (its host baseline); ``reused``: a circuit-tuning step between
refreshes; ``two_pass``, ``deferred``: faithful steps in those memory modes (CPU fp32: the torch scoring path).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ct_fast.app import harness  # noqa: E402


def step_fn(method: str, d_model: int = 128, tokens: int = 8, fraction: float = 0.07):
    """A closure running one step of ``method`` on a fresh small-width llama-1B-topology model."""
    import transformers as tf

    import ct_fast
    from ct_fast.app.step_bench import choose_top_n
    from ct_fast.models import shape_config

    tf.logging.set_verbosity_error()
    cfg = shape_config("llama-1B")
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = d_model, 2 * d_model, 512
    cfg.head_dim = d_model // cfg.num_attention_heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, tokens))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if method == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def run():
            model(**data, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run
    top_n = choose_top_n(model, data, fraction)
    options = dict(refresh_every=1000) if method == "reused" else dict(memory_mode=method)
    tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=1e-5), top_n=top_n, **options)
    return lambda: tuner.step(data)


def run(methods=("full", "reused", "two_pass", "deferred"), steps: int = 10, repeats: int = 5) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recs = []
        for method in methods:
            fn = step_fn(method)
            for _ in range(3):  # warm-up: the first step of "reused" is its refresh
                fn()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                best = min(best, (time.perf_counter() - t) / steps)
            recs.append({"bench": "host_step", "device": "cpu", "model": "llama-1B topology, d_model 128",
                         "method": method, "host_ms_per_step": best * 1e3})
        return recs
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="full,reused,two_pass,deferred")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    recs = run(tuple(a.methods.split(",")))
    for r in recs:
        print(f"{r['method']:>9}: {r['host_ms_per_step']:.1f} ms host per step")
    print(harness.write("cpu_host_step", recs, a.out))
