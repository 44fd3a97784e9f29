"""Kernel launches and host syncs of one attribution (forward with capture + scoring backward), or of one whole
circuit-tuning step (``--step MODE``: attribution, selection, masked weight gradients, optimizer), as a GPU would
issue them, counted on the CPU: a named shape's topology (layers, heads, KV heads, tokens) at a small d_model, the
GPU's scoring chunk budget scaled by d_model alike (so the token chunks are the GPU's), and ``auto``'s measured GPU
kernel choices (``--scoring torch|triton`` overrides the score kernel's); a fused Triton kernel counts as the
launches it makes. Ops are counted where they reach the device (``TorchDispatchMode``, views excluded), by the line
that issued them.

    python bench/count_launches.py [--model llama-1B --batch 8 --seq 512 --d-model 256] [--out launches.json]
    python bench/count_launches.py --step two_pass      # a faithful tuner step (the second of two: warm state)
    python bench/count_launches.py --step reused        # a step between refreshes (the circuit reused)

A host sync is an op whose result the host must wait for: ``.item()``/``bool()``/``float()`` of a tensor
(``_local_scalar_dense``), ``.tolist()``, and ops whose output shape depends on data (``nonzero``, boolean indexing,
``masked_select``, ``unique``...). On a GPU each one drains the launch queue, so a host-bound step pays them
in full.

A host-bound step shows here without a GPU: the H100's llama-1B refresh-1 step ran 44k launches (its profile,
bench/results/profile_gpu_llama-1B.json) where the same count with that commit's chunking and torch-path scoring
gave 32.8k ops. The patches this script makes (chunk budget, backends, stubs) are its own process's only.
"""

import argparse
import collections
import json
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ct_fast
from ct_fast import attribution, ops
from ct_fast.app import harness
from ct_fast.models import shape_config
from ct_fast.ops import measured

_VIEWS = ("view", "as_strided", "slice", "select", "reshape", "unsqueeze", "transpose", "permute", "t.", "t(",
          "alias", "detach", "expand", "_reshape_alias", "narrow", "squeeze", "empty", "split", "unbind",
          "_unsafe_view", "lift_fresh")


_SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique", "masked_scatter",
          "repeat_interleave")


def _is_sync(name: str, args) -> bool:
    """Whether the op makes the host wait for the device (a value read, or a data-dependent output shape)."""
    base = name.split(".")[0]
    if base in _SYNCS:
        return base != "repeat_interleave" or "output_size" not in name
    if base in ("index", "index_put", "index_put_"):  # boolean-mask indexing: a nonzero inside
        idx = args[1] if len(args) > 1 else ()
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or ()))
    return False


