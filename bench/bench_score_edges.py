"""Fused attribution scoring (ct_fast.attribute) vs a materialising EAP implementation that keeps
per-node activation and gradient buffers (as the public EAP tools do: here the package's brute-force
oracle, which gives every downstream node its own residual copy) — equal results, time and peak memory.
Then ``ops.score_edges`` alone on one Llama-1B-shaped block (tiny on CPU) per backend and dtype (fp32, bf16):
the fused Triton/CUDA kernels against the torch path; and ``ops.residual_grads`` (a layer's query heads, its MLP
in 128-wide nodes) the same way. ``python bench/bench_score_edges.py [--device cuda]
[--layers 4 --d-model 256 --heads 8 --batch 8 --seq 64]``"""

import argparse
import copy
import os
import sys

import torch

from ct_fast.app import harness  # noqa: E402

import ct_fast  # noqa: E402
from ct_fast.testing import brute_force_scores  # noqa: E402


def model_and_batch(layers, d_model, heads, batch, seq, vocab, device):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, vocab_size=vocab, n_positions=seq,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return model, {"input_ids": ids, "labels": ids}


def activation_backward(model, b):
    """The backward every EAP runs at least: the metric's gradient down to the embeddings' output, no weight
    gradient — its peak is the baseline both attributions' own memory is counted above."""
    held, flags = [], [p.requires_grad for p in model.parameters()]

    def hook(module, args, out):
        held.append(out.detach().requires_grad_())
        return held[-1]

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        torch.autograd.grad(model(**b).loss, held[0])
    finally:
        handle.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def run(device="cpu", layers=4, d_model=256, heads=8, batch=8, seq=64, vocab=1000):
    """Ours against the materialising oracle: equal scores, time, peak memory, and each one's memory above the
    activation backward both need (``overhead_ratio``: the materialising one's per-node activations and residual
    copies against our captures and scoring buffers — the attribution's own memory)."""
    model, b = model_and_batch(layers, d_model, heads, batch, seq, vocab, device)
    graph = ct_fast.ComputationGraph.from_model(model)
    ours = ct_fast.attribute(model, b, graph=graph).scores
    theirs = brute_force_scores(model, b, graph=graph).float()
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    t_ours = harness.median_time(lambda: ct_fast.attribute(model, b, graph=graph), device, warmup=1, reps=3)
    # (one timed call: its Python loop over the edges takes seconds at the GPU stage's shape, and no target reads it)
    t_mat = harness.median_time(lambda: brute_force_scores(model, b, graph=graph), device, warmup=0, reps=1)
    m_base = harness.peak_bytes(lambda: activation_backward(model, b), device)
    m_ours = harness.peak_bytes(lambda: ct_fast.attribute(model, b, graph=graph), device)
    m_mat = harness.peak_bytes(lambda: brute_force_scores(model, b, graph=graph), device)
    return {"bench": "score_edges", "device": device, "layers": layers, "d_model": d_model, "heads": heads,
            "tokens": batch * seq, "n_upstream": len(graph.upstream_nodes), "n_downstream": len(graph.downstream_nodes),
            "max_rel_diff": err, "fused_ms": t_ours * 1e3, "materialising_ms": t_mat * 1e3,
            "backward_peak_mib": m_base / 2**20, "fused_peak_mib": m_ours / 2**20,
            "materialising_peak_mib": m_mat / 2**20, "memory_ratio": m_mat / max(1, m_ours),
            "overhead_ratio": (m_mat - m_base) / max(1 << 20, m_ours - m_base), "speed_ratio": t_mat / t_ours}


# one layer's scoring block of a Llama-3.2-1B-shaped model: 32 heads of 64 of an earlier layer against the 49
# nodes of a later one (32 q, 8 k, 8 v heads and the MLP), 2048 tokens of d_model 2048
OP_SHAPE = {"n_u": 32, "w": 64, "n_d": 49, "c": 2048, "d": 2048}
OP_SHAPE_TINY = {"n_u": 4, "w": 16, "n_d": 5, "c": 32, "d": 32}


