"""Triton fused residual gradients: each downstream node's gradient in residual space, through its norm, written
once in the scoring dtype.

``out[j, t] = norm_vjp(x[t], sum_g rows_g[t, j*w_g:(j+1)*w_g] @ W_g[j])`` for the nodes ``j`` of one block (one
or two projections feeding the same nodes, e.g. an MLP's gate and up), with the norm's backward at ``x[t]``:

    g = dy * gamma,   x_hat = (x - mean) * rstd
    dx = rstd * (g - x_hat * mean(g * x_hat) - mean(g))      (RMSNorm: mean = 0 and no mean(g) term)

Program (node j, block of BT tokens), two passes over d_model in BK blocks: the first builds ``dy`` (tensor-core
dots over the head width, fp32 accumulation) and reduces ``mean(g * x_hat)`` and ``mean(g)``; the second builds
``dy`` again and stores ``dx`` in ``out``'s dtype. The unfused path (``heads_to_residual`` into an fp32 block,
the norm backward in place, a cast to the scoring dtype) moves about 30 bytes per output element through memory;
this writes 2 (bf16) and re-reads only the small head rows and weights, for twice the projection's FLOPs.
"""

import os

import torch
import triton
import triton.language as tl


MAX_UNROLLED = tl.constexpr(2)  # head-width blocks unrolled (Llama-3-8B's 128-wide heads: 2 blocks of 64)


@triton.jit
def _head_rows(rows_ptr, row_stride, j, w, i0, t_offs, t_mask, BI: tl.constexpr):
    """``rows[t, j*w + i0 : j*w + i0 + BI]``: ``[BT, BI]`` of node j's head rows (zero past ``w``)."""
    i_offs = i0 + tl.arange(0, BI)
    return tl.load(rows_ptr + t_offs[:, None] * row_stride + j * w + i_offs[None, :],
                   mask=t_mask[:, None] & (i_offs < w)[None, :], other=0.0)