def _where() -> str:
    """The line that issued an op: the last ct_fast/transformers frame."""
    frames = [f for f in traceback.extract_stack() if "/ct_fast/" in f.filename or "/transformers/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


class _Count(TorchDispatchMode):
    """Counts ``(op, issuing line)`` of every non-view op, and of every host sync apart — ``Tensor.tolist`` too (a
    device-to-host copy on a GPU; on the CPU it reaches no dispatch)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self._tolist = None

    def __enter__(self):
        self._tolist, syncs = torch.Tensor.tolist, self.syncs

        def tolist(tensor):
            if not harness.reads_a_host_copy():  # (a host copy queued earlier: no wait for the device's queue)
                syncs[("tolist", _where())] += 1
            return self._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)[len("aten."):]
        sync = _is_sync(name, args)
        if sync or not name.startswith(_VIEWS):
            (self.syncs if sync else self.counts)[(name.split(".")[0], _where())] += 1
        return func(*args, **(kwargs or {}))


def _as_on_gpu(dtype: torch.dtype, d_model: int, real_d: int, scoring: str = "measured") -> list[str]:
    """Patch the scorer to chunk, cast and dispatch as on a GPU (``scoring``: the score kernel's backend, or the
    measured choice); returns the ops stubbed as their launches."""
    budget = attribution.GPU_CHUNK_ELEMENTS * d_model // real_d
    attribution.chunk_elements = lambda device: budget
    attribution.scoring_dtype = lambda param: param.dtype  # a GPU scores bf16/fp16 models in their dtype
    fused = [op for op in ("score_edges", "residual_grads") if (measured.gpu_order(op, (dtype,)) or ["torch"])[0]
             == "triton"]
    if scoring != "measured":
        fused = [op for op in fused if op != "score_edges"] + (["score_edges"] if scoring == "triton" else [])
    split = measured.product_split(dtype)
    if split > 1 and "score_edges" not in fused:  # the torch path's products split as measured (a bmm and a sum)
        os.environ["CT_FAST_PRODUCT_SPLIT"] = str(split)
    choose = ops.choose_backend
    ops.choose_backend = lambda op, device, dtypes=(): "triton" if op in fused else choose(op, device, dtypes)
    if "score_edges" in fused:
        ops.score_edges = lambda delta, w, g: torch.zeros(1 if w is None else w.shape[0], g.shape[0])

        def score_edges_into(out, sources, g, alpha=1.0, workspace=None, split=1):  # a kernel per group, a reduction
            for _ in sources:
                torch.zeros(1)
            return out.add_(0.0)

        ops.score_edges_into = score_edges_into
    if "residual_grads" in fused:  # a launch per call, two through a norm, one more for token sums
        from ct_fast.kernels.residual_grads import MAX_BLOCKS  # (``residual_grads_blocks``: per MAX_BLOCKS blocks)

        def residual_grads(terms, out, norm=None, x=None, stats=None, sums=None):
            if norm is not None:  # the norm's reductions
                torch.zeros(1)
            if sums is not None:  # the partial sums' reduction
                sums.zero_()
            return out.zero_()

        ops.residual_grads = residual_grads
        ops.residual_grads_blocks = lambda blocks, out, *rest: [residual_grads(None, out, *rest)
                                                                for _ in blocks[::MAX_BLOCKS]][-1]
    return fused


def scoring_flops(model_name: str = "llama-1B", batch: int = 8, seq: int = 512) -> dict:
    """FLOPs of one attribution's scoring at the model's real size (a meta model's graph, every token scored),
    next to a full fine-tuning step's ``6 x params x tokens`` plus its attention products (``12 B T^2 d`` a layer,
    forward and backward, no causal saving):

    - ``residual``: each downstream node's residual gradient, its head rows through its reader (``2 T w d``);
    - ``contributions``: each upstream head's residual contribution ``z W_O`` (``2 T w d``), made again for
      every downstream span that reads it (on chip, by the fused kernel);
    - ``products``: every (upstream, downstream) pair's ``sum_t a . g`` (``2 T d``) — the GEMM of the score.

    The arithmetic intensity (FLOPs per byte of G read) is bounded by the ~50 downstream nodes of one span:
    these GEMMs are skinny, so their speed, not their count, sets the faithful step's cost on a GPU."""
    from ct_fast.attribution import SCORE_SPAN, layer_plans
    from ct_fast.graph import ComputationGraph
    from ct_fast.memory import meta_model

    cfg = shape_config(model_name)
    model = meta_model(cfg, torch.bfloat16)
    graph = ComputationGraph.from_model(model)
    d, T = graph.d_model, batch * seq
    residual = sum(2 * T * (g.reader.width if g.reader else 0) * d * len(g.names) for g in graph.downstream_groups)
    contributions = products = 0
    for plan in layer_plans(graph, SCORE_SPAN).values():
        for k, a in plan.ups:
            ug = graph.upstream_groups[k]
            n = len(ug.names)
            contributions += 2 * T * ug.writer.width * d * n if ug.writer else 0
            products += 2 * T * d * n * (plan.n_nodes - a)
    params = sum(p.numel() for p in model.parameters())
    full = 6 * params * T + 12 * cfg.num_hidden_layers * batch * seq * seq * d
    scoring = residual + contributions + products
    return {"model": model_name, "tokens": T, "residual_flops": residual, "contribution_flops": contributions,
            "product_flops": products, "scoring_flops": scoring, "full_step_flops": full,
            "scoring_vs_full": scoring / full}


def count(model_name: str = "llama-1B", batch: int = 8, seq: int = 512, d_model: int = 256, dtype="bf16",
          top: int = 25, step: str | None = None, fraction: float = 0.05, scoring: str = "measured") -> dict:
    """One attribution's launches, or (``step``: a memory mode) those of a faithful tuner step on a circuit of
    about ``fraction`` of the parameters, or (``step="full"``) of a full fine-tuning step; the step counted is
    the second (optimizer state and caches warm)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    cfg = shape_config(model_name)
    heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    real_d = cfg.hidden_size
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    fused = _as_on_gpu(torch_dtype, d_model, real_d, scoring)
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = d_model, 2 * d_model, 512
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = d_model // heads
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    ids = torch.randint(0, 512, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    run = lambda: ct_fast.attribute(model, data)  # noqa: E731
    if step == "full":  # the baseline: full fine-tuning (multi-tensor AdamW; on a GPU the fused one is fewer)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def run():
            model(**data, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        run()
    elif step is not None:
        from ct_fast.app.step_bench import choose_top_n

        top_n = choose_top_n(model, data, fraction)
        # "reused": a step between refreshes (circuit_refresh10's 9 in 10): the first step finds the circuit
        reuse = dict(refresh_every=1000) if step == "reused" else dict(memory_mode=step)
        tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=1e-5), top_n=top_n, **reuse)
        tuner.step(data)
        run = lambda: tuner.step(data)  # noqa: E731
    with _Count() as counter:
        run()
    rows = [{"op": op, "where": where, "count": n} for (op, where), n in counter.counts.most_common(top)]
    syncs = [{"op": op, "where": where, "count": n} for (op, where), n in counter.syncs.most_common(top)]
    what = "attribution" if step is None else "full fine-tuning step" if step == "full" else f"step ({step})"
    return {"model": model_name, "batch": batch, "seq": seq, "d_model": d_model, "real_d_model": real_d,
            "dtype": dtype, "what": what, "scoring": scoring, "fused_kernels": fused,
            "ops": sum(counter.counts.values()), "syncs": sum(counter.syncs.values()), "top": rows, "top_syncs": syncs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1B", help="a shape name of ct_fast.models.shape_config (llama-*)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256, help="the small d_model the count runs at")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--step", default=None, choices=["auto", "deferred", "two_pass", "lagged", "reused", "full"],
                    help="count a whole faithful tuner step in this memory mode, or a full fine-tuning step "
                         "(default: one attribution)")
    ap.add_argument("--fraction", type=float, default=0.05, help="--step: the circuit's share of the parameters")
    ap.add_argument("--scoring", default="measured", choices=["measured", "torch", "triton"],
                    help="the score kernel's backend (default: auto's measured GPU choice for the dtype)")
    ap.add_argument("--flops", action="store_true", help="also the scoring FLOPs at the real size vs full FT's")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.flops:
        f = scoring_flops(a.model, a.batch, a.seq)
        print(f"{a.model}, {f['tokens']} tokens: scoring {f['scoring_flops'] / 1e12:.2f} TFLOP (residual "
              f"{f['residual_flops'] / 1e12:.2f}, contributions {f['contribution_flops'] / 1e12:.2f}, products "
              f"{f['product_flops'] / 1e12:.2f}) = {f['scoring_vs_full']:.2f}x a full fine-tuning step's "
              f"{f['full_step_flops'] / 1e12:.1f} TFLOP")
    rec = count(a.model, a.batch, a.seq, a.d_model, a.dtype, step=a.step, fraction=a.fraction, scoring=a.scoring)
    print(f"{a.model} ({a.batch} x {a.seq} tokens, {a.dtype}): ~{rec['ops']} launches and {rec['syncs']} host syncs "
          f"per {rec['what']} (fused kernels: {', '.join(rec['fused_kernels']) or 'none'})")
    for r in rec["top"]:
        print(f"{r['count']:7d}  {r['op']:24s} {r['where']}")
    for r in rec["top_syncs"]:
        print(f"{r['count']:7d}  sync {r['op']:19s} {r['where']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": harness.env(), "results": [rec]}, f, indent=1)
    return rec


if __name__ == "__main__":
    main()