def _timed(rec: dict, call, want, device) -> dict:
    """``rec`` with ``call()``'s median time (device events on GPU) and its error against ``want`` relative to the
    largest value — or with ``skipped`` and why, when the call does not run here (not built, resources)."""
    try:
        got = call()
        ms = harness.median_time(call, device, warmup=1, reps=5) * 1e3
    except Exception as e:  # noqa: BLE001 - recorded, the next variant runs
        return {**rec, "skipped": f"{type(e).__name__}: {e}"[:200]}
    return {**rec, "ms": ms, "max_rel_err": ((got.double() - want).abs().max() / want.abs().max()).item()}


def _per_backend(bench, device, dtype, case, backends, call, want, flops) -> list[dict]:
    """One ``_timed`` record per backend (``CT_FAST_BACKEND`` set to it), with TFLOP/s and the time over the
    torch path's (the first). A Triton record carries its kernel's design version (``kernel_version``: the
    module's ``TILES_VERSION``): ``auto`` counts only timings of the kernel as it is."""
    from ct_fast.ops import measured

    recs, base, requested = [], None, os.environ.get("CT_FAST_BACKEND")
    version = measured.tile_versions()[measured.BENCHES[bench][0]]
    for b in backends:
        os.environ["CT_FAST_BACKEND"] = b
        version_field = {"kernel_version": version} if b == "triton" else {}
        try:
            rec = _timed({"bench": bench, "device": device, "dtype": str(dtype), **case, "backend": b, **version_field},
                         call, want, device)
        finally:  # the caller's choice back
            if requested is None:
                os.environ.pop("CT_FAST_BACKEND", None)
            else:
                os.environ["CT_FAST_BACKEND"] = requested
        if "ms" in rec:
            base = rec["ms"] if b == "torch" else base
            rec.update(tflops=flops / rec["ms"] / 1e9, time_vs_torch=None if base is None else rec["ms"] / base)
        recs.append(rec)
    return recs


def _backends(device):
    return ["torch", "cuda", "triton"] if torch.device(device).type == "cuda" else ["torch", "cpp", "triton"]


def _score_inputs(device, dtype, shape) -> tuple:
    """``(delta, W, G)`` of one scoring block of ``shape`` and the fp64 oracle's scores."""
    from ct_fast import ops

    n_u, w, n_d, c, d = (shape[k] for k in ("n_u", "w", "n_d", "c", "d"))
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(c, n_u * w, generator=g).to(device, dtype)
    W = (torch.randn(n_u, w, d, generator=g) / w ** 0.5).to(device, dtype)
    G = torch.randn(n_d, c, d, generator=g).to(device, dtype)
    return (delta, W, G), ops.reference.score_edges(delta.double(), W.double(), G.double())


def run_ops(device="cpu", dtype=torch.float32, shape=None, backends=None) -> list[dict]:
    """``ops.score_edges`` alone on one block, every backend that runs here (fused kernels vs the torch path):
    time (device events on GPU) and the error against the fp64 oracle relative to the largest score."""
    from ct_fast import ops

    shape = shape or (OP_SHAPE if torch.device(device).type == "cuda" else OP_SHAPE_TINY)
    args, want = _score_inputs(device, dtype, shape)
    n_u, w, n_d, c, d = (shape[k] for k in ("n_u", "w", "n_d", "c", "d"))
    flops = 2 * n_u * c * w * d + 2 * n_u * n_d * c * d  # the projection of each head, then the dots
    return _per_backend("score_edges_op", device, dtype, shape, backends or _backends(device),
                        lambda: ops.score_edges(*args), want, flops)


