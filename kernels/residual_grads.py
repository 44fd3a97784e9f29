"""Triton fused residual gradients: each downstream node's gradient in residual space, through its norm, written
once in the scoring dtype.

``out[j, t] = norm_vjp(x[t], sum_g rows_g[t, j*w_g:(j+1)*w_g] @ W_g[j])`` for the nodes ``j`` of one block (one
or two projections feeding the same nodes, e.g. an MLP's gate and up), with the norm's backward at ``x[t]``:

    g = dy * gamma,   x_hat = (x - mean) * rstd
    dx = rstd * (g - x_hat * mean(g * x_hat) - mean(g))      (RMSNorm: mean = 0 and no mean(g) term)

The two per-(node, token) reductions need no ``dy``: ``dy . (gamma * x_hat) = z . (W (gamma * x_hat))`` for the
node's head rows ``z = rows[t, j*w:(j+1)*w]`` — the projection of the normalised input (what the forward's own
projection computed, less its bias), dotted with the head rows over the head width; and ``dy . gamma = z . (W
gamma)``. So two launches:

1. ``_norm_dots_kernel`` (program: token block x node): ``s[j, t] = z . (W_j (gamma * x_hat[t])) / d`` (and
   ``z . (W_j gamma) / d`` for LayerNorm) — a GEMM over d_model with a head-width dot in its epilogue, only
   ``[nodes, tokens]`` fp32 written;
2. ``_residual_grads_kernel`` (program: token block x d_model block x a group of nodes): the norm input's tile read
   once, then per node one tensor-core dot over the head width and the norm backward as its epilogue, stored once
   (and, when asked, the stored tile's column sums: the mean ablation's token sums without a second read).

Memory traffic is then the output itself (2 bytes per element in bf16) plus small, cache-resident inputs; the
previous single kernel built ``dy`` twice per node (once per reduction pass) and read the norm input and the
weights once per node and token block: ~5 bytes moved per byte written (0.59 ms for 268 MB on an H200, 10% of its
bandwidth; 40 ms of a llama-1B refresh-1 step).
"""

import os

import torch
import triton
import triton.language as tl


MAX_UNROLLED = tl.constexpr(2)  # head-width blocks unrolled (Llama-3-8B's 128-wide heads: 2 blocks of 64)
# the kernels' design, for their tile timings (bench_score_edges.py --tiles -> ct_fast.ops.measured.derive_tiles):
# 1 the single two-pass kernel (to session 14), 2 the reductions' GEMM and the node-group kernel
TILES_VERSION = 2


@triton.jit
def _block_of(j, r0_ptr, r0_stride, w0_ptr, r1_ptr, r1_stride, w1_ptr, r2_ptr, r2_stride, w2_ptr, n_0, n_01,
              BLOCKS: tl.constexpr):
    """``(rows_ptr, row_stride, weight_ptr, local j)`` of node ``j`` of a launch: ``BLOCKS`` > 1 — consecutive
    blocks of one projection each (a layer's query, key and value heads) — nodes ``[0, n_0)`` read projection 0,
    ``[n_0, n_01)`` projection 1, the rest projection 2. Selects, not branches (a row stride may be a specialised
    constant)."""
    if BLOCKS > 1:
        in2 = j >= n_01
        in1 = (j >= n_0) & (j < n_01)
        r0_ptr = tl.where(in2, r2_ptr, tl.where(in1, r1_ptr, r0_ptr))
        w0_ptr = tl.where(in2, w2_ptr, tl.where(in1, w1_ptr, w0_ptr))
        r0_stride = tl.where(in2, r2_stride, tl.where(in1, r1_stride, r0_stride))
        j = j - tl.where(in2, n_01, tl.where(in1, n_0, 0))
    return r0_ptr, r0_stride, w0_ptr, j


