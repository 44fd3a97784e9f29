"""Pure-torch reference implementations of ct_fast's ops: readable as the math, the oracle for every
kernel, and the last-resort backend. Shapes: c = rows (tokens, or examples when pooled), d = d_model,
n = nodes of a group, w = per-node width."""

from __future__ import annotations

import torch
from torch import nn


def heads_to_residual(rows: torch.Tensor, heads_weight: torch.Tensor | None) -> torch.Tensor:
    """Per-node residual vectors from compact head rows.

    rows ``[c, n * w]``, heads_weight ``[n, w, d]`` -> ``[n, c, d]`` with ``out[j] = rows[:, j] @ W[j]``;
    ``heads_weight=None`` means rows ``[c, d]`` already are the single node's vectors -> ``[1, c, d]``.
    """
    if heads_weight is None:
        return rows.float().unsqueeze(0)
    n, w, _ = heads_weight.shape
    return torch.einsum("cnw,nwd->ncd", rows.float().view(rows.shape[0], n, w), heads_weight.float())


def score_edges(delta_up: torch.Tensor, up_weight: torch.Tensor | None, grad_down: torch.Tensor) -> torch.Tensor:
    """Signed edge scores of one (upstream group, downstream group) block, in fp32.

    ``S[u, d] = sum_c (delta_up[c, u] @ up_weight[u]) . grad_down[d, c]``
    delta_up ``[c, n_u * w]`` (activation minus ablation, compact), up_weight ``[n_u, w, d]`` or None,
    grad_down ``[n_d, c, d]`` (per-node residual gradients) -> ``[n_u, n_d]``.
    """
    dA = heads_to_residual(delta_up, up_weight)
    return torch.einsum("ucd,ncd->un", dA, grad_down.float())


def norm_vjp(norm: nn.Module, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """Backward of a per-token norm module at ``x`` for a batch of cotangents.

    x ``[c, d]``, cotangents ``[n, c, d]`` (d metric / d normed input, one per node) -> ``[n, c, d]``
    (d metric / d x through each node's own path). Exact for any norm: it differentiates the module.
    """
    if cotangents.shape[0] == 0:
        return cotangents
    cot = cotangents.to(x.dtype)
    _, vjp = torch.func.vjp(norm.forward, x)  # .forward: bypass the hooks of a running Capture
    return torch.func.vmap(vjp)(cot)[0]