# one token chunk of the deepest layers' scoring in a Llama-3.2-1B-shaped model: the 49 nodes of a layer against
# every earlier upstream group — 15 attention layers (32 heads of 64) and 16 vector groups (the embedding and the
# MLP outputs) — 256 tokens of d_model 2048 (the torch path's block of contributions: 496 x 256 x 2048)
# the last span (two layers, 98 nodes) of a Llama-3.2-1B-shaped model against its 15 attention and 16 residual-vector
# upstream groups, 2048 tokens scored in the chunks each path takes in the scorer (torch: 264 rows, as its
# contribution block is [496, c, d]; the fused kernel: 1337)
LAYER_SHAPE = {"head_groups": 15, "heads": 32, "w": 64, "vector_groups": 16, "n_d": 98, "c": 2048, "d": 2048}
LAYER_SHAPE_TINY = {"head_groups": 3, "heads": 4, "w": 16, "vector_groups": 2, "n_d": 5, "c": 24, "d": 32}


_LAYER_INPUTS: dict = {}  # the last shape's inputs: on a GPU ~0.6G host random numbers (seconds) and an fp64 oracle


def _layer_inputs(device, dtype, shape, oracle: bool = True) -> tuple:
    """``(sources, G, fp64 oracle scores or None, FLOPs)`` of one layer span's scoring call of ``shape``; the same
    inputs for the same (device, dtype, shape) until another is asked for (the product parts, the layer call and the
    tile variants time one set), the oracle made at the first call that wants it."""
    from ct_fast import ops

    key = (str(device), dtype, tuple(sorted(shape.items())))
    if key not in _LAYER_INPUTS:
        _LAYER_INPUTS.clear()  # (one set at a time: the GPU's fp32 set is ~2.4 GB)
        hg, n, w, vg, n_d, c, d = (shape[k] for k in ("head_groups", "heads", "w", "vector_groups", "n_d", "c", "d"))
        g = torch.Generator().manual_seed(0)
        sources = [(torch.randn(c, n * w, generator=g).to(device, dtype),
                    (torch.randn(n, w, d, generator=g) / w ** 0.5).to(device, dtype)) for _ in range(hg)]
        sources += [(torch.randn(c, d, generator=g).to(device, dtype), None) for _ in range(vg)]
        G = torch.randn(n_d, c, d, generator=g).to(device, dtype)
        _LAYER_INPUTS[key] = [sources, G, None, 2 * hg * n * c * w * d + 2 * (hg * n + vg) * n_d * c * d]
    held = _LAYER_INPUTS[key]
    if oracle and held[2] is None:
        held[2] = torch.cat([ops.reference.score_edges(x.double(), None if W is None else W.double(), held[1].double())
                             for x, W in held[0]])
    return tuple(held)


def run_layer_ops(device="cpu", dtype=torch.float32, shape=None, backends=None) -> list[dict]:
    """``ops.score_edges_into`` on one layer span's gradients against many upstream groups — the scorer's real
    calls, in the token chunks the scorer takes for the backend (``attribution.scoring_chunk``): the torch path
    makes every group's contributions into one block and runs one GEMM per chunk; Triton one launch for all the
    head groups, one for all the vectors and one reduction per chunk. Time and error against the fp64 oracle."""
    from ct_fast import ops
    from ct_fast.attribution import chunk_elements, scoring_chunk

    shape = shape or (LAYER_SHAPE if torch.device(device).type == "cuda" else LAYER_SHAPE_TINY)
    sources, G, want, flops = _layer_inputs(device, dtype, shape)
    rows, (n_d, c, d) = want.shape[0], G.shape
    out = torch.zeros(rows, n_d, device=device)
    budget = chunk_elements(device) if torch.device(device).type == "cuda" else 4 * n_d * d  # tiny: 4-row chunks

    def call():
        fused = ops.choose_backend("score_edges", G.device, (dtype,)) == "triton"
        chunk = scoring_chunk(n_d, rows, d, budget, fused)
        workspace = None if fused else torch.empty(rows * min(chunk, c) * d, dtype=dtype, device=device)
        out.zero_()
        for a in range(0, c, chunk):
            ops.score_edges_into(out, [(x[a:a + chunk], W) for x, W in sources], G[:, a:a + chunk],
                                 workspace=workspace)
        return out

    if backends is None and torch.device(device).type == "cuda":
        backends = ["torch", "triton"]  # cuda: a kernel and an add per group (~100x the torch path's time)
    return _per_backend("score_edges_layer", device, dtype, shape, backends or _backends(device), call, want, flops)


