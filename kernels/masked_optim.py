"""Triton masked optimizers: AdamW and SGD on the selected rows of parameters, their compact fp32 states and
gradients (layout: ``ct_fast.ops.library``).

One program per selected row ``r`` of one parameter (one launch per parameter), walking the row's ``M`` columns
in ``BLOCK`` steps, with ``p = param[rows[r], :]``, ``g = grads[r]`` and the state rows ``slots[r]``. A column view
(``param.stride(1) != 1``: an output projection's head columns, seen as rows) and short rows (``M < 32``) go by tiles
instead (``_masked_adamw_tiles_kernel``): one program per ``BR`` consecutive selected rows, walking the ``M`` columns in
``[BM, BR]`` tiles. Along a column view's rows the parameter is contiguous, along its columns the gradient and
states are: a row program would read each parameter element from a different memory sector. A tile of rows that are
one run of consecutive indices (a head's columns always are) addresses the parameter as ``first + i``, so the
compiler knows its contiguity and coalesces those accesses, and moves the tile between the two layouts through
shared memory; a tile of scattered rows reads them through the index. Same element math, same bits. AdamW::

    t = step[slot] + 1 (written back);  p *= 1 - lr * wd;  m += (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g^2
    p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

SGD: ``g += wd * p``; ``buf = g`` on a row's first step, else ``momentum * buf + (1 - dampening) * g``;
``g = g + momentum * buf`` (nesterov) or ``buf``; ``p += -lr * g``.

Hygiene, so that a masked step needs nothing from the host and can be captured in a CUDA graph:

- the step count is bumped and the bias corrections computed inside the kernel, in fp64 from the row's integer
  count (``b^t`` by repeated squaring), as the C++/CUDA kernels do with ``pow``; no per-row host math;
- ``lr`` is a float argument or read from a one-element device tensor (``lr_tensor``);
- ``found_inf`` (a one-element fp32 device tensor): a first pass over every selected gradient sets it to 1 on a
  non-finite value; each update program reads it and writes nothing (parameter, states, step count) when it is
  non-zero;
- no descriptor table and no host-to-device copy: everything a launch needs is a kernel argument;
- the scalars as torch.optim's single-tensor step takes them: ``1 - beta1``, ``1 - beta2``, ``1 - lr * wd`` (float
  lr) and ``1 - dampening`` worked out in double on the host and rounded once (``1 - float32(beta2)`` in fp32 is off
  by 1.3e-5 at beta2 = 0.999), the betas and a float lr in the bias corrections as double (``hi + lo`` pairs);
- the fp32 math rounds as torch does (``sqrt_rn``, ``div_rn``), and bf16 parameters are stored rounded to
  nearest-even by integer arithmetic (the interpreter's cast truncates; on a GPU the result is the same as the
  hardware's round-to-nearest-even conversion).
"""

import struct

import torch
import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a kernel may read a global only as a constexpr


@triton.jit
def _store_param(addr, x, mask, BF16: tl.constexpr):
    """Store fp32 ``x`` to the parameter's dtype; bf16 rounds to nearest-even (NaN stays a quiet NaN)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        tl.store(addr, (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(addr, x.to(addr.dtype.element_ty), mask=mask)


@triton.jit
def _pow_count(base, t):
    """``base ** t`` in fp64 for an integer-valued count ``t`` in [0, 2^25) (fp32 counts are exact below 2^24)."""
    n = t.to(tl.int32)
    b = tl.cast(base, tl.float64)
    acc = b * 0.0 + 1.0
    for i in tl.static_range(25):
        acc = tl.where(((n >> i) & 1) != 0, acc * b, acc)
        b = b * b
    return acc


@triton.jit
def _nonfinite_kernel(g_ptr, n, found_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    bad = ~(tl.abs(x) <= FLT_MAX)  # NaN compares false
    hit = tl.max(bad.to(tl.int32), axis=0) > 0
    tl.store(found_ptr, 1.0, mask=hit)


@triton.jit
def _row_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr, found_ptr, M, LR_PTR: tl.constexpr, CHECK: tl.constexpr):
    """This program's selected row: ``(r, row, slot, lr, t = step[slot] + 1, columns to write)``; while
    ``found_ptr[0] != 0`` (``CHECK``) no column is written."""
    r = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + r).to(tl.int64)
    slot = tl.load(slots_ptr + r).to(tl.int64)
    if LR_PTR:
        lr_v = tl.load(lr_ptr).to(tl.float32)
    else:
        lr_v = lr
    t = tl.load(step_ptr + slot) + 1.0
    n_cols = M
    if CHECK:
        # a flagged step masks every column (scalar & block masks: the interpreter cannot AND a scalar into a
        # block mask)
        n_cols = tl.where(tl.load(found_ptr) == 0.0, M, 0)
    return r, row, slot, lr_v, t, n_cols


@triton.jit
def _row_end(step_ptr, slot, t, found_ptr, CHECK: tl.constexpr):
    """Write the row's step count back (not while ``found_ptr[0] != 0``)."""
    if CHECK:
        tl.store(step_ptr + slot, t, mask=tl.load(found_ptr) == 0.0)
    else:
        tl.store(step_ptr + slot, t)


