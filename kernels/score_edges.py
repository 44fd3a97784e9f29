"""Triton fused attribution scoring: ``S[u, n] += sum_t (delta[t, u] @ W[u]) . G[n, t]``, on tensor cores.

Program (block of BU upstream nodes, block of BN downstream nodes, token split). Per token block (BT) and
d_model block (BK):

1. the upstream nodes' residual contributions ``a[u] = delta[t-block, u*w:(u+1)*w] @ W[u][:, k-block]`` — one
   batched dot ``[BU, BT, BW] x [BU, BW, BK]`` kept in registers (``W=None``: ``delta`` already is the single
   node's contribution, w = d);
2. their products with the downstream gradients, as a second dot over the flattened (token, d) block, transposed
   so that its M dimension is the (up to 64) downstream nodes — a Hopper ``wgmma`` needs M >= 64:
   ``acc[BN, BU] += G[n-block, t-block, k-block] (loaded as [BN, BT*BK]) @ a.reshape(BU, BT*BK).T``.

Neither the per-node contributions ``[n_u, tokens, d]`` nor any product is written to memory. Operands stay in
the input dtype — bf16/fp16 on tensor cores (the contribution rounded to it between the two dots, as the torch
path rounds its contribution block), fp32 as IEEE fp32 dots — and accumulation is fp32. Each token split writes
its own ``[n_u, n_d]`` partial, summed afterwards in a fixed order: no atomics, so the scores (and the circuit
they select) are the same bits on every run.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _score_edges_kernel(delta_ptr, w_ptr, g_ptr, s_ptr, n_u, w, n_d, c, d, tokens_per_split, split_stride,
                        HAS_W: tl.constexpr,  # False: delta rows already are residual vectors (w == d, n_u == 1)
                        OP: tl.constexpr,  # the operand dtype: the contribution is rounded to it between the dots
                        FP32_DOTS: tl.constexpr,  # dots on fp32 operands, IEEE (fp32 inputs; bf16 when interpreted)
                        BU: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    u_offs = tl.program_id(0) * BU + tl.arange(0, BU)
    n_offs = tl.program_id(1) * BN + tl.arange(0, BN)
    t_begin = tl.program_id(2) * tokens_per_split
    u_mask, n_mask = u_offs < n_u, n_offs < n_d
    i_offs = tl.arange(0, BW)
    acc = tl.zeros((BN, BU), dtype=tl.float32)  # transposed: M = downstream nodes, so the second dot is a wgmma
    j = tl.arange(0, BT * BK)  # the flattened (token, d_model) index of one tile
    for t0 in range(0, tokens_per_split, BT):  # tokens_per_split: a multiple of BT
        t_offs = (t_begin + t0 + tl.arange(0, BT)).to(tl.int64)  # 64-bit offsets: G may hold over 2^31 elements
        t_mask = t_offs < c
        j_t = t_begin + t0 + j // BK
        if HAS_W:  # [BU, BT, BW]: each upstream node's head activations
            z = tl.load(delta_ptr + t_offs[None, :, None] * (n_u * w) + u_offs[:, None, None] * w
                        + i_offs[None, None, :],
                        mask=u_mask[:, None, None] & t_mask[None, :, None] & (i_offs[None, None, :] < w), other=0.0)
        for k0 in range(0, d, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_mask = k_offs < d
            if HAS_W:
                wt = tl.load(w_ptr + u_offs[:, None, None] * (w * d) + i_offs[None, :, None] * d
                             + k_offs[None, None, :],
                             mask=u_mask[:, None, None] & (i_offs[None, :, None] < w) & k_mask[None, None, :],
                             other=0.0)
                if FP32_DOTS:
                    a = tl.dot(z.to(tl.float32), wt.to(tl.float32), input_precision="ieee")  # [BU, BT, BK]
                else:
                    a = tl.dot(z, wt)  # tensor cores, fp32 accumulation
            else:
                a = tl.load(delta_ptr + u_offs[:, None, None] * 0 + t_offs[None, :, None] * d + k_offs[None, None, :],
                            mask=(u_offs[:, None, None] == 0) & t_mask[None, :, None] & k_mask[None, None, :],
                            other=0.0)
            # [BN, BT*BK], loaded flat (no reshape of a 3-D tile, which is a register-layout conversion)
            j_k = k0 + j % BK
            g2 = tl.load(g_ptr + n_offs[:, None].to(tl.int64) * c * d + j_t[None, :].to(tl.int64) * d + j_k[None, :],
                         mask=n_mask[:, None] & (j_t < c)[None, :] & (j_k < d)[None, :], other=0.0)
            a2 = tl.trans(tl.reshape(a.to(OP), (BU, BT * BK)))  # [BT*BK, BU], token-major as g2's columns
            if FP32_DOTS:
                acc += tl.dot(g2.to(tl.float32), a2.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(g2, a2)
    s_ptr += tl.program_id(2).to(tl.int64) * split_stride  # this split's partial (rows [n_u] of it)
    tl.store(s_ptr + u_offs[None, :] * n_d + n_offs[:, None], acc, mask=u_mask[None, :] & n_mask[:, None])


@triton.jit
def _accumulate_partials_kernel(p_ptr, out_ptr, splits, n, n_cols, out_row_stride, out_col_stride, alpha,
                                BLOCK: tl.constexpr):
    """``out[i, j] += alpha * sum_s P[s, i, j]`` over the flat ``[n = rows * n_cols]`` index, splits summed in
    order (the same bits every run); ``out`` any 2-D strides (a block of a larger score matrix)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        total += tl.load(p_ptr + s * n + offs, mask=mask, other=0.0)
    where = out_ptr + (offs // n_cols) * out_row_stride + (offs % n_cols) * out_col_stride
    tl.store(where, tl.load(where, mask=mask, other=0.0) + alpha * total, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def max_head_width(dtype: torch.dtype) -> int:
    """The widest upstream head the kernel takes (the whole ``[BU, BT, BW]`` head tile is loaded at once): 128 for
    bf16/fp16 (Llama-3-8B's heads; 2 pipeline stages keep it at 200 KiB of shared memory), 64 for fp32 (256 KiB at
    128, over an H100's 227 KiB). ``ct_fast.ops.score_edges`` runs wider heads (an unsplit MLP) on the torch path."""
    return 64 if dtype == torch.float32 else 128


def tile_config(dtype: torch.dtype, head_width: int = 64) -> dict:
    """Tiles, warps and pipeline depth per operand dtype (``tl.dot`` needs every dimension >= 16); ``BN`` is an upper
    bound (the launcher takes the smallest power of two >= 16 covering the downstream nodes). 64 downstream nodes per
    program cover one layer of a 1B-8B Llama (49 nodes), so each contribution is produced once per layer read (16-node
    blocks did it 4x over). What ``bench/triton_sm90.py`` reads from the sm_90 cubins (Triton 3.6 and 3.9, launch
    arguments specialised as the JIT does): bf16 — the second dot on ``wgmma``, the first (per-head, batched) on
    ``mma.sync``, no stack frame, 200 KiB shared memory with 3 stages; fp32 — 144 KiB (smaller d_model blocks and no
    pipelining keep it within an H100's 227 KiB)."""
    if dtype == torch.float32:
        return dict(BU=16, BN=64, BT=16, BK=16, num_warps=8, num_stages=1)
    return dict(BU=16, BN=64, BT=16, BK=16, num_warps=8, num_stages=3 if head_width <= 64 else 2)


def _prepare(delta, up_weight, dt):
    """``(delta, W, n_u, w)`` in the operand dtype, contiguous; refuses heads wider than the tile."""
    delta = delta.to(dt).contiguous()
    if up_weight is None:
        return delta, None, 1, None
    up_weight = up_weight.to(dt).contiguous()
    n_u, w = up_weight.shape[0], up_weight.shape[1]
    if w > max_head_width(dt):
        raise ValueError(f"score_edges kernel: heads of width {w} > {max_head_width(dt)} for {dt} (the torch path "
                         "runs them: ct_fast.ops.score_edges routes them there)")
    return delta, up_weight, n_u, w


def _launch(delta, up_weight, n_u, w, grad_down, partials, splits, config):
    """One scoring kernel: upstream group ``(delta, W)`` against ``grad_down``, its ``splits`` token-split
    partials written into ``partials`` (``[splits, >= n_u, n_d]`` fp32 view: every element of its first n_u
    rows written)."""
    dt = grad_down.dtype
    n_d, c, d = grad_down.shape
    BW = max(16, triton.next_power_of_2(w)) if up_weight is not None else 16  # no head tile without W
    cfg = {**tile_config(dt, BW), **(config or {})}  # config: tile overrides (bench_score_edges.py --tiles)
    BT = cfg["BT"]
    BN = min(cfg["BN"], max(16, triton.next_power_of_2(n_d)))  # no work on absent downstream rows
    per_split = triton.cdiv(triton.cdiv(c, splits), BT) * BT
    if triton.cdiv(c, per_split) != splits:
        raise ValueError(f"score_edges kernel: {splits} token splits of {c} tokens leave some empty (tile BT={BT})")
    grid = (triton.cdiv(n_u, cfg["BU"]), triton.cdiv(n_d, BN), splits)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    _score_edges_kernel[grid](delta, up_weight if up_weight is not None else delta, grad_down, partials,
                              n_u, w or d, n_d, c, d, per_split, partials.stride(0), HAS_W=up_weight is not None,
                              OP=_TL_DTYPES[dt], FP32_DOTS=dt == torch.float32 or (interpreted and dt == torch.bfloat16),
                              BU=cfg["BU"], BW=BW, BN=BN, BT=BT, BK=cfg["BK"],
                              num_stages=cfg["num_stages"], num_warps=cfg["num_warps"])


def token_splits(c: int, dtype: torch.dtype, config=None) -> int:
    """Token splits of a ``c``-row block (up to 64 programs along the tokens; each a multiple of the BT tile)."""
    BT = {**tile_config(dtype), **(config or {})}["BT"]
    splits = max(1, min(triton.cdiv(c, BT), 64))
    return triton.cdiv(c, triton.cdiv(triton.cdiv(c, splits), BT) * BT)


def score_edges(delta, up_weight, grad_down, config=None):
    """Launcher with the signature of ``torch.ops.ct_fast.score_edges``: fp32 ``[n_u, n_d]``.

    Operands in ``grad_down``'s dtype (fp32, bf16 or fp16; ``delta``/``up_weight`` are cast to it, as the torch
    path does), fp32 accumulation. Under ``TRITON_INTERPRET=1`` bf16 dots run on fp32 copies of the (bf16) operands:
    the interpreter's bf16 ``tl.dot`` reads the raw bits as integers (a 16x16 check: 1e10 for values of order 1),
    and the exact products of bf16 values with fp32 accumulation are what tensor cores compute."""
    dt = grad_down.dtype
    delta, up_weight, n_u, w = _prepare(delta, up_weight, dt)
    grad_down = grad_down.contiguous()
    n_d, c, d = grad_down.shape
    if n_u == 0 or n_d == 0 or c == 0:
        return torch.zeros(n_u, n_d, dtype=torch.float32, device=delta.device)
    splits = token_splits(c, dt, config)
    partials = torch.empty(splits, n_u, n_d, dtype=torch.float32, device=delta.device)  # every element written
    _launch(delta, up_weight, n_u, w, grad_down, partials, splits, config)
    return partials.sum(0)


def score_edges_into(out, sources, grad_down, alpha=1.0, config=None):
    """``out += alpha * [score_edges(delta, W, grad_down) for (delta, W) in sources]`` stacked by rows: several
    upstream groups against one gradient block in one kernel each, then one reduction kernel that sums every
    group's token splits (fixed order) into ``out`` (fp32 ``[sum n_u, n_d]``, any strides; a block of the score
    matrix). ``len(sources) + 1`` launches where separate calls take three each (kernel, split sum, add)."""
    dt = grad_down.dtype
    grad_down = grad_down.contiguous()
    n_d, c, d = grad_down.shape
    prepared = [_prepare(delta, up_weight, dt) for delta, up_weight in sources]
    rows = sum(n_u for _, _, n_u, _ in prepared)
    if out.shape != (rows, n_d) or out.dtype != torch.float32:
        raise ValueError(f"score_edges_into: out is {tuple(out.shape)} {out.dtype}, the sources score "
                         f"[{rows}, {n_d}] fp32")
    if rows == 0 or n_d == 0 or c == 0:
        return out
    splits = token_splits(c, dt, config)
    partials = torch.empty(splits, rows, n_d, dtype=torch.float32, device=out.device)  # every element written
    r = 0
    for delta, up_weight, n_u, w in prepared:
        _launch(delta, up_weight, n_u, w, grad_down, partials[:, r:r + n_u], splits, config)
        r += n_u
    n, BLOCK = rows * n_d, 1024
    _accumulate_partials_kernel[(triton.cdiv(n, BLOCK),)](partials, out, splits, n, n_d, out.stride(0),
                                                          out.stride(1), float(alpha), BLOCK=BLOCK)
    return out
