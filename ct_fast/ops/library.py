"""ct_fast's ops, declared once with ``torch.library``: schemas (with mutation annotations), fake
implementations for tracing, and the pure-torch default. Native kernels register per device key from
``ct_fast._C`` (C++ CPU with OpenMP, CUDA); Triton kernels are launched by ``ct_fast.ops`` dispatch.

    torch.ops.ct_fast.score_edges(delta, up_weight, grad_down) -> [n_u, n_d] fp32
    torch.ops.ct_fast.masked_weight_grad(x, grad_out, index, out_features) -> [k, other] fp32
    torch.ops.ct_fast.masked_bias_grad(grad_out, index) -> [k] fp32
    torch.ops.ct_fast.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows,
                                    slots, lr, beta1, beta2, eps, weight_decay, maximize)
    torch.ops.ct_fast.masked_sgd_(params, grads, momentum_buffers, steps, rows, slots, lr, momentum,
                                  dampening, weight_decay, nesterov, maximize)

Masked optimizer layout, per parameter i: ``params[i]`` a 2-D view ``[R, M]`` (any strides; a selected
"row" may be a weight column), ``rows[i]`` long ``[k]`` the selected rows, ``grads[i]`` fp32 ``[k, M]``
their gradients in that order, ``slots[i]`` long ``[k]`` their rows in the compact fp32 states
``[capacity, M]`` and per-row step counts ``steps[i]`` ``[capacity]`` (incremented by the op).
"""

from __future__ import annotations

import torch

from . import reference

LIB = torch.library.Library("ct_fast", "DEF")  # noqa: TOR901 - the namespace is ours
LIB.define("score_edges(Tensor delta, Tensor? up_weight, Tensor grad_down) -> Tensor")
LIB.define("masked_weight_grad(Tensor x, Tensor grad_out, Tensor? index, bool out_features) -> Tensor")
LIB.define("masked_bias_grad(Tensor grad_out, Tensor? index) -> Tensor")
LIB.define("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
           "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor[] rows, Tensor[] slots, float lr, float beta1, "
           "float beta2, float eps, float weight_decay, bool maximize) -> ()")
LIB.define("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
           "Tensor[] rows, Tensor[] slots, float lr, float momentum, float dampening, float weight_decay, "
           "bool nesterov, bool maximize) -> ()")

OPS = ("score_edges", "masked_weight_grad", "masked_bias_grad", "masked_adamw_", "masked_sgd_")


# ---- the pure-torch default (every device) ----------------------------------------------------------

def _rows_of(p: torch.Tensor, rows: torch.Tensor):
    """``(p[rows] as fp32, write-back)``; a no-copy view when all rows are selected in order."""
    if rows.numel() == p.shape[0] and bool((rows == torch.arange(p.shape[0], device=rows.device)).all()):
        work = p.float()
        return work, (lambda: None) if work.data_ptr() == p.data_ptr() else (lambda: p.copy_(work))
    work = p.index_select(0, rows).float()
    return work, lambda: p.index_copy_(0, rows, work.to(p.dtype))


def masked_adamw_default(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1,
                         beta2, eps, weight_decay, maximize):
    for i, (p, g, m, v, step, r, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots)):
        if r.numel() == 0:
            continue
        step.index_add_(0, s, torch.ones_like(s, dtype=step.dtype))
        work, write_back = _rows_of(p, r)
        mm, vv = m.index_select(0, s), v.index_select(0, s)
        vmax = max_exp_avg_sqs[i].index_select(0, s) if max_exp_avg_sqs else None
        reference.adamw_rows_(work, g.float(), mm, vv, step.index_select(0, s), lr=lr, beta1=beta1, beta2=beta2,
                              eps=eps, weight_decay=weight_decay, maximize=maximize, max_exp_avg_sq=vmax)
        write_back()
        m.index_copy_(0, s, mm)
        v.index_copy_(0, s, vv)
        if vmax is not None:
            max_exp_avg_sqs[i].index_copy_(0, s, vmax)


def masked_sgd_default(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay,
                       nesterov, maximize):
    for i, (p, g, step, r, s) in enumerate(zip(params, grads, steps, rows, slots)):
        if r.numel() == 0:
            continue
        step.index_add_(0, s, torch.ones_like(s, dtype=step.dtype))
        work, write_back = _rows_of(p, r)
        buf = momentum_buffers[i].index_select(0, s) if momentum_buffers else None
        reference.sgd_rows_(work, g.float(), buf, step.index_select(0, s), lr=lr, momentum=momentum,
                            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        write_back()
        if buf is not None:
            momentum_buffers[i].index_copy_(0, s, buf)


DEFAULTS = {
    "score_edges": reference.score_edges,
    "masked_weight_grad": reference.masked_weight_grad,
    "masked_bias_grad": reference.masked_bias_grad,
    "masked_adamw_": masked_adamw_default,
    "masked_sgd_": masked_sgd_default,
}
for _name, _fn in DEFAULTS.items():
    torch.library.impl(f"ct_fast::{_name}", "CompositeExplicitAutograd", _fn, lib=LIB)


# ---- fake (meta) implementations: shapes only ------------------------------------------------------

@torch.library.register_fake("ct_fast::score_edges", lib=LIB)
def _(delta, up_weight, grad_down):
    n_u = 1 if up_weight is None else up_weight.shape[0]
    return delta.new_empty((n_u, grad_down.shape[0]), dtype=torch.float32)


@torch.library.register_fake("ct_fast::masked_weight_grad", lib=LIB)
def _(x, grad_out, index, out_features):
    k = (grad_out.shape[1] if out_features else x.shape[1]) if index is None else index.shape[0]
    other = x.shape[1] if out_features else grad_out.shape[1]
    return x.new_empty((k, other), dtype=torch.float32)


@torch.library.register_fake("ct_fast::masked_bias_grad", lib=LIB)
def _(grad_out, index):
    k = grad_out.shape[1] if index is None else index.shape[0]
    return grad_out.new_empty((k,), dtype=torch.float32)


@torch.library.register_fake("ct_fast::masked_adamw_", lib=LIB)
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1, beta2, eps,
      weight_decay, maximize):
    return None


@torch.library.register_fake("ct_fast::masked_sgd_", lib=LIB)
def _(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay, nesterov,
      maximize):
    return None