@triton.jit
def _adamw_elements(p, g, m, v, decay, step_size, bc2_sqrt, w1, beta2, w2, eps):
    """One AdamW update of fp32 ``p`` (its dtype's value), ``g``, ``m``, ``v`` (``w1``, ``w2``: ``1 - beta1``,
    ``1 - beta2`` as torch takes them, rounded once from double): ``(p, m, v)`` (the row and the tile kernels share
    it: the same bits either way)."""
    p = p * decay
    m = m + w1 * (g - m)
    v = v * beta2 + w2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    return p + tl.div_rn(-step_size * m, denom), m, v


@triton.jit
def _adamw_constants(lr_v, lr_lo, decay, weight_decay, t, b1_hi, b1_lo, b2_hi, b2_lo, LR_PTR: tl.constexpr):
    """``(step_size, sqrt(bias correction 2), decay)`` of step ``t``: the bias corrections in fp64 from the betas as
    double (each passed as an fp32 pair ``hi + lo``: a kernel's float arguments are fp32), rounded once to fp32 (as
    torch's Python-float math and the C++ kernels). A float lr is the double ``lr_v + lr_lo`` and its decay the
    host's; a device lr (``LR_PTR``) is its fp32 value, and its decay ``1 - lr * wd`` in fp32 (the reference's tensor
    math)."""
    if LR_PTR:
        lr = tl.cast(lr_v, tl.float64)
        decay = 1.0 - lr_v * weight_decay
    else:
        lr = tl.cast(lr_v, tl.float64) + tl.cast(lr_lo, tl.float64)
    b1 = tl.cast(b1_hi, tl.float64) + tl.cast(b1_lo, tl.float64)
    b2 = tl.cast(b2_hi, tl.float64) + tl.cast(b2_lo, tl.float64)
    step_size = (lr / (1.0 - _pow_count(b1, t))).to(tl.float32)
    bc2_sqrt = tl.sqrt(1.0 - _pow_count(b2, t)).to(tl.float32)
    return step_size, bc2_sqrt, decay


