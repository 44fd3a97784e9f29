"""ct_fast's ops, declared once with ``torch.library``: schemas (with mutation annotations), fake
implementations for tracing, and the pure-torch default. Native kernels register per device key from
``ct_fast._C`` (C++ CPU with OpenMP, CUDA); Triton kernels are launched by ``ct_fast.ops`` dispatch.

    torch.ops.ct_fast.score_edges(delta, up_weight, grad_down) -> [n_u, n_d] fp32
    torch.ops.ct_fast.masked_weight_grad(x, grad_out, index, out_features) -> [k, other] fp32
    torch.ops.ct_fast.masked_bias_grad(grad_out, index) -> [k] fp32
    torch.ops.ct_fast.masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows,
                                    slots, lr, beta1, beta2, eps, weight_decay, maximize, lr_tensor=None,
                                    found_inf=None)
    torch.ops.ct_fast.masked_sgd_(params, grads, momentum_buffers, steps, rows, slots, lr, momentum,
                                  dampening, weight_decay, nesterov, maximize, lr_tensor=None, found_inf=None)

Masked optimizer layout, per parameter i: ``params[i]`` a 2-D view ``[R, M]`` (any strides; a selected
"row" may be a weight column), ``rows[i]`` long ``[k]`` the selected rows, ``grads[i]`` fp32 ``[k, M]``
their gradients in that order, ``slots[i]`` long ``[k]`` their rows in the compact fp32 states
``[capacity, M]`` and per-row step counts ``steps[i]`` ``[capacity]`` (incremented by the op).

Device scalars, so that a step needs no host value and can be captured in a CUDA graph: ``lr_tensor`` (a
one-element fp32 tensor on the parameters' device) replaces the float ``lr`` when given; ``found_inf`` (a
one-element fp32 tensor there) is the skip flag: the op sets it to 1 if any selected gradient (any element of
``grads``) is non-finite, and when it is non-zero after that check (set now, or already on entry — e.g. by a
check over other parameter groups) the op writes nothing: parameters, states and step counts stay untouched.
The op never clears it; the caller reads it whenever it likes (no sync inside the step) and zeroes it.
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
           "float beta2, float eps, float weight_decay, bool maximize, Tensor? lr_tensor=None, "
           "Tensor(f!)? found_inf=None) -> ()")
LIB.define("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
           "Tensor[] rows, Tensor[] slots, float lr, float momentum, float dampening, float weight_decay, "
           "bool nesterov, bool maximize, Tensor? lr_tensor=None, Tensor(d!)? found_inf=None) -> ()")

OPS = ("score_edges", "masked_weight_grad", "masked_bias_grad", "masked_adamw_", "masked_sgd_")


# ---- the pure-torch default (every device) ----------------------------------------------------------

def _rows_of(p: torch.Tensor, rows: torch.Tensor):
    """``(p[rows] as fp32, write-back)``; a no-copy view when all rows are selected in order (checked on CPU
    only: on a GPU the check would wait for the device)."""
    if (rows.device.type == "cpu" and rows.numel() == p.shape[0]
            and bool((rows == torch.arange(p.shape[0], device=rows.device)).all())):
        work = p.float()
        return work, (lambda: None) if work.data_ptr() == p.data_ptr() else (lambda: p.copy_(work))
    work = p.index_select(0, rows).float()
    return work, lambda: p.index_copy_(0, rows, work.to(p.dtype))


def nonfinite_flag_(grads, found_inf: torch.Tensor) -> torch.Tensor:
    """``found_inf |= any element of grads is non-finite`` with device ops only (no sync); returns the 0-dim bool
    "skip this update" (``found_inf != 0`` afterwards)."""
    bad = [(~torch.isfinite(g)).any() for g in grads if g.numel()]
    if bad:
        hit = torch.stack(bad).any().to(found_inf.dtype)
        found_inf.copy_(torch.maximum(found_inf, hit.expand_as(found_inf)))
    return found_inf.reshape(()) != 0


def _update_rows(p, r, states, s, step, skip, update):
    """Gather the selected rows ``p[r]`` (fp32) and state rows ``states[j][s]``, bump the step counts, run
    ``update(work, state_rows, steps)`` in place and scatter back. ``skip`` (a 0-dim bool tensor or None): when
    True every write keeps the old values (step counts included) — selected with ``torch.where``, no sync."""
    if skip is None:
        step.index_add_(0, s, torch.ones_like(s, dtype=step.dtype))
        work, write_back = _rows_of(p, r)
        rows = [x.index_select(0, s) for x in states]
        update(work, rows, step.index_select(0, s))
        write_back()
        for x, y in zip(states, rows):
            x.index_copy_(0, s, y)
        return
    step.index_add_(0, s, (~skip).to(step.dtype).expand(s.numel()))
    old = p.index_select(0, r)
    work = old.to(torch.float32, copy=True)
    old_rows = [x.index_select(0, s) for x in states]
    rows = [y.clone() for y in old_rows]
    update(work, rows, step.index_select(0, s))
    p.index_copy_(0, r, torch.where(skip, old, work.to(p.dtype)))
    for x, y0, y in zip(states, old_rows, rows):
        x.index_copy_(0, s, torch.where(skip, y0, y))


def masked_adamw_default(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, rows, slots, lr, beta1,
                         beta2, eps, weight_decay, maximize, lr_tensor=None, found_inf=None):
    lr = lr if lr_tensor is None else lr_tensor.reshape(())
    skip = None if found_inf is None else nonfinite_flag_(grads, found_inf)
    for i, (p, g, m, v, step, r, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots)):
        if r.numel() == 0:
            continue
        states = [m, v] + ([max_exp_avg_sqs[i]] if max_exp_avg_sqs else [])

        def update(work, st, t, g=g):
            reference.adamw_rows_(work, g.float(), st[0], st[1], t, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, maximize=maximize,
                                  max_exp_avg_sq=st[2] if len(st) > 2 else None)
        _update_rows(p, r, states, s, step, skip, update)


def masked_sgd_default(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay,
                       nesterov, maximize, lr_tensor=None, found_inf=None):
    lr = lr if lr_tensor is None else lr_tensor.reshape(())
    skip = None if found_inf is None else nonfinite_flag_(grads, found_inf)
    for i, (p, g, step, r, s) in enumerate(zip(params, grads, steps, rows, slots)):
        if r.numel() == 0:
            continue
        states = [momentum_buffers[i]] if momentum_buffers else []

        def update(work, st, t, g=g):
            reference.sgd_rows_(work, g.float(), st[0] if st else None, t, lr=lr, momentum=momentum,
                                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        _update_rows(p, r, states, s, step, skip, update)


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
      weight_decay, maximize, lr_tensor=None, found_inf=None):
    return None


@torch.library.register_fake("ct_fast::masked_sgd_", lib=LIB)
def _(params, grads, momentum_buffers, steps, rows, slots, lr, momentum, dampening, weight_decay, nesterov,
      maximize, lr_tensor=None, found_inf=None):
    return None
