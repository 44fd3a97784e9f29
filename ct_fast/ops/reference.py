"""Pure-torch reference implementations of ct_fast's ops: readable as the math, the oracle for every
kernel, and the last-resort backend. Shapes: c = rows (tokens, or examples when pooled), d = d_model,
n = nodes of a group, w = per-node width."""

from __future__ import annotations

import torch
from torch import nn


def heads_to_residual(rows: torch.Tensor, heads_weight: torch.Tensor | None, out: torch.Tensor | None = None,
                      accumulate: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-node residual vectors from compact head rows.

    rows ``[c, n * w]`` (or already per head, ``[n, c, w]``: any strides), heads_weight ``[n, w, d]`` -> ``[n, c, d]``
    with ``out[j] = rows[:, j] @ W[j]``;
    ``heads_weight=None`` means rows ``[c, d]`` already are the single node's vectors -> ``[1, c, d]``.
    ``out``: an optional contiguous ``[n, c, d]`` buffer to write into (``accumulate=True``: add to it).
    The product runs in ``dtype`` (default: ``out``'s dtype, else fp32): fp32 is the exact path; bf16/fp16
    operands use tensor cores (fp32 accumulation inside the GEMM), the result lands in ``out``'s dtype.
    """
    dtype = dtype or (out.dtype if out is not None else torch.float32)
    rows = rows if rows.dtype == dtype else rows.to(dtype)  # (no call where it is one: the scoring loop's host time)
    if heads_weight is None:
        res = rows.unsqueeze(0)
    else:
        n, w, _ = heads_weight.shape
        c = rows.shape[-2]
        # [n, c, w]: head j's columns of every row, one view
        z = rows if rows.dim() == 3 else rows.as_strided((n, c, w), (w, rows.stride(0), 1)) if rows.stride(-1) == 1 \
            else rows.reshape(c, n, w).transpose(0, 1)
        weight = heads_weight if heads_weight.dtype == dtype else heads_weight.to(dtype)
        if out is not None and out.dtype == dtype:
            return out.baddbmm_(z, weight) if accumulate else torch.bmm(z, weight, out=out)
        res = torch.bmm(z, weight)
    if out is None:
        return res
    return out.add_(res) if accumulate else out.copy_(res)


def score_edges(delta_up: torch.Tensor, up_weight: torch.Tensor | None, grad_down: torch.Tensor) -> torch.Tensor:
    """Signed edge scores of one (upstream group, downstream group) block, fp32 ``[n_u, n_d]``.

    ``S[u, d] = sum_c (delta_up[c, u] @ up_weight[u]) . grad_down[d, c]``
    delta_up ``[c, n_u * w]`` (activation minus ablation, compact), up_weight ``[n_u, w, d]`` or None,
    grad_down ``[n_d, c, d]`` (per-node residual gradients) -> ``[n_u, n_d]``. The products run in
    ``grad_down``'s dtype: fp32 (the exact path) or bf16/fp16 (tensor-core operands, fp32 accumulation
    inside each GEMM).
    """
    dA = heads_to_residual(delta_up, up_weight, dtype=grad_down.dtype)
    return torch.einsum("ucd,ncd->un", dA, grad_down).float()


def norm_kind(norm: nn.Module) -> str:
    """``"layernorm"``, ``"rmsnorm"`` (HF Llama-family: fp32 statistics, ``weight * x_hat``) or ``"generic"``."""
    if isinstance(norm, nn.LayerNorm):
        return "layernorm"
    if type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") and hasattr(norm, "weight"):
        return "rmsnorm"
    return "generic"


def norm_stats(norm: nn.Module, x: torch.Tensor):
    """``(mean [c] or None, rstd [c], gamma [d] or None)`` fp32 of a LayerNorm (mean) or RMSNorm (no mean) at
    ``x [c, d]``, as the module computes them (fp32 statistics)."""
    xf = x.float()
    if norm_kind(norm) == "layernorm":
        var, mean = torch.var_mean(xf, -1, correction=0)
        rstd = torch.rsqrt(var + norm.eps)
    else:
        mean, rstd = None, torch.rsqrt(xf.pow(2).mean(-1) + norm.variance_epsilon)
    return mean, rstd, norm_gamma(norm)


def norm_gamma(norm: nn.Module) -> torch.Tensor | None:
    """The norm's weight ``[d]`` in fp32 (None without one)."""
    w = norm.weight
    w = w.full_tensor() if hasattr(w, "full_tensor") else w  # an FSDP2 shard outside its module's backward
    return w.detach().float() if w is not None else None


def residual_grads(terms, out: torch.Tensor, norm: nn.Module | None = None, x: torch.Tensor | None = None):
    """Residual-space gradients of one block of downstream nodes, through their norm, into ``out``.

    ``terms``: one or more ``(rows [c, n * w], heads_weight [n, w, d] or None)`` feeding the same ``n`` nodes
    (an MLP's gate and up), ``out [n, c, d]`` in any float dtype, ``norm``/``x [c, d]``: the norm the nodes read
    through and its input (None: no norm). ``out[j] = norm_vjp(x, sum_g rows_g[:, j] @ W_g[j])``: the products in
    the weights' dtype (fp32: exact), the sum and the norm backward in fp32, one rounding to ``out``'s dtype.
    """
    buf = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    for i, (rows, weight) in enumerate(terms):
        heads_to_residual(rows, weight, out=buf, accumulate=i > 0, dtype=None if weight is None else weight.dtype)
    if norm is not None:
        norm_vjp_(norm, x, buf)
    return out if buf is out else out.copy_(buf)


def norm_vjp_(norm: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
    """Backward of a per-token norm module at ``x`` for a batch of cotangents, in place when it can.

    x ``[c, d]``, cot ``[n, c, d]`` fp32 (d metric / d normed input, one per node) -> ``[n, c, d]`` fp32
    (d metric / d x through each node's own path). LayerNorm, with ``x_hat = (x - mean) * rstd``:
    ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))``, ``g = cot * weight``; RMSNorm drops the
    ``mean(g)`` term. Other norms: autograd of the module itself (exact for any per-token norm).
    """
    if cot.shape[0] == 0:
        return cot
    kind = norm_kind(norm)
    if kind == "generic":
        _, vjp = torch.func.vjp(norm.forward, x)  # .forward: bypass the hooks of a running Capture
        return cot.copy_(torch.func.vmap(vjp)(cot.to(x.dtype))[0])
    xf = x.float()
    mean, rstd, gamma = norm_stats(norm, x)
    rstd = rstd.unsqueeze(-1)
    x_hat = (xf - mean.unsqueeze(-1)) * rstd if mean is not None else xf * rstd
    gamma = gamma if gamma is not None else torch.ones_like(xf[0])
    d = xf.shape[-1]
    # reductions without [n, c, d] temporaries: mean(g * x_hat) and mean(g) for g = cot * gamma
    proj = torch.einsum("ncd,cd->nc", cot, x_hat * gamma).div_(d).unsqueeze(-1)
    shift = torch.einsum("ncd,d->nc", cot, gamma).div_(d).unsqueeze(-1) if kind == "layernorm" else None
    cot.mul_(gamma * rstd)  # rstd * g
    cot.addcmul_(x_hat * rstd, proj, value=-1.0)  # - rstd * x_hat * mean(g * x_hat)
    if shift is not None:
        cot.sub_(shift * rstd)  # - rstd * mean(g)
    return cot


def residual_grads_scaled(terms, out: torch.Tensor, norm: nn.Module, x: torch.Tensor, stats=None) -> torch.Tensor:
    """``residual_grads`` through a LayerNorm/RMSNorm the way the scorer's torch path computes it, in ``out``'s dtype
    (no fp32 block): each term's rows scaled by the norm's per-row ``rstd`` (``scale_rows``), its weight by the
    norm's ``gamma`` (``fold_norm_weight``), their products summed into ``out``, then ``norm_vjp_scaled_``. About 8
    bytes moved per bf16 output element where ``residual_grads`` moves ~34 (an fp32 block written, rewritten by the
    norm backward, then rounded). ``stats``: ``norm_stats(norm, x)`` when the caller has them."""
    mean, rstd, gamma = stats or norm_stats(norm, x)
    project_scaled(terms, out, rstd, gamma)
    x_hat = norm_input_hat(x, mean, rstd, out=torch.empty(x.shape, dtype=out.dtype, device=out.device))
    return norm_vjp_scaled_(out, x_hat, norm_kind(norm))


def project_scaled(terms, out: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor | None,
                   weights_folded: bool = False) -> torch.Tensor:
    """``out [n, c, d] = rstd * g``, ``g`` the nodes' normed-input gradients times the norm's ``gamma``: the sum over
    ``terms`` (``(rows [c, n * w], weight [n, w, d] or None)``) of ``scale_rows(rows) @ fold_norm_weight(weight)``
    (rows with no weight: ``scale_rows`` with ``gamma``), in ``out``'s dtype. ``weights_folded``: the weights
    already carry ``gamma`` (the scorer folds them once per layer span)."""
    for i, (rows, weight) in enumerate(terms):
        if weight is None and i == 0:  # written in place
            scale_rows(rows, rstd, gamma, out=out[0])
            continue
        rows = scale_rows(rows, rstd, gamma if weight is None else None,
                          out=torch.empty(rows.shape, dtype=out.dtype, device=out.device))
        if weight is not None and not weights_folded:
            weight = fold_norm_weight(weight, gamma)
        heads_to_residual(rows, weight, out=out, accumulate=i > 0, dtype=out.dtype)
    return out


def fold_norm_weight(weight: torch.Tensor, gamma: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [n, w, d] * gamma [d]``, rounded once to the weight's dtype (a projection reading through a norm,
    with the norm's weight applied; ``gamma`` None: the weight itself), into ``out`` when given."""
    if gamma is None:
        return weight if out is None else out.copy_(weight)
    return torch.mul(weight, gamma, out=torch.empty_like(weight) if out is None else out)


def scale_rows(rows: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out [c, k] = rows [c, k] * rstd [c]`` (``* gamma [k]`` too when given: rows that already are the normed
    input's gradient, with no projection weight to fold it into), rounded once to ``out``'s dtype."""
    scale = rstd.unsqueeze(-1)
    return torch.mul(rows, scale if gamma is None else scale * gamma, out=out)


def norm_input_hat(x: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [c, d] = (x - mean) * rstd`` (RMSNorm: ``x * rstd``), the normalised input, rounded once to ``out``'s
    dtype. x ``[c, d]``, mean/rstd fp32 ``[c]`` (``norm_stats``)."""
    if mean is None:
        return torch.mul(x, rstd.unsqueeze(-1), out=out)
    return torch.mul(torch.sub(x, mean.unsqueeze(-1)), rstd.unsqueeze(-1), out=out)  # (x - mean: fp32)


def norm_vjp_scaled_(out: torch.Tensor, x_hat: torch.Tensor, kind: str) -> torch.Tensor:
    """Finish a LayerNorm/RMSNorm backward in place, in ``out``'s dtype: ``out [n, c, d]`` holds ``rstd * g`` for
    ``g = cot * gamma`` (the norm's weight folded into the projections, ``rstd`` into their rows: ``scale_rows``,
    ``fold_norm_weight``), ``x_hat [c, d]`` the normalised input (``norm_input_hat``, same dtype).

    ``dx = rstd g - x_hat mean(rstd g x_hat) [- mean(rstd g)]``: ``norm_vjp_``'s formula with ``rstd`` moved inside
    the means — one reduction read and one in-place pass over ``out`` (one more of each for LayerNorm's mean).
    """
    if out.shape[0] == 0:
        return out
    d = out.shape[-1]
    proj = torch.einsum("ncd,cd->nc", out, x_hat).unsqueeze(-1)  # d * mean(rstd g x_hat)
    shift = out.mean(-1, keepdim=True) if kind == "layernorm" else None  # mean(rstd g), before out changes
    out.addcmul_(proj, x_hat, value=-1.0 / d)
    return out.sub_(shift) if shift is not None else out


# ---- masked optimizer updates (rows of one parameter; the caller gathers and scatters them) --------

def _per_row(step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[k]`` -> ``[k, 1, ...]`` broadcastable against row-major ``like [k, ...]``."""
    return step.view((-1,) + (1,) * (like.dim() - 1))


def adamw_rows_(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
                maximize=False, max_exp_avg_sq=None):
    """AdamW on k selected rows, in place, exactly as ``torch.optim.AdamW`` (single-tensor) per row.

    param/grad/exp_avg/exp_avg_sq(/max_exp_avg_sq) ``[k, ...]`` fp32; step ``[k]`` fp32, already
    incremented: each row has its own step count (bias correction), so a row's trajectory is that of
    the torch optimizer run over the steps in which it was selected. ``lr``: a float or a 0-dim tensor
    (read on the device, no host sync).
    """
    if maximize:
        grad = -grad
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    s = _per_row(step.double(), param)
    step_size = (lr / (1 - beta1 ** s)).float()
    bc2_sqrt = (1 - beta2 ** s).sqrt().float()
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    param.add_((-step_size * exp_avg) / denom)


def sgd_rows_(param, grad, momentum_buffer, step, *, lr, momentum, dampening, weight_decay, nesterov,
              maximize=False):
    """SGD (momentum, dampening, nesterov, L2 weight decay) on k selected rows, in place, as
    ``torch.optim.SGD`` per row. ``step [k]`` (already incremented) marks rows whose buffer starts now
    (step == 1: buffer = gradient, as torch does on its first step). ``lr``: a float or a 0-dim tensor."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        first = _per_row(step == 1, param)
        updated = momentum_buffer.mul(momentum).add_(grad, alpha=1 - dampening)
        momentum_buffer.copy_(torch.where(first, grad, updated))
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    if isinstance(lr, torch.Tensor):
        param.sub_(grad * lr)  # p + (-lr) g, bit for bit
    else:
        param.add_(grad, alpha=-lr)


# ---- masked weight gradient (the compact dW of circuit rows) ----------------------------------------

def masked_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, index: torch.Tensor | None,
                       out_features: bool) -> torch.Tensor:
    """Weight gradient of ``y = x W^T`` restricted to selected features, compact and fp32.

    x ``[N, in]``, grad_out ``[N, out]``, index ``[k]`` (None: all). ``out_features=True`` selects output
    features -> ``grad_out[:, index]^T @ x`` ``[k, in]``; else input features -> ``x[:, index]^T @ grad_out``
    ``[k, out]``. Row r of the result is the gradient of feature ``index[r]`` (nn.Linear rows/columns and
    GPT-2 Conv1D columns/rows are the same features, transposed).
    """
    if out_features:
        g = grad_out if index is None else grad_out.index_select(1, index)
        return (g.t() @ x).float()
    xs = x if index is None else x.index_select(1, index)
    return (xs.t() @ grad_out).float()


def masked_bias_grad(grad_out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Bias gradient of the selected output features: grad_out ``[N, out]`` -> ``[k]`` fp32."""
    g = grad_out if index is None else grad_out.index_select(1, index)
    return g.sum(0, dtype=torch.float32)