@triton.jit
def _sgd_elements(p, g, b, first, lr, momentum, one_minus_dampening, weight_decay, HAS_WD: tl.constexpr,
                  MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """One SGD update of fp32 ``p``, ``g`` and the momentum buffer ``b`` (``first``: the row's first step;
    ``one_minus_dampening`` rounded once from double, as torch takes it): ``(p, b)``."""
    if HAS_WD:
        g = g + weight_decay * p
    if MOMENTUM:
        b = tl.where(first, g, b * momentum + one_minus_dampening * g)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    return p + (-lr) * g, b


@triton.jit
def _masked_adamw_kernel(p_ptr, stride_row, stride_col, g_ptr, m_ptr, v_ptr, step_ptr, rows_ptr, slots_ptr, M,
                         lr, lr_lo, lr_ptr, found_ptr, b1_hi, b1_lo, b2_hi, b2_lo, w1, w2, eps, weight_decay, decay,
                         LR_PTR: tl.constexpr,  # read lr from lr_ptr (a device tensor) instead of the float
                         CHECK: tl.constexpr,  # skip everything while found_ptr[0] != 0
                         MAXIMIZE: tl.constexpr,  # negate the gradient (torch's maximize=True)
                         BF16: tl.constexpr,  # bf16 parameter: round to nearest-even by hand
                         BLOCK: tl.constexpr):  # columns per iteration
    r, row, slot, lr_v, t, n_cols = _row_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr, found_ptr, M, LR_PTR,
                                               CHECK)
    step_size, bc2_sqrt, decay = _adamw_constants(lr_v, lr_lo, decay, weight_decay, t, b1_hi, b1_lo, b2_hi, b2_lo,
                                                  LR_PTR)
    p_row = p_ptr + row * stride_row
    g_row = g_ptr + r * M
    m_row = m_ptr + slot * M
    v_row = v_ptr + slot * M
    for c0 in range(0, M, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_row + cols, mask=mask, other=0.0)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_row + cols, mask=mask, other=0.0)
        v = tl.load(v_row + cols, mask=mask, other=0.0)
        p_addr = p_row + cols.to(tl.int64) * stride_col
        p = tl.load(p_addr, mask=mask, other=0.0).to(tl.float32)
        p, m, v = _adamw_elements(p, g, m, v, decay, step_size, bc2_sqrt, w1, b2_hi, w2, eps)
        tl.store(m_row + cols, m, mask=mask)
        tl.store(v_row + cols, v, mask=mask)
        _store_param(p_addr, p, mask, BF16)
    _row_end(step_ptr, slot, t, found_ptr, CHECK)


@triton.jit
def _masked_sgd_kernel(p_ptr, stride_row, stride_col, g_ptr, buf_ptr, step_ptr, rows_ptr, slots_ptr, M,
                       lr, lr_ptr, found_ptr, momentum, one_minus_dampening, weight_decay,
                       LR_PTR: tl.constexpr, CHECK: tl.constexpr, MAXIMIZE: tl.constexpr, BF16: tl.constexpr,
                       HAS_WD: tl.constexpr,  # weight_decay != 0
                       MOMENTUM: tl.constexpr,  # a momentum buffer (momentum != 0)
                       NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    r, row, slot, lr_v, t, n_cols = _row_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr, found_ptr, M, LR_PTR,
                                               CHECK)
    first = t == 1.0  # torch starts the buffer as the gradient
    p_row = p_ptr + row * stride_row
    g_row = g_ptr + r * M
    b_row = buf_ptr + slot * M
    for c0 in range(0, M, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_row + cols, mask=mask, other=0.0)
        if MAXIMIZE:
            g = -g
        p_addr = p_row + cols.to(tl.int64) * stride_col
        p = tl.load(p_addr, mask=mask, other=0.0).to(tl.float32)
        b = g
        if MOMENTUM:
            b = tl.load(b_row + cols, mask=mask, other=0.0)
        p, b = _sgd_elements(p, g, b, first, lr_v, momentum, one_minus_dampening, weight_decay, HAS_WD, MOMENTUM,
                             NESTEROV)
        if MOMENTUM:
            tl.store(b_row + cols, b, mask=mask)
        _store_param(p_addr, p, mask, BF16)
    _row_end(step_ptr, slot, t, found_ptr, CHECK)


@triton.jit
def _tile_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr, found_ptr, K, M, LR_PTR: tl.constexpr,
                CHECK: tl.constexpr, BR: tl.constexpr):
    """This program's ``BR`` selected rows (from ``program_id * BR``): ``(rr, rmask, row, slot, lr, t, ok, n_cols,
    first, run)``: positions in the selection, which exist, the parameter rows, state slots, lr, each row's new step
    count, whether the update may write (per row: ``found_ptr[0] == 0``), the columns to write (none on a flagged
    step), the first row, and whether the rows are ``first + i`` (all ``BR`` of them: a run of consecutive rows)."""
    r0 = tl.program_id(0).to(tl.int64) * BR
    rr = r0 + tl.arange(0, BR)
    rmask = rr < K
    row = tl.load(rows_ptr + rr, mask=rmask, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + rr, mask=rmask, other=0).to(tl.int64)
    if LR_PTR:
        lr_v = tl.load(lr_ptr).to(tl.float32)
    else:
        lr_v = lr
    t = tl.load(step_ptr + slot, mask=rmask, other=0.0) + 1.0
    ok = rmask
    n_cols = M
    if CHECK:
        ok = rmask & (tl.load(found_ptr + rr * 0) == 0.0)
        n_cols = tl.where(tl.load(found_ptr) == 0.0, M, 0)
    first = tl.load(rows_ptr + r0).to(tl.int64)  # (a program's first row exists)
    run = tl.sum(((row == first + tl.arange(0, BR)) & rmask).to(tl.int32), axis=0) == BR
    return rr, rmask, row, slot, lr_v, t, ok, n_cols, first, run


