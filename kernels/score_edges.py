"""Triton fused attribution scoring: ``S[u, n] += sum_t (delta[t, u] @ W[u]) . G[n, t]``.

Program (u, block of downstream nodes, token split): for each token block (BT) and d_model block (BK) the
node's residual contribution ``a = delta[t-block, u*w:(u+1)*w] @ W[u][:, k-block]`` ([BT, BK], a tensor-core
dot) is formed in registers and dotted with the downstream gradients ``G[n-block, t-block, k-block]``; per-node
activations are never written to memory. Accumulation in fp32 from fp32/bf16/fp16 inputs; token splits
combine with atomic adds. ``W=None``: ``delta[t]`` already is the single node's contribution (w = d).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _score_edges_kernel(delta_ptr, w_ptr, g_ptr, s_ptr, n_u, w, n_d, c, d, tokens_per_split,
                        HAS_W: tl.constexpr,  # False: delta rows already are residual vectors (w == d)
                        BW: tl.constexpr,  # head width block (>= w, power of two, >= 16)
                        BN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    u = tl.program_id(0)
    n_offs = tl.program_id(1) * BN + tl.arange(0, BN)
    t_begin = tl.program_id(2) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, c)
    acc = tl.zeros((BN,), dtype=tl.float32)
    i_offs = tl.arange(0, BW)
    for t0 in range(t_begin, t_end, BT):
        t_offs = t0 + tl.arange(0, BT)
        t_mask = t_offs < t_end
        if HAS_W:
            z = tl.load(delta_ptr + t_offs[:, None] * (n_u * w) + u * w + i_offs[None, :],
                        mask=t_mask[:, None] & (i_offs[None, :] < w), other=0.0).to(tl.float32)
        for k0 in range(0, d, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_mask = k_offs < d
            if HAS_W:
                wt = tl.load(w_ptr + u * w * d + i_offs[:, None] * d + k_offs[None, :],
                             mask=(i_offs[:, None] < w) & k_mask[None, :], other=0.0).to(tl.float32)
                a = tl.dot(z, wt, input_precision="ieee")  # [BT, BK]; full fp32, not TF32
            else:
                a = tl.load(delta_ptr + t_offs[:, None] * d + k_offs[None, :],
                            mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            gt = tl.load(g_ptr + n_offs[:, None, None] * (c * d) + t_offs[None, :, None] * d + k_offs[None, None, :],
                         mask=(n_offs[:, None, None] < n_d) & t_mask[None, :, None] & k_mask[None, None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(tl.sum(gt * a[None, :, :], axis=2), axis=1)
    tl.atomic_add(s_ptr + u * n_d + n_offs, acc, mask=n_offs < n_d)


def score_edges(delta, up_weight, grad_down):
    """Launcher with the signature of ``torch.ops.ct_fast.score_edges``: fp32 ``[n_u, n_d]``."""
    delta, grad_down = delta.contiguous(), grad_down.contiguous()
    n_d, c, d = grad_down.shape
    if up_weight is None:
        n_u, w = 1, d
    else:
        up_weight = up_weight.contiguous()
        n_u, w = up_weight.shape[0], up_weight.shape[1]
    S = torch.zeros(n_u, n_d, dtype=torch.float32, device=delta.device)
    if n_u == 0 or n_d == 0 or c == 0:
        return S
    BN, BT, BK = 16, 16, 32
    splits = max(1, min(triton.cdiv(c, BT), 64))
    per_split = triton.cdiv(triton.cdiv(c, splits), BT) * BT
    grid = (n_u, triton.cdiv(n_d, BN), triton.cdiv(c, per_split))
    _score_edges_kernel[grid](delta, up_weight if up_weight is not None else delta, grad_down, S, n_u, w, n_d, c, d,
                              per_split, HAS_W=up_weight is not None, BW=max(16, triton.next_power_of_2(w)),
                              BN=BN, BT=BT, BK=BK)
    return S