@triton.jit
def _dot_block(dy, z, w_ptr, ws_i, ws_k, i0, k_offs, k_mask, w, FP32_DOTS: tl.constexpr, BI: tl.constexpr):
    """``dy += z @ W[i0 : i0 + BI, k-block]`` for head rows ``z [BT, BI]`` and one node's weight at ``w_ptr``."""
    i_offs = i0 + tl.arange(0, BI)
    wt = tl.load(w_ptr + i_offs[:, None] * ws_i + k_offs[None, :] * ws_k, mask=(i_offs < w)[:, None] & k_mask[None, :],
                 other=0.0)
    z = z.to(wt.dtype)  # the rows rounded to the weights' (operand) dtype
    if FP32_DOTS:
        return dy + tl.dot(z.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    return dy + tl.dot(z, wt)  # tensor cores, fp32 accumulation


@triton.jit
def _dy_block(dy, z, rows_ptr, row_stride, w_ptr, ws_n, ws_i, ws_k, j, t_offs, t_mask, k_offs, k_mask, w,
              HAS_W: tl.constexpr, FP32_DOTS: tl.constexpr, BI: tl.constexpr, NI: tl.constexpr,
              HOIST: tl.constexpr):
    """``dy[BT, BK] += rows[t, j*w : (j+1)*w] @ W[j][:, k-block]`` (``HAS_W=False``: ``+= rows[t, k-block]``).

    The head width is covered by ``NI`` blocks of ``BI``, unrolled at compile time up to ``MAX_UNROLLED``: the
    d_model loop around this then stays the innermost loop, the one Triton software-pipelines (a runtime width loop
    inside it was the pipelined one instead — a single iteration for head-sized widths, so every d_model block
    waited out its loads). ``HOIST``: ``z`` is the program's head rows (one block), loaded once before the
    loops."""
    if HAS_W and NI <= MAX_UNROLLED:
        for ii in tl.static_range(NI):
            if not HOIST:
                z = _head_rows(rows_ptr, row_stride, j, w, ii * BI, t_offs, t_mask, BI)
            dy = _dot_block(dy, z, w_ptr + j * ws_n, ws_i, ws_k, ii * BI, k_offs, k_mask, w, FP32_DOTS, BI)
    elif HAS_W:  # wide nodes (split-MLP blocks): a runtime loop (unrolled, their tiles outgrow shared memory)
        for i0 in range(0, w, BI):
            zi = _head_rows(rows_ptr, row_stride, j, w, i0, t_offs, t_mask, BI)
            dy = _dot_block(dy, zi, w_ptr + j * ws_n, ws_i, ws_k, i0, k_offs, k_mask, w, FP32_DOTS, BI)
    else:
        dy += tl.load(rows_ptr + t_offs[:, None] * row_stride + k_offs[None, :],
                      mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    return dy


@triton.jit
def _g_block(k0, j, t_offs, t_mask, x_ptr, x_stride, gamma_ptr, mean, rstd,
             r0_ptr, r0_stride, w0_ptr, w0_n, w0_i, w0_k, width0, z0,
             r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1, z1, d,
             HAS_W: tl.constexpr, TWO: tl.constexpr, NORM: tl.constexpr, HAS_GAMMA: tl.constexpr,
             FP32_DOTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, NI: tl.constexpr,
             HOIST: tl.constexpr):
    """``(g, x_hat, k_offs, k_mask)`` of d_model block ``k0`` for the program's tokens: ``g = dy * gamma`` and the
    normalised input (``NORM == 0``: ``g = dy``, ``x_hat`` unused)."""
    k_offs = k0 + tl.arange(0, BK)
    k_mask = k_offs < d
    dy = tl.zeros((BT, BK), tl.float32)
    dy = _dy_block(dy, z0, r0_ptr, r0_stride, w0_ptr, w0_n, w0_i, w0_k, j, t_offs, t_mask, k_offs, k_mask, width0,
                   HAS_W, FP32_DOTS, BI, NI, HOIST)
    if TWO:
        dy = _dy_block(dy, z1, r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, j, t_offs, t_mask, k_offs, k_mask,
                       width1, HAS_W, FP32_DOTS, BI, NI, HOIST)
    x_hat = dy
    if NORM != 0:
        if HAS_GAMMA:
            dy *= tl.load(gamma_ptr + k_offs, mask=k_mask, other=0.0)[None, :]
        x = tl.load(x_ptr + t_offs[:, None] * x_stride + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        x_hat = (x - mean[:, None]) * rstd[:, None]
    return dy, x_hat, k_offs, k_mask


@triton.jit
def _residual_grads_kernel(out_ptr, x_ptr, x_stride, gamma_ptr, mean_ptr, rstd_ptr,
                           r0_ptr, r0_stride, w0_ptr, w0_n, w0_i, w0_k, width0,
                           r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1,
                           r2_ptr, r2_stride, w2_ptr, n_0, n_01, c, d,
                           HAS_W: tl.constexpr, TWO: tl.constexpr,  # a second projection feeds the same nodes
                           NORM: tl.constexpr,  # 0: none, 1: RMSNorm, 2: LayerNorm
                           HAS_GAMMA: tl.constexpr, FP32_DOTS: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, NI: tl.constexpr,
                           HOIST: tl.constexpr,  # the head rows held in registers (one width block)
                           BLOCKS: tl.constexpr):  # node blocks in this launch (each one projection; 1 with TWO)
    """Program (node, token block). ``BLOCKS`` > 1: consecutive blocks of nodes of one norm (a layer's query, key and
    value heads) in one launch — nodes ``[0, n_0)`` read projection 0, ``[n_0, n_01)`` projection 1 (its rows and
    weight; widths and weight strides are projection 0's), the rest ``r2``/``w2`` — so the small key and value
    blocks fill the GPU together with the query block instead of a launch (and a partial wave) each."""
    j = tl.program_id(0)
    out_ptr += j.to(tl.int64) * c * d
    if BLOCKS > 1:  # selects, not branches: a row stride may be a specialised constant
        in2 = j >= n_01
        in1 = (j >= n_0) & (j < n_01)
        r0_ptr = tl.where(in2, r2_ptr, tl.where(in1, r1_ptr, r0_ptr))
        w0_ptr = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w0_ptr))
        r0_stride = tl.where(in2, r2_stride, tl.where(in1, r1_stride, r0_stride))
        j = j - tl.where(in2, n_01, tl.where(in1, n_0, 0))
    t_offs = (tl.program_id(1) * BT + tl.arange(0, BT)).to(tl.int64)
    t_mask = t_offs < c
    z0 = tl.zeros((BT, BI), tl.float32)
    z1 = z0
    if HOIST:
        z0 = _head_rows(r0_ptr, r0_stride, j, width0, 0, t_offs, t_mask, BI)
        if TWO:
            z1 = _head_rows(r1_ptr, r1_stride, j, width1, 0, t_offs, t_mask, BI)
    rstd = tl.zeros((BT,), tl.float32)
    mean = tl.zeros((BT,), tl.float32)
    s_gx = tl.zeros((BT,), tl.float32)  # mean_k g * x_hat
    s_g = tl.zeros((BT,), tl.float32)  # mean_k g (LayerNorm)
    if NORM != 0:  # pass 1: the norm's two per-token reductions
        rstd = tl.load(rstd_ptr + t_offs, mask=t_mask, other=0.0)
        if NORM == 2:
            mean = tl.load(mean_ptr + t_offs, mask=t_mask, other=0.0)
        for k0 in range(0, d, BK):
            g, x_hat, k_offs, k_mask = _g_block(
                k0, j, t_offs, t_mask, x_ptr, x_stride, gamma_ptr, mean, rstd, r0_ptr, r0_stride, w0_ptr, w0_n,
                w0_i, w0_k, width0, z0, r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1, z1, d,
                HAS_W, TWO, NORM, HAS_GAMMA, FP32_DOTS, BT, BK, BI, NI, HOIST)
            s_gx += tl.sum(g * x_hat, axis=1)
            s_g += tl.sum(g, axis=1)
        s_gx = s_gx / d
        s_g = s_g / d
    for k0 in range(0, d, BK):  # pass 2: the gradient again, through the norm, stored once
        g, x_hat, k_offs, k_mask = _g_block(
            k0, j, t_offs, t_mask, x_ptr, x_stride, gamma_ptr, mean, rstd, r0_ptr, r0_stride, w0_ptr, w0_n,
            w0_i, w0_k, width0, z0, r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1, z1, d,
            HAS_W, TWO, NORM, HAS_GAMMA, FP32_DOTS, BT, BK, BI, NI, HOIST)
        if NORM != 0:
            g = rstd[:, None] * (g - x_hat * s_gx[:, None])
            if NORM == 2:
                g -= rstd[:, None] * s_g[:, None]
        tl.store(out_ptr + t_offs[:, None] * d + k_offs[None, :], g.to(out_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & k_mask[None, :])


# tokens and d_model columns per block (head-width blocks BI <= 64), warps: on sm_90, BT = 64 with 8 warps is the
# smallest token block whose dots lower to wgmma (BT = 32: mma.sync) with no stack frame (bench/triton_sm90.py)
TILES = dict(BT=64, BK=64, num_warps=8)
# fp32 (FMA dots): 32 d_model columns per block — 64, once the d_model loop is pipelined, took 255 registers and a
# 320-byte stack frame on sm_90 (106 registers, no stack, at 32)
TILES_FP32 = dict(BT=64, BK=32, num_warps=8)


def tiles(dtype: torch.dtype) -> dict:
    """The default tiles for operands of ``dtype``."""
    return TILES_FP32 if dtype == torch.float32 else TILES


MAX_BLOCKS = 3  # node blocks one launch takes (a layer's query, key and value heads)


def residual_grads(terms, out, x=None, stats=None, gamma=None, kind="none", config=None):
    """Launcher: see ``ct_fast.ops.reference.residual_grads`` (same arguments; ``stats = (mean or None, rstd)``,
    fp32 ``[c]``, computed by the caller). Dots run in the dtype of the first weight (bf16/fp16 on tensor cores,
    fp32 IEEE); under ``TRITON_INTERPRET`` half-precision dots run on fp32 copies of the operands (the interpreter's
    bf16 ``tl.dot`` is wrong), the same exact products."""
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"the Triton residual_grads takes one or two projections per block, got {len(terms)}")
    return _launch([terms], out, x, stats, gamma, kind, config)


def residual_grads_blocks(blocks, out, x=None, stats=None, gamma=None, kind="none", config=None):
    """Consecutive node blocks read through one norm, each from one projection: ``blocks`` a list of ``(rows, heads
    weight [n_b, w, d])`` filling ``out``'s nodes in order (the same ``w`` and weight strides), up to ``MAX_BLOCKS`` a
    launch — ``residual_grads([block], out[rows of the block], ...)`` for each, in fewer, fuller launches."""
    first = 0
    for i in range(0, len(blocks), MAX_BLOCKS):
        part = blocks[i:i + MAX_BLOCKS]
        n = sum(w.shape[0] for _, w in part)
        _launch([[b] for b in part], out[first:first + n], x, stats, gamma, kind, config)
        first += n
    if first != out.shape[0]:
        raise ValueError(f"residual_grads_blocks: the blocks hold {first} nodes, out has {out.shape[0]}")
    return out


def _launch(blocks, out, x, stats, gamma, kind, config):
    """One kernel launch: a block of one or two projections, or up to ``MAX_BLOCKS`` one-projection blocks."""
    n, c, d = out.shape
    if n == 0 or c == 0:
        return out
    terms = blocks[0]
    has_w = terms[0][1] is not None
    packed = []
    for rows, weight in [t for b in blocks for t in b]:
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        if has_w:
            packed.append((rows, rows.stride(0), weight, *weight.stride(), weight.shape[1]))
        else:
            packed.append((rows, rows.stride(0), rows, 0, 0, 0, d))
    if len(blocks) > 1 and (not has_w or any(len(b) != 1 for b in blocks) or any(p[3:] != packed[0][3:] for p in packed)):
        raise ValueError("residual_grads_blocks: blocks of one projection each, whose heads share their width and "
                         "weight strides")
    two = len(blocks) == 1 and len(terms) == 2
    counts = [1 if b[0][1] is None else b[0][1].shape[0] for b in blocks]
    while len(packed) < 3:
        packed.append(packed[0])
    op_dtype = terms[0][1].dtype if has_w else torch.float32
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    norm = {"none": 0, "rmsnorm": 1, "layernorm": 2}[kind]
    if norm:
        mean, rstd = stats
        x = x if x.stride(-1) == 1 else x.contiguous()
    else:
        mean = rstd = x = out
    max_w = max(p[-1] for p in packed) if has_w else 16
    BI = min(64, max(16, triton.next_power_of_2(max_w)))
    NI = triton.cdiv(max_w, BI) if has_w else 1
    cfg = {**tiles(op_dtype), **(config or {})}  # config: tile overrides (bench_score_edges.py --tiles)
    BT, BK = cfg["BT"], cfg["BK"]
    grid = (n, triton.cdiv(c, BT))
    _residual_grads_kernel[grid](out, x, x.stride(0) if norm else 0, gamma if gamma is not None else out,
                                 mean if mean is not None else rstd, rstd, *packed[0], *packed[1], *packed[2][:3],
                                 counts[0], sum(counts[:2]), c, d,
                                 HAS_W=has_w, TWO=two, NORM=norm, HAS_GAMMA=gamma is not None and norm != 0,
                                 FP32_DOTS=op_dtype == torch.float32 or interpreted, BT=BT, BK=BK, BI=BI, NI=NI,
                                 HOIST=has_w and NI == 1, BLOCKS=len(blocks),
                                 num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return out