@triton.jit
def _tile_grads(g_ptr, rr, rmask, M, n_cols, c0, MAXIMIZE: tl.constexpr, BM: tl.constexpr):
    """The tile at columns ``c0 .. c0 + BM`` of a program's rows: ``(cols, mask [BM, BR], gradient [BM, BR])``."""
    cols = c0 + tl.arange(0, BM)
    mask = (cols < n_cols)[:, None] & rmask[None, :]
    g = tl.load(g_ptr + rr[None, :] * M + cols[:, None], mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    return cols, mask, g


@triton.jit
def _adamw_tiles(p_ptr, prow, stride_col, g_ptr, m_ptr, v_ptr, rr, slot, rmask, M, n_cols, decay, step_size,
                 bc2_sqrt, w1, beta2, w2, eps, MAXIMIZE: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr):
    """AdamW over the ``M`` columns of a program's rows in ``[BM, BR]`` tiles; ``prow``: each row's parameter offset
    (``row * stride_row``)."""
    for c0 in range(0, M, BM):
        cols, mask, g = _tile_grads(g_ptr, rr, rmask, M, n_cols, c0, MAXIMIZE, BM)
        m_addr = m_ptr + slot[None, :] * M + cols[:, None]
        v_addr = v_ptr + slot[None, :] * M + cols[:, None]
        p_addr = p_ptr + prow[None, :] + cols[:, None].to(tl.int64) * stride_col
        m = tl.load(m_addr, mask=mask, other=0.0)
        v = tl.load(v_addr, mask=mask, other=0.0)
        p = tl.load(p_addr, mask=mask, other=0.0).to(tl.float32)
        p, m, v = _adamw_elements(p, g, m, v, decay, step_size[None, :], bc2_sqrt[None, :], w1, beta2, w2, eps)
        tl.store(m_addr, m, mask=mask)
        tl.store(v_addr, v, mask=mask)
        _store_param(p_addr, p, mask, BF16)


@triton.jit
def _masked_adamw_tiles_kernel(p_ptr, stride_row, stride_col, g_ptr, m_ptr, v_ptr, step_ptr, rows_ptr, slots_ptr, K,
                               M, lr, lr_lo, lr_ptr, found_ptr, b1_hi, b1_lo, b2_hi, b2_lo, w1, w2, eps, weight_decay,
                               decay, LR_PTR: tl.constexpr, CHECK: tl.constexpr, MAXIMIZE: tl.constexpr,
                               BF16: tl.constexpr, BR: tl.constexpr,  # selected rows per program
                               BM: tl.constexpr):  # columns per tile
    rr, rmask, row, slot, lr_v, t, ok, n_cols, first, run = _tile_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr,
                                                                         found_ptr, K, M, LR_PTR, CHECK, BR)
    step_size, bc2_sqrt, decay = _adamw_constants(lr_v, lr_lo, decay, weight_decay, t, b1_hi, b1_lo, b2_hi, b2_lo,
                                                  LR_PTR)
    if run:  # offsets the compiler sees as consecutive (unit stride_row: coalesced parameter accesses)
        _adamw_tiles(p_ptr, (first + tl.arange(0, BR)) * stride_row, stride_col, g_ptr, m_ptr, v_ptr, rr, slot,
                     rmask, M, n_cols, decay, step_size, bc2_sqrt, w1, b2_hi, w2, eps, MAXIMIZE, BF16, BM)
    else:
        _adamw_tiles(p_ptr, row * stride_row, stride_col, g_ptr, m_ptr, v_ptr, rr, slot, rmask, M, n_cols, decay,
                     step_size, bc2_sqrt, w1, b2_hi, w2, eps, MAXIMIZE, BF16, BM)
    tl.store(step_ptr + slot, t, mask=ok)


