"""Kernel launches of one attribution (forward with capture + scoring backward) as a GPU would issue them, counted
on the CPU: a named shape's topology (layers, heads, KV heads, tokens) at a small d_model, the GPU's scoring chunk
budget scaled by d_model alike (so the token chunks are the GPU's), and ``auto``'s measured GPU kernel choices; a
fused kernel (Triton ``score_edges``/``residual_grads``) counts as one launch. Ops are counted where they reach
the device (``TorchDispatchMode``, views excluded), by the line that issued them.

    python bench/count_launches.py [--model llama-1B --batch 8 --seq 512 --d-model 256] [--out launches.json]

A host-bound step shows here without a GPU: the H100's llama-1B refresh-1 step ran 44k launches (its profile,
bench/results/profile_gpu_llama-1B.json) where the same count with that commit's chunking and torch-path scoring
gave 32.8k ops. The patches this script makes (chunk budget, backends, stubs) are its own process's only.
"""

import argparse
import collections
import json
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ct_fast
from ct_fast import attribution, ops
from ct_fast.app import harness
from ct_fast.models import shape_config
from ct_fast.ops import measured

_VIEWS = ("view", "as_strided", "slice", "select", "reshape", "unsqueeze", "transpose", "permute", "t.", "t(",
          "alias", "detach", "expand", "_reshape_alias", "narrow", "squeeze", "empty", "_to_copy", "split", "unbind",
          "_unsafe_view", "lift_fresh")


class _Count(TorchDispatchMode):
    """Counts ``(op, issuing line)`` of every non-view op (the last ct_fast/transformers frame names the line)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)[len("aten."):]
        if not name.startswith(_VIEWS):
            frames = [f for f in traceback.extract_stack() if "/ct_fast/" in f.filename or "/transformers/" in f.filename]
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            self.counts[(name.split(".")[0], where)] += 1
        return func(*args, **(kwargs or {}))


def _as_on_gpu(dtype: torch.dtype, d_model: int, real_d: int) -> list[str]:
    """Patch the scorer to chunk and dispatch as on a GPU; returns the ops stubbed as one launch."""
    budget = attribution.GPU_CHUNK_ELEMENTS * d_model // real_d
    attribution.chunk_elements = lambda device: budget
    fused = [op for op in ("score_edges", "residual_grads") if (measured.gpu_order(op, (dtype,)) or ["torch"])[0]
             == "triton"]
    choose = ops.choose_backend
    ops.choose_backend = lambda op, device, dtypes=(): "triton" if op in fused else choose(op, device, dtypes)
    if "score_edges" in fused:
        ops.score_edges = lambda delta, w, g: torch.zeros(1 if w is None else w.shape[0], g.shape[0])
    if "residual_grads" in fused:
        ops.residual_grads = lambda terms, out, *rest: out.zero_()
    return fused


def count(model_name: str = "llama-1B", batch: int = 8, seq: int = 512, d_model: int = 256, dtype="bf16",
          top: int = 25) -> dict:
    import transformers as tf

    tf.logging.set_verbosity_error()
    cfg = shape_config(model_name)
    heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    real_d = cfg.hidden_size
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    fused = _as_on_gpu(torch_dtype, d_model, real_d)
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = d_model, 2 * d_model, 512
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = d_model // heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    ids = torch.randint(0, 512, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with _Count() as counter:
        ct_fast.attribute(model, data)
    rows = [{"op": op, "where": where, "count": n} for (op, where), n in counter.counts.most_common(top)]
    return {"model": model_name, "batch": batch, "seq": seq, "d_model": d_model, "real_d_model": real_d,
            "dtype": dtype, "fused_as_one_launch": fused, "ops": sum(counter.counts.values()), "top": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1B", help="a shape name of ct_fast.models.shape_config (llama-*)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256, help="the small d_model the count runs at")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rec = count(a.model, a.batch, a.seq, a.d_model, a.dtype)
    print(f"{a.model} ({a.batch} x {a.seq} tokens, {a.dtype}): ~{rec['ops']} launches per attribution "
          f"(fused as one: {', '.join(rec['fused_as_one_launch']) or 'none'})")
    for r in rec["top"]:
        print(f"{r['count']:7d}  {r['op']:24s} {r['where']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": harness.env(), "results": [rec]}, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
