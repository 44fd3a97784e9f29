"""Triton masked AdamW: the selected rows of one parameter, their compact fp32 states and gradients.

Per selected row r (program axis 0) and column block (axis 1), with ``p = param[rows[r], :]`` (any row and
column strides), ``g = grads[r]``, ``m, v = exp_avg[slots[r]], exp_avg_sq[slots[r]]``::

    p *= 1 - lr * wd;  m += (1 - b1) * (g - m);  v = b2 * v + (1 - b2) * g^2
    p += -step_size[r] * m / (sqrt(v) / bc2_sqrt[r] + eps)

``step_size = lr / (1 - b1^t)`` and ``bc2_sqrt = sqrt(1 - b2^t)`` are computed per row on the host in fp64 from
the incremented step counts (as torch.optim.AdamW does in Python floats). Only selected rows are read or
written. One launch per parameter (the CUDA kernel of ct_fast._C does all parameters in one launch).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_adamw_kernel(p_ptr, stride_row, stride_col, g_ptr, m_ptr, v_ptr, rows_ptr, slots_ptr, step_size_ptr,
                         bc2_sqrt_ptr, M, beta1, beta2, eps, decay,
                         MAXIMIZE: tl.constexpr,  # negate the gradient (torch's maximize=True)
                         BLOCK: tl.constexpr):  # columns per program
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < M
    row = tl.load(rows_ptr + r)
    slot = tl.load(slots_ptr + r)
    step_size = tl.load(step_size_ptr + r)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + r)
    g = tl.load(g_ptr + r * M + cols, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + slot * M + cols, mask=mask, other=0.0)
    v = tl.load(v_ptr + slot * M + cols, mask=mask, other=0.0)
    p_addr = p_ptr + row * stride_row + cols * stride_col
    p = tl.load(p_addr, mask=mask, other=0.0).to(tl.float32) * decay
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p + (-step_size * m) / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(m_ptr + slot * M + cols, m, mask=mask)
    tl.store(v_ptr + slot * M + cols, v, mask=mask)
    tl.store(p_addr, p.to(p_ptr.dtype.element_ty), mask=mask)


def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps,
                  weight_decay, maximize):
    """Launcher with the signature of ``torch.ops.ct_fast.masked_adamw_`` (no amsgrad)."""
    if max_exp_avg_sqs:
        raise ValueError("amsgrad runs on the torch backend")
    for p, g, m, v, step, r, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots):
        k, M = r.numel(), p.shape[1]
        if k == 0:
            continue
        step.index_add_(0, s, torch.ones_like(s, dtype=step.dtype))
        t = step.index_select(0, s).double()
        step_size = (lr / (1 - beta1 ** t)).float()
        bc2_sqrt = (1 - beta2 ** t).sqrt().float()
        block = min(1024, triton.next_power_of_2(M))
        _masked_adamw_kernel[(k, triton.cdiv(M, block))](
            p, p.stride(0), p.stride(1), g, m, v, r, s, step_size, bc2_sqrt, M, beta1, beta2, eps,
            1.0 - lr * weight_decay, MAXIMIZE=bool(maximize), BLOCK=block)