@triton.jit
def _sgd_tiles(p_ptr, prow, stride_col, g_ptr, buf_ptr, rr, slot, rmask, M, n_cols, first_step, lr, momentum,
               one_minus_dampening, weight_decay, MAXIMIZE: tl.constexpr, BF16: tl.constexpr, HAS_WD: tl.constexpr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, BM: tl.constexpr):
    """SGD over the ``M`` columns of a program's rows in ``[BM, BR]`` tiles (as ``_adamw_tiles``)."""
    for c0 in range(0, M, BM):
        cols, mask, g = _tile_grads(g_ptr, rr, rmask, M, n_cols, c0, MAXIMIZE, BM)
        p_addr = p_ptr + prow[None, :] + cols[:, None].to(tl.int64) * stride_col
        b_addr = buf_ptr + slot[None, :] * M + cols[:, None]
        p = tl.load(p_addr, mask=mask, other=0.0).to(tl.float32)
        b = g
        if MOMENTUM:
            b = tl.load(b_addr, mask=mask, other=0.0)
        p, b = _sgd_elements(p, g, b, first_step[None, :], lr, momentum, one_minus_dampening, weight_decay, HAS_WD,
                             MOMENTUM, NESTEROV)
        if MOMENTUM:
            tl.store(b_addr, b, mask=mask)
        _store_param(p_addr, p, mask, BF16)


@triton.jit
def _masked_sgd_tiles_kernel(p_ptr, stride_row, stride_col, g_ptr, buf_ptr, step_ptr, rows_ptr, slots_ptr, K, M,
                             lr, lr_ptr, found_ptr, momentum, one_minus_dampening, weight_decay,
                             LR_PTR: tl.constexpr, CHECK: tl.constexpr, MAXIMIZE: tl.constexpr, BF16: tl.constexpr,
                             HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                             BR: tl.constexpr, BM: tl.constexpr):
    rr, rmask, row, slot, lr_v, t, ok, n_cols, first, run = _tile_start(rows_ptr, slots_ptr, step_ptr, lr, lr_ptr,
                                                                         found_ptr, K, M, LR_PTR, CHECK, BR)
    first_step = t == 1.0  # torch starts the buffer as the gradient
    if run:
        _sgd_tiles(p_ptr, (first + tl.arange(0, BR)) * stride_row, stride_col, g_ptr, buf_ptr, rr, slot, rmask, M,
                   n_cols, first_step, lr_v, momentum, one_minus_dampening, weight_decay, MAXIMIZE, BF16, HAS_WD,
                   MOMENTUM, NESTEROV, BM)
    else:
        _sgd_tiles(p_ptr, row * stride_row, stride_col, g_ptr, buf_ptr, rr, slot, rmask, M, n_cols, first_step,
                   lr_v, momentum, one_minus_dampening, weight_decay, MAXIMIZE, BF16, HAS_WD, MOMENTUM, NESTEROV, BM)
    tl.store(step_ptr + slot, t, mask=ok)


TILE_ROWS, TILE_COLS = 32, 32  # a tile program's selected rows, and columns per step (4 warps: 146 registers on sm_90)


def tiled(p: torch.Tensor) -> bool:
    """Whether the rows of ``p`` go by tiles: a column view (its rows strided), or rows shorter than 32 (a program
    per row would leave most of its lanes idle) — the CUDA kernels' rule."""
    return p.stride(1) != 1 or p.shape[1] < 32


def _check(p, g, step, r, s, *states):
    """The layout the kernels index by (they read raw pointers: rows, slots and states must be dense)."""
    if p.dim() != 2 or g.dtype != torch.float32 or not g.is_contiguous() or tuple(g.shape) != (r.numel(), p.shape[1]):
        raise ValueError("masked optimizer: params must be [R, M] row views, grads contiguous fp32 [k, M]")
    if (step.dtype != torch.float32 or not step.is_contiguous() or r.numel() != s.numel() or not r.is_contiguous()
            or not s.is_contiguous() or r.dtype != torch.int64 or s.dtype != torch.int64):
        raise ValueError("masked optimizer: steps must be contiguous fp32, rows/slots contiguous int64 of equal length")
    for x in states:
        if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2 or x.shape[1] != p.shape[1]:
            raise ValueError("masked optimizer: optimizer states must be contiguous fp32 [capacity, M] with the "
                             "parameter's row width M")