# the residual gradients of a Llama-3.2-1B-shaped layer's 32 query heads (one projection, RMSNorm) and of its MLP
# cut into 64 nodes of 128 (gate and up), 2048 tokens of d_model 2048
RESID_SHAPES = [{"n": 32, "w": 64, "terms": 1, "c": 2048, "d": 2048}, {"n": 64, "w": 128, "terms": 2, "c": 2048,
                                                                         "d": 2048}]
RESID_SHAPES_TINY = [{"n": 4, "w": 16, "terms": 1, "c": 32, "d": 48}, {"n": 2, "w": 24, "terms": 2, "c": 20, "d": 40}]


def _resid_inputs(device, dtype, shape) -> tuple:
    """``(terms, out, norm, x)`` of one residual-gradient block of ``shape`` (RMSNorm) and the fp64 oracle's
    gradients."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from ct_fast import ops

    n, w, k, c, d = (shape[x] for x in ("n", "w", "terms", "c", "d"))
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(d).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
    x = torch.randn(c, d, generator=g).to(device, dtype)
    terms = [(torch.randn(c, n * w, generator=g).to(device, dtype),
              (torch.randn(n, w, d, generator=g) / w ** 0.5).to(device, dtype)) for _ in range(k)]
    want = ops.reference.residual_grads([(r.double(), W.double()) for r, W in terms],
                                        torch.empty(n, c, d, dtype=torch.float64, device=device),
                                        copy.deepcopy(norm).double(), x.double())
    return (terms, torch.empty(n, c, d, dtype=dtype, device=device), norm, x), want


def run_torch_parts(device="cpu", dtype=torch.bfloat16, shape=None, splits=None) -> list[dict]:
    """Where the torch path's time goes on one chunk of the layer call (the first, as the scorer chunks it): the
    contributions block ``A [rows, c, d]`` written by ``heads_to_residual`` (a bmm with K = w per head group: bound
    by writing A), the product ``A @ G^T`` (M = rows, N = n_d, K = c * d: a skinny GEMM with a huge K, bound by
    reading A if cuBLAS splits K well) into 16-byte aligned rows as the scorer writes it (``ops.gemm.mm``), the same
    product unaligned (``[rows, n_d]`` contiguous: the scorer before the padding), and the product split explicitly
    over ``s`` token blocks (one bmm into aligned ``[s, rows, n_d]``, one sum) — the data to decide whether the
    scorer should split K itself. ``a_gbps``: A's bytes over the time (written, or read)."""
    from ct_fast import ops
    from ct_fast.attribution import chunk_elements, scoring_chunk

    gpu = torch.device(device).type == "cuda"
    shape, splits = shape or (LAYER_SHAPE if gpu else LAYER_SHAPE_TINY), splits or ((8, 32) if gpu else (2, 4))
    sources, G, _, _ = _layer_inputs(device, dtype, shape, oracle=False)
    n_d, c, d = G.shape
    rows = sum(1 if W is None else W.shape[0] for _, W in sources)
    budget = chunk_elements(device) if gpu else 4 * n_d * d
    chunk = min(c, scoring_chunk(n_d, rows, d, budget, False))
    chunk = max(max(splits), chunk // max(splits) * max(splits))  # a whole number of every split's token blocks
    G = G[:, :chunk]
    A = torch.empty(rows, chunk, d, dtype=dtype, device=device)

    def contributions():
        r = 0
        for x, W in sources:
            n = 1 if W is None else W.shape[0]
            ops.heads_to_residual(x[:chunk], W, out=A[r:r + n], dtype=dtype)
            r += n
        return A

    contributions()
    want = (A.view(rows, -1).double() @ G.reshape(n_d, -1).double().t())
    calls = {"contributions": contributions,
             "products": lambda: ops.gemm.mm(A.view(rows, -1), G.reshape(n_d, -1).t()),  # as the scorer runs it
             "products_unaligned": lambda: A.view(rows, -1) @ G.reshape(n_d, -1).t()}  # its rows n_d elements apart
    for s in splits:  # as the scorer splits them where these timings say so (measured.derive_products)
        calls[f"products_split{s}"] = lambda s=s: ops.gemm.split_mm(A.view(rows, s, -1), G.reshape(n_d, s, -1))
    recs = []
    a_bytes = A.numel() * A.element_size()
    for part, call in calls.items():
        rec = _timed({"bench": "score_edges_parts", "device": device, "dtype": str(dtype), **shape, "chunk": chunk,
                      "rows": rows, "part": part}, call, A.double() if part == "contributions" else want, device)
        if "ms" in rec:
            rec["a_gbps"] = a_bytes / rec["ms"] / 1e6
        recs.append(rec)
    return recs


def run_residual_ops(device="cpu", dtype=torch.float32, shapes=None, backends=None) -> list[dict]:
    """``ops.residual_grads`` per backend on each shape: the Triton kernels (the norm's reductions, then the
    gradients written once in ``dtype``) against the torch composite (the norm folded into the bmm's operands, then
    one reduction and one in-place pass: ``reference.residual_grads_scaled``). ``out_gbps``: the output's bytes over
    the time — the bound is the device's write bandwidth."""
    from ct_fast import ops

    recs = []
    for shape in shapes or (RESID_SHAPES if torch.device(device).type == "cuda" else RESID_SHAPES_TINY):
        args, want = _resid_inputs(device, dtype, shape)
        flops = 2 * shape["terms"] * shape["n"] * shape["c"] * shape["w"] * shape["d"]
        out_bytes = args[1].numel() * args[1].element_size()
        for rec in _per_backend("residual_grads_op", device, dtype, shape, backends or ["torch", "triton"],
                                lambda: ops.residual_grads(*args), want, flops):
            recs.append(dict(rec, out_gbps=out_bytes / rec["ms"] / 1e6) if "ms" in rec else rec)
    return recs


# tile variants of the Triton kernels (all compile for sm_90 within an H100's shared memory: bench/triton_sm90.py);
# the first is the launcher's default. The GPU check times them so that the defaults follow measurements.
# session 12 (H100, one block): 16-node blocks 2.5x the default's time, BU 32 1.6x, 2 stages 1.2x, 4 warps 1.08x;
# now longer token tiles (each W tile used for 32 tokens, not 16) and wider d_model tiles (each z tile for 32 columns)
SCORE_TILES = [{}, {"num_warps": 4}, {"BT": 32, "num_stages": 1}, {"BK": 32, "num_stages": 1},
               {"BU": 32, "BT": 32, "num_stages": 1}]
RESID_TILES = [{}, {"NB": 48}, {"num_stages": 2}, {"BT": 128, "num_warps": 8}, {"BK": 128, "num_warps": 8},
               {"dots": {"BT": 128, "num_warps": 8}}]


def run_tiles(device="cpu", dtype=torch.bfloat16) -> list[dict]:
    """The Triton ``score_edges`` and ``residual_grads`` kernels per tile variant on the op shapes (tiny on CPU):
    time, error against the fp64 oracle, time over the default tiles (the data ``measured.derive_tiles`` sets the
    GPU tiles by)."""
    from ct_fast import kernels, ops
    from ct_fast.ops import measured

    gpu = torch.device(device).type == "cuda"
    shape, rs = (OP_SHAPE, RESID_SHAPES[0]) if gpu else (OP_SHAPE_TINY, RESID_SHAPES_TINY[0])
    score_args, score_want = _score_inputs(device, dtype, shape)
    (terms, out, norm, x), resid_want = _resid_inputs(device, dtype, rs)
    mean, rstd, gamma = ops.reference.norm_stats(norm, x)
    # the layer span's call in one chunk of the fused path's length (1337 rows at llama-1B)
    layer = dict(LAYER_SHAPE, c=1337) if gpu else LAYER_SHAPE_TINY
    layer_sources, layer_G, layer_want, _ = _layer_inputs(device, dtype, layer)
    layer_out = torch.zeros(layer_want.shape, device=device)
    variants = [("score_edges", shape, cfg, score_want) for cfg in SCORE_TILES]
    variants += [("score_edges_layer", layer, cfg, layer_want) for cfg in SCORE_TILES]
    variants += [("residual_grads", rs, cfg, resid_want) for cfg in RESID_TILES]
    calls = {"score_edges": lambda cfg: kernels.score_edges(*score_args, config=cfg),
             "score_edges_layer": lambda cfg: kernels.score_edges_into(layer_out.zero_(), layer_sources, layer_G,
                                                                       config=cfg),
             "residual_grads": lambda cfg: kernels.residual_grads(terms, out, x, (mean, rstd), gamma, "rmsnorm",
                                                                  config=cfg)}
    versions = measured.tile_versions()
    versions["score_edges_layer"] = versions["score_edges"]
    recs, base = [], {}
    for kernel, case, cfg, want in variants:  # (the first variant of each kernel: its default tiles)
        rec = _timed({"bench": "tiles", "device": device, "dtype": str(dtype), "kernel": kernel,
                      "kernel_version": versions[kernel], **case, "config": cfg}, lambda: calls[kernel](cfg), want,
                     device)
        if "ms" in rec:
            base.setdefault(kernel, rec["ms"])
            rec["time_vs_default"] = rec["ms"] / base[kernel]
        recs.append(rec)
    return recs


def test_attribute(benchmark):
    model, b = model_and_batch(2, 64, 4, 2, 16, 100, "cpu")
    graph = ct_fast.ComputationGraph.from_model(model)
    benchmark(ct_fast.attribute, model, b, graph=graph)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tiles", action="store_true", help="only time the Triton kernels' tile variants")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.tiles:
        recs = run_tiles(a.device)
        for o in recs:
            print(f"{o['kernel']:>14} {str(o['config']):>36}: " + (
                f"skipped ({o['skipped']})" if "skipped" in o else
                f"{o['ms']:.3f} ms, {o['time_vs_default']:.2f}x the default's time, max rel err {o['max_rel_err']:.1e}"))
        print(harness.write(f"{a.device}_tiles", recs, a.out))
        sys.exit(0)
    r = run(a.device, a.layers, a.d_model, a.heads, a.batch, a.seq)
    print(f"fused {r['fused_ms']:.0f} ms, {r['fused_peak_mib']:.1f} MiB | materialising {r['materialising_ms']:.0f} ms, "
          f"{r['materialising_peak_mib']:.1f} MiB | memory {r['memory_ratio']:.1f}x less ({r['overhead_ratio']:.1f}x "
          f"above the {r['backward_peak_mib']:.1f} MiB activation backward), {r['speed_ratio']:.1f}x faster,"
          f" max rel diff {r['max_rel_diff']:.1e}")
    recs = [r]
    # the records are written after each part (a run stopped at its time limit keeps what it timed)
    harness.write(f"{a.device}_score_edges", recs, a.out)
    for dtype in (torch.float32, torch.bfloat16):
        for o in run_torch_parts(a.device, dtype):
            recs.append(o)
            print(f"{o['bench']} {o['dtype']:>14} {o['part']:>18}: " + (
                f"skipped ({o['skipped']})" if "skipped" in o else
                f"{o['ms']:.3f} ms, A at {o['a_gbps']:.0f} GB/s, max rel err {o['max_rel_err']:.1e}"))
        harness.write(f"{a.device}_score_edges", recs, a.out)
        for part in (run_ops, run_layer_ops, run_residual_ops):
            for o in part(a.device, dtype):
                recs.append(o)
                print(f"{o['bench']} {o['dtype']:>14} {o['backend']:>6}: " + (
                    f"skipped ({o['skipped']})" if "skipped" in o else
                    f"{o['ms']:.3f} ms, {o['tflops']:.2f} TFLOP/s, {o['time_vs_torch']:.2f}x torch's time, "
                    f"max rel err {o['max_rel_err']:.1e}"))
            harness.write(f"{a.device}_score_edges", recs, a.out)
    print(harness.write(f"{a.device}_score_edges", recs, a.out))