@triton.jit
def _head_rows(rows_ptr, row_stride, j, w, i0, t_offs, t_mask, BI: tl.constexpr):
    """``rows[t, j*w + i0 : j*w + i0 + BI]``: ``[BT, BI]`` fp32 of node j's head rows (zero past ``w``)."""
    i_offs = i0 + tl.arange(0, BI)
    return tl.load(rows_ptr + t_offs[:, None] * row_stride + j * w + i_offs[None, :],
                   mask=t_mask[:, None] & (i_offs < w)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _grad_rows(r0_ptr, r0_stride, r1_ptr, r1_stride, t_offs, k_offs, mask, TWO: tl.constexpr):
    """``[BT, BK]`` fp32 of a weightless node's gradient: its rows (``TWO``: the sum of both terms' rows)."""
    g = tl.load(r0_ptr + t_offs[:, None] * r0_stride + k_offs[None, :], mask=mask, other=0.0).to(tl.float32)
    if TWO:
        g += tl.load(r1_ptr + t_offs[:, None] * r1_stride + k_offs[None, :], mask=mask, other=0.0).to(tl.float32)
    return g


@triton.jit
def _weight_tile(w_ptr, ws_i, ws_k, i0, w, k_offs, k_mask, BI: tl.constexpr):
    """``W[i0 : i0 + BI, k-block]`` of one node's weight at ``w_ptr``: ``[BI, BK]`` (zero past ``w`` and ``d``)."""
    i_offs = i0 + tl.arange(0, BI)
    return tl.load(w_ptr + i_offs[:, None] * ws_i + k_offs[None, :] * ws_k,
                   mask=(i_offs < w)[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _dot(a, b, FP32_DOTS: tl.constexpr):
    """``a @ b`` with fp32 accumulation: tensor cores on half-precision operands, IEEE fp32 otherwise."""
    if FP32_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _x_hat(x_ptr, x_stride, mean, rstd, t_offs, t_mask, k_offs, k_mask, NORM: tl.constexpr):
    """``[BT, BK]`` fp32 normalised input of the program's tokens (``NORM == 1``: RMSNorm, no mean)."""
    x = tl.load(x_ptr + t_offs[:, None] * x_stride + k_offs[None, :], mask=t_mask[:, None] & k_mask[None, :],
                other=0.0).to(tl.float32)
    if NORM == 2:
        x = x - mean[:, None]
    return x * rstd[:, None]


@triton.jit
def _head_dots(s_gx, s_g, j, t_offs, t_mask, d, rows_ptr, row_stride, w_ptr, ws_n, ws_i, ws_k, width,
               x_ptr, x_stride, mean, rstd, gamma_ptr, HAS_GAMMA: tl.constexpr, NORM: tl.constexpr,
               FP32_DOTS: tl.constexpr, SPLIT_X: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               BI: tl.constexpr):
    """``s_gx += z . (W_j (gamma * x_hat))`` and (LayerNorm) ``s_g += z . (W_j gamma)`` for one projection's node
    j, over the head width in blocks of ``BI`` (each a GEMM over d_model: ``[BT, BK] x [BK, BI]`` per step). The
    normalised input enters the dot rounded to the weights' dtype — or, ``SPLIT_X`` (half-precision weights, an
    fp32 output), as a high and a low half-precision part in two dots, so the reductions keep fp32's precision."""
    w_ptr += j * ws_n
    for i0 in range(0, width, BI):
        acc = tl.zeros((BT, BI), tl.float32)
        gw = tl.zeros((BI,), tl.float32)
        for k0 in range(0, d, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_mask = k_offs < d
            xn = _x_hat(x_ptr, x_stride, mean, rstd, t_offs, t_mask, k_offs, k_mask, NORM)
            wt = _weight_tile(w_ptr, ws_i, ws_k, i0, width, k_offs, k_mask, BI)
            if HAS_GAMMA:
                ga = tl.load(gamma_ptr + k_offs, mask=k_mask, other=0.0)
                xn = xn * ga[None, :]
                if NORM == 2:
                    gw += tl.sum(wt.to(tl.float32) * ga[None, :], axis=1)
            elif NORM == 2:
                gw += tl.sum(wt.to(tl.float32), axis=1)
            hi = xn.to(wt.dtype)
            acc = acc + _dot(hi, tl.trans(wt), FP32_DOTS)
            if SPLIT_X:
                acc = acc + _dot((xn - hi.to(tl.float32)).to(wt.dtype), tl.trans(wt), FP32_DOTS)
        z = _head_rows(rows_ptr, row_stride, j, width, i0, t_offs, t_mask, BI)
        s_gx += tl.sum(acc * z, axis=1)
        if NORM == 2:
            s_g += tl.sum(z * gw[None, :], axis=1)
    return s_gx, s_g


@triton.jit
def _norm_dots_kernel(s_ptr, x_ptr, x_stride, gamma_ptr, mean_ptr, rstd_ptr,
                      r0_ptr, r0_stride, w0_ptr, w0_n, w0_i, w0_k, width0,
                      r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1,
                      r2_ptr, r2_stride, w2_ptr, n_0, n_01, n, c, d,
                      HAS_W: tl.constexpr, TWO: tl.constexpr, NORM: tl.constexpr, HAS_GAMMA: tl.constexpr,
                      FP32_DOTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr,
                      NI: tl.constexpr, BLOCKS: tl.constexpr, SPLIT_X: tl.constexpr):
    """Program (token block, node j): ``s[0, j, t] = mean_k(g * x_hat)``, and for LayerNorm ``s[1, j, t] =
    mean_k(g)``, ``g = dy * gamma`` — the norm backward's two reductions, as dots over the head width (module
    docstring). ``HAS_W=False`` (one node whose rows are its residual gradient): the reductions over d_model."""
    t_offs = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    t_mask = t_offs < c
    j = tl.program_id(1)
    rstd = tl.load(rstd_ptr + t_offs, mask=t_mask, other=0.0)
    mean = rstd
    if NORM == 2:
        mean = tl.load(mean_ptr + t_offs, mask=t_mask, other=0.0)
    s_gx = tl.zeros((BT,), tl.float32)
    s_g = tl.zeros((BT,), tl.float32)
    if HAS_W:
        rows_ptr, row_stride, w_ptr, jj = _block_of(j, r0_ptr, r0_stride, w0_ptr, r1_ptr, r1_stride, w1_ptr, r2_ptr,
                                                    r2_stride, w2_ptr, n_0, n_01, BLOCKS)
        s_gx, s_g = _head_dots(s_gx, s_g, jj, t_offs, t_mask, d, rows_ptr, row_stride, w_ptr, w0_n,
                               w0_i, w0_k, width0, x_ptr, x_stride, mean, rstd, gamma_ptr, HAS_GAMMA, NORM,
                               FP32_DOTS, SPLIT_X, BT, BK, BI)
        if TWO:
            s_gx, s_g = _head_dots(s_gx, s_g, jj, t_offs, t_mask, d, r1_ptr, r1_stride, w1_ptr, w1_n,
                                   w1_i, w1_k, width1, x_ptr, x_stride, mean, rstd, gamma_ptr, HAS_GAMMA, NORM,
                                   FP32_DOTS, SPLIT_X, BT, BK, BI)
    else:
        for k0 in range(0, d, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_mask = k_offs < d
            g = _grad_rows(r0_ptr, r0_stride, r1_ptr, r1_stride, t_offs, k_offs, t_mask[:, None] & k_mask[None, :],
                           TWO)
            if HAS_GAMMA:
                g = g * tl.load(gamma_ptr + k_offs, mask=k_mask, other=0.0)[None, :]
            s_gx += tl.sum(g * _x_hat(x_ptr, x_stride, mean, rstd, t_offs, t_mask, k_offs, k_mask, NORM), axis=1)
            if NORM == 2:
                s_g += tl.sum(g, axis=1)
    s_ptr += j.to(tl.int64) * c + t_offs
    tl.store(s_ptr, s_gx / d, mask=t_mask)
    if NORM == 2:
        tl.store(s_ptr + n * c, s_g / d, mask=t_mask)


@triton.jit
def _dy_tile(rows_ptr, row_stride, w_ptr, ws_i, ws_k, j, width, t_offs, t_mask, k_offs, k_mask,
             FP32_DOTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, NI: tl.constexpr):
    """``rows[t, j*w : (j+1)*w] @ W_j[:, k-block]``: ``[BT, BK]`` fp32 (``w_ptr`` at node j's weight); the head
    width in ``NI`` blocks of ``BI``, unrolled up to ``MAX_UNROLLED``, a runtime loop beyond (split-MLP nodes)."""
    dy = tl.zeros((BT, BK), tl.float32)
    if NI <= MAX_UNROLLED:
        for ii in tl.static_range(NI):
            wt = _weight_tile(w_ptr, ws_i, ws_k, ii * BI, width, k_offs, k_mask, BI)
            z = _head_rows(rows_ptr, row_stride, j, width, ii * BI, t_offs, t_mask, BI)
            dy = dy + _dot(z.to(wt.dtype), wt, FP32_DOTS)  # the rows rounded to the weights' (operand) dtype
    else:
        for i0 in range(0, width, BI):
            wt = _weight_tile(w_ptr, ws_i, ws_k, i0, width, k_offs, k_mask, BI)
            z = _head_rows(rows_ptr, row_stride, j, width, i0, t_offs, t_mask, BI)
            dy = dy + _dot(z.to(wt.dtype), wt, FP32_DOTS)
    return dy


@triton.jit
def _residual_grads_kernel(out_ptr, s_ptr, sum_ptr, x_ptr, x_stride, gamma_ptr, mean_ptr, rstd_ptr,
                           r0_ptr, r0_stride, w0_ptr, w0_n, w0_i, w0_k, width0,
                           r1_ptr, r1_stride, w1_ptr, w1_n, w1_i, w1_k, width1,
                           r2_ptr, r2_stride, w2_ptr, n_0, n_01, n, c, d,
                           HAS_W: tl.constexpr, TWO: tl.constexpr,  # a second projection feeds the same nodes
                           NORM: tl.constexpr,  # 0: none, 1: RMSNorm, 2: LayerNorm
                           HAS_GAMMA: tl.constexpr, FP32_DOTS: tl.constexpr,
                           BT: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, NI: tl.constexpr,
                           NB: tl.constexpr,  # nodes per program
                           BLOCKS: tl.constexpr,  # node blocks in this launch (each one projection; 1 with TWO)
                           SUMS: tl.constexpr):  # also each node's token sums of its tile (sum_ptr)
    """Program (d_model block, token block, group of ``NB`` nodes): the normalised input's tile once, then per node
    ``dy = rows_j @ W_j[:, k-block]`` (one tensor-core dot over the head width) and
    ``out[j] = rstd * (gamma * dy - x_hat * s[0, j] - s[1, j])`` stored once in ``out``'s dtype; ``SUMS``: the
    stored values' column sums over the program's tokens into ``sum_ptr[token block, j, k-block]`` (fp32)."""
    k_offs = tl.program_id(0) * BK + tl.arange(0, BK)
    k_mask = k_offs < d
    t_offs = (tl.program_id(1) * BT + tl.arange(0, BT)).to(tl.int64)
    t_mask = t_offs < c
    mask = t_mask[:, None] & k_mask[None, :]
    j0 = tl.program_id(2) * NB
    x_hat = tl.zeros((BT, BK), tl.float32)
    rstd = tl.zeros((BT,), tl.float32)
    gamma = tl.zeros((BK,), tl.float32)
    if NORM != 0:
        rstd = tl.load(rstd_ptr + t_offs, mask=t_mask, other=0.0)
        mean = rstd
        if NORM == 2:
            mean = tl.load(mean_ptr + t_offs, mask=t_mask, other=0.0)
        x_hat = _x_hat(x_ptr, x_stride, mean, rstd, t_offs, t_mask, k_offs, k_mask, NORM)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + k_offs, mask=k_mask, other=0.0)
    # int32 offsets of the tile within one node's [c, d] (c * d < 2^31: checked by the launcher), held across the
    # node loop (a tile of 64-bit pointers would hold twice the registers); node j0's base, then the next
    tile = (tl.program_id(1) * BT + tl.arange(0, BT))[:, None] * d + k_offs[None, :]
    out_ptr += j0.to(tl.int64) * c * d
    s_ptr += j0.to(tl.int64) * c + t_offs
    sum_ptr += (tl.program_id(1).to(tl.int64) * n + j0) * d + k_offs
    for j in range(j0, tl.minimum(j0 + NB, n)):
        if HAS_W:
            rows_ptr, row_stride, w_ptr, jj = _block_of(j, r0_ptr, r0_stride, w0_ptr, r1_ptr, r1_stride, w1_ptr,
                                                        r2_ptr, r2_stride, w2_ptr, n_0, n_01, BLOCKS)
            dy = _dy_tile(rows_ptr, row_stride, w_ptr + jj * w0_n, w0_i, w0_k, jj, width0, t_offs, t_mask, k_offs,
                          k_mask, FP32_DOTS, BT, BK, BI, NI)
            if TWO:
                dy += _dy_tile(r1_ptr, r1_stride, w1_ptr + jj * w1_n, w1_i, w1_k, jj, width1, t_offs, t_mask,
                               k_offs, k_mask, FP32_DOTS, BT, BK, BI, NI)
        else:  # the rows are the node's gradient (one node)
            dy = _grad_rows(r0_ptr, r0_stride, r1_ptr, r1_stride, t_offs, k_offs, mask, TWO)
        g = dy
        if NORM != 0:
            if HAS_GAMMA:
                g = g * gamma[None, :]
            g = g - x_hat * tl.load(s_ptr, mask=t_mask, other=0.0)[:, None]
            if NORM == 2:
                g = g - tl.load(s_ptr + n * c, mask=t_mask, other=0.0)[:, None]
            g = g * rstd[:, None]
        g = g.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tile, g, mask=mask)
        if SUMS:  # of the stored (rounded) values, as a sum of the output would add them
            tl.store(sum_ptr, tl.sum(tl.where(mask, g.to(tl.float32), 0.0), axis=0), mask=k_mask)
        out_ptr += c * d
        s_ptr += c
        sum_ptr += d


# the residual-gradient kernel's tiles (token x d_model block, nodes a program, warps); on sm_90 a 64-token block
# is the smallest whose dots lower to wgmma. bench/triton_sm90.py: 160-175 registers a thread at 64 x 64 and at
# 64 x 128 tiles (Triton 3.6 / 3.9) — with 4 warps two or three programs fit an SM (57 KiB shared memory each)
TILES = dict(BT=64, BK=64, NB=16, num_warps=4, num_stages=3)
# fp32 (FMA dots): narrower d_model blocks keep the fp32 operands in registers
TILES_FP32 = dict(BT=64, BK=32, NB=16, num_warps=8, num_stages=2)
# the norm reductions' GEMM (token block x one node's head-width block, over d_model in blocks of BK)
DOT_TILES = dict(BT=64, BK=64, num_warps=4, num_stages=3)
DOT_TILES_FP32 = dict(BT=32, BK=32, num_warps=4, num_stages=2)


def tiles(dtype: torch.dtype) -> dict:
    """The default tiles for operands of ``dtype``."""
    return TILES_FP32 if dtype == torch.float32 else TILES


def dot_tiles(dtype: torch.dtype) -> dict:
    """The norm-reduction kernel's default tiles for operands of ``dtype``."""
    return DOT_TILES_FP32 if dtype == torch.float32 else DOT_TILES


MAX_BLOCKS = 3  # node blocks one launch takes (a layer's query, key and value heads)


def residual_grads(terms, out, x=None, stats=None, gamma=None, kind="none", config=None, sums=None):
    """Launcher: see ``ct_fast.ops.reference.residual_grads`` (same arguments; ``stats = (mean or None, rstd)``,
    fp32 ``[c]``, computed by the caller). Dots run in the dtype of the first weight (bf16/fp16 on tensor cores,
    fp32 IEEE); under ``TRITON_INTERPRET`` half-precision dots run on fp32 copies of the operands (the interpreter's
    bf16 ``tl.dot`` is wrong), the same exact products. ``config``: tile overrides of the residual kernel, and of the
    reduction kernel under ``"dots"``. ``sums``: fp32 ``[n, d]``, set to ``out.sum(1)`` (of the stored values) from
    per-token-block partials the kernel writes — no second read of ``out``."""
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"the Triton residual_grads takes one or two projections per block, got {len(terms)}")
    return _launch([terms], out, x, stats, gamma, kind, config, sums)


def residual_grads_blocks(blocks, out, x=None, stats=None, gamma=None, kind="none", config=None, sums=None):
    """Consecutive node blocks read through one norm, each from one projection: ``blocks`` a list of ``(rows, heads
    weight [n_b, w, d])`` filling ``out``'s nodes in order (the same ``w`` and weight strides), up to ``MAX_BLOCKS`` a
    launch — ``residual_grads([block], out[rows of the block], ...)`` for each, in fewer, fuller launches."""
    first = 0
    for i in range(0, len(blocks), MAX_BLOCKS):
        part = blocks[i:i + MAX_BLOCKS]
        n = sum(w.shape[0] for _, w in part)
        _launch([[b] for b in part], out[first:first + n], x, stats, gamma, kind, config,
                None if sums is None else sums[first:first + n])
        first += n
    if first != out.shape[0]:
        raise ValueError(f"residual_grads_blocks: the blocks hold {first} nodes, out has {out.shape[0]}")
    return out


def _launch(blocks, out, x, stats, gamma, kind, config, sums=None):
    """The launches of a block of one or two projections, or of up to ``MAX_BLOCKS`` one-projection blocks: the
    norm's reductions (``_norm_dots_kernel``, with a norm), then the gradients (``_residual_grads_kernel``), then
    (``sums``) the sum of its per-token-block column sums."""
    n, c, d = out.shape
    if not out.is_contiguous() or (sums is not None and not sums.is_contiguous()):
        raise ValueError("residual_grads kernel: out [n, c, d] and sums [n, d] must be contiguous (it writes them by "
                         "offsets; ct_fast.ops.residual_grads routes other layouts to the torch path)")
    if n == 0 or c == 0:
        if sums is not None:
            sums.zero_()
        return out
    if c * d >= 2 ** 31:
        raise ValueError(f"residual_grads: one node's block of {c} x {d} elements needs 64-bit offsets; score in "
                         "shorter token chunks")
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
        mean = rstd if mean is None else mean
        x = x if x.stride(-1) == 1 else x.contiguous()
        # [1 or 2, n, c] fp32: mean(g * x_hat) (and mean(g), LayerNorm) per node and token
        s = torch.empty((2 if norm == 2 else 1, n, c), dtype=torch.float32, device=out.device)
    else:
        mean = rstd = x = s = out
    max_w = max(p[-1] for p in packed) if has_w else 16
    BI = min(64, max(16, triton.next_power_of_2(max_w)))
    NI = triton.cdiv(max_w, BI) if has_w else 1
    consts = dict(HAS_W=has_w, TWO=two, NORM=norm, HAS_GAMMA=gamma is not None and norm != 0,
                  FP32_DOTS=op_dtype == torch.float32 or interpreted, BI=BI, NI=NI, BLOCKS=len(blocks))
    args = (x, x.stride(0) if norm else 0, gamma if gamma is not None else out, mean, rstd, *packed[0], *packed[1],
            *packed[2][:3], counts[0], sum(counts[:2]), n, c, d)
    from ..ops import measured

    # the defaults, the variant committed GPU timings chose (on a GPU), tile overrides (bench_score_edges.py --tiles)
    config = {**measured.tiles("residual_grads", op_dtype, out.device), **(config or {})}
    dots = config.pop("dots", {})
    if norm:
        dcfg = {**dot_tiles(op_dtype), **dots}
        split = has_w and op_dtype != torch.float32 and out.dtype == torch.float32
        _norm_dots_kernel[(triton.cdiv(c, dcfg["BT"]), n)](s, *args, **consts, SPLIT_X=split, BT=dcfg["BT"],
                                                           BK=dcfg["BK"], num_warps=dcfg["num_warps"],
                                                           num_stages=dcfg["num_stages"])
    cfg = {**tiles(op_dtype), **config}
    BT, BK, NB = cfg["BT"], cfg["BK"], cfg["NB"]
    grid = (triton.cdiv(d, BK), triton.cdiv(c, BT), triton.cdiv(n, NB))
    partial = out if sums is None else torch.empty((grid[1], n, d), dtype=torch.float32, device=out.device)
    _residual_grads_kernel[grid](out, s, partial, *args, **consts, BT=BT, BK=BK, NB=NB, SUMS=sums is not None,
                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if sums is not None:
        torch.sum(partial, 0, out=sums)
    return out