def nonfinite_flag_(grads, found_inf):
    """``found_inf[0] = 1`` if any element of ``grads`` (fp32) is non-finite; never clears it. No sync."""
    for g in grads:
        n = g.numel()
        if n == 0:
            continue
        if not g.is_contiguous():
            raise ValueError("nonfinite_flag_: gradients must be contiguous")
        block = min(4096, triton.next_power_of_2(n))
        _nonfinite_kernel[(triton.cdiv(n, block),)](g, n, found_inf, BLOCK=block)


def _split(x: float) -> tuple[float, float]:
    """``(hi, lo)``: ``hi`` the fp32 value of double ``x``, ``lo`` the rest (fp32: ``hi + lo`` is ``x`` to ~2^-48)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _block(M):
    return min(1024, triton.next_power_of_2(max(M, 1)))


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps,
                  weight_decay, maximize, lr_tensor=None, found_inf=None):
    """Launcher with the signature of ``torch.ops.ct_fast.masked_adamw_`` (no amsgrad)."""
    if max_exp_avg_sqs:
        raise ValueError("amsgrad runs on the torch backend")
    if found_inf is not None:
        nonfinite_flag_([g for g, r in zip(grads, rows) if r.numel()], found_inf)
    for p, g, m, v, step, r, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots):
        k, M = r.numel(), p.shape[1]
        if k == 0:
            continue
        _check(p, g, step, r, s, m, v)
        lr_f, lr_lo = _split(float(lr))
        common = (lr_f, lr_lo, lr_tensor if lr_tensor is not None else step,
                  found_inf if found_inf is not None else step, *_split(beta1), *_split(beta2), 1.0 - beta1,
                  1.0 - beta2, eps, weight_decay, 1.0 - float(lr) * weight_decay)
        flags = dict(LR_PTR=lr_tensor is not None, CHECK=found_inf is not None, MAXIMIZE=bool(maximize),
                     BF16=p.dtype == torch.bfloat16)
        if tiled(p):
            _masked_adamw_tiles_kernel[(triton.cdiv(k, TILE_ROWS),)](
                p, p.stride(0), p.stride(1), g, m, v, step, r, s, k, M, *common, **flags, BR=TILE_ROWS, BM=TILE_COLS)
        else:
            _masked_adamw_kernel[(k,)](p, p.stride(0), p.stride(1), g, m, v, step, r, s, M, *common, **flags,
                                       BLOCK=_block(M))


def masked_sgd_(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay,
                nesterov, maximize, lr_tensor=None, found_inf=None):
    """Launcher with the signature of ``torch.ops.ct_fast.masked_sgd_``."""
    if found_inf is not None:
        nonfinite_flag_([g for g, r in zip(grads, rows) if r.numel()], found_inf)
    for i, (p, g, step, r, s) in enumerate(zip(params, grads, steps, rows, slots)):
        k, M = r.numel(), p.shape[1]
        if k == 0:
            continue
        if momentum != 0 and not momentum_buffers:
            raise ValueError("masked_sgd_: momentum needs momentum buffers")
        buf = momentum_buffers[i] if momentum != 0 else None  # (torch ignores them at 0)
        _check(p, g, step, r, s, *([] if buf is None else [buf]))
        common = (float(lr), lr_tensor if lr_tensor is not None else step, found_inf if found_inf is not None else step,
                  momentum, 1.0 - dampening, weight_decay)
        flags = dict(LR_PTR=lr_tensor is not None, CHECK=found_inf is not None, MAXIMIZE=bool(maximize),
                     BF16=p.dtype == torch.bfloat16, HAS_WD=weight_decay != 0, MOMENTUM=buf is not None,
                     NESTEROV=bool(nesterov))
        buf = buf if buf is not None else g
        if tiled(p):
            _masked_sgd_tiles_kernel[(triton.cdiv(k, TILE_ROWS),)](
                p, p.stride(0), p.stride(1), g, buf, step, r, s, k, M, *common, **flags, BR=TILE_ROWS, BM=TILE_COLS)
        else:
            _masked_sgd_kernel[(k,)](p, p.stride(0), p.stride(1), g, buf, step, r, s, M, *common, **flags,
                                     BLOCK=_block(M))
