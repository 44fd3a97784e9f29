"""Triton masked weight gradient: the compact dW of selected features as one tiled GEMM, no gathered copies.

``C[r, j] = sum_n A[n, idx[r]] * B[n, j]`` over the N tokens, fp32 ``[k, b]``, where (see
``ct_fast.ops.reference.masked_weight_grad``) ``out_features=True``: A = grad_out ``[N, out]``, B = x ``[N, in]``;
``out_features=False``: A = x, B = grad_out. ``idx`` is read inside the A loads (a gather per tile), so only the
selected columns of A are touched and no ``index_select`` copy is made; ``index=None`` means every feature.

Program (row block of the k selected features, column block of B, token split): it walks its tokens in BLOCK_K
steps, loading A's tile as ``[BLOCK_K, BLOCK_M]`` (tokens x features, the row-major order of A, so consecutive
selected features are adjacent in memory) and B's as ``[BLOCK_K, BLOCK_N]``, and accumulates ``A^T B`` with
``tl.dot`` in fp32: bf16/fp16 operands run on tensor cores; fp32 operands run in full fp32 (``ieee``) unless torch
allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), as torch's own fp32 GEMM does. When the output has
too few tiles to fill the GPU and N is long, the tokens are split: each split writes its own fp32 partial
``[k, b]`` and the partials are summed by torch afterwards (deterministic: no atomics).

Indices must be in range (as ``index_select`` would check; the kernel does not); any strides are accepted.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_weight_grad_kernel(a_ptr, b_ptr, idx_ptr, c_ptr, N, K, NB, tokens_per_split,
                               stride_an, stride_aa, stride_bn, stride_bb, stride_cs, stride_cm,
                               HAS_INDEX: tl.constexpr,  # False: every column of A, in order
                               DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot
                               PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" / "tf32")
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < K
    n_mask = rn < NB
    if HAS_INDEX:
        feat = tl.load(idx_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    else:
        feat = rm.to(tl.int64)
    a_cols = feat * stride_aa  # [BLOCK_M] element offsets of the selected columns of A
    b_cols = rn.to(tl.int64) * stride_bb
    t_begin = pid_s * tokens_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, tokens_per_split, BLOCK_K):  # tokens_per_split: a multiple of BLOCK_K
        rk = t_begin + t0 + tl.arange(0, BLOCK_K)
        k_mask = rk < N
        rk64 = rk.to(tl.int64)
        a = tl.load(a_ptr + rk64[:, None] * stride_an + a_cols[None, :], mask=k_mask[:, None] & m_mask[None, :],
                    other=0.0)  # [BLOCK_K, BLOCK_M]
        b = tl.load(b_ptr + rk64[:, None] * stride_bn + b_cols[None, :], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    c = c_ptr + pid_s.to(tl.int64) * stride_cs + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c, acc, mask=m_mask[:, None] & n_mask[None, :])


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def default_config(device: torch.device, dtype: torch.dtype, k: int, nb: int, n: int) -> dict:
    """Tile sizes, warps, pipeline stages and token splits for one call (fixed heuristics, no autotuning: the
    selection size k changes every circuit refresh, and a retune per k would cost more than it saves)."""
    if device.type != "cuda":  # the interpreter: small tiles, no pipelining
        return dict(block_m=16, block_n=16, block_k=16, num_warps=1, num_stages=1, splits=1)
    if dtype == torch.float32:
        cfg = dict(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    else:
        cfg = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    tiles = triton.cdiv(k, cfg["block_m"]) * triton.cdiv(nb, cfg["block_n"])
    sms = _num_sms(device)
    # split the tokens when the output tiles cannot fill the SMs; keep >= 4 BLOCK_K steps per split
    splits = 1
    if tiles < sms:
        splits = max(1, min(triton.cdiv(2 * sms, tiles), n // (4 * cfg["block_k"]), 64))
    cfg["splits"] = splits
    return cfg


def masked_weight_grad(x, grad_out, index, out_features, *, out=None, config=None, workspace=None):
    """Launcher with the signature of ``torch.ops.ct_fast.masked_weight_grad``: fp32 ``[k, other]``.

    ``out``: an optional fp32 ``[k, other]`` tensor to write (every element is written); ``config``: overrides of
    ``default_config`` (``block_m``, ``block_n``, ``block_k``, ``num_warps``, ``num_stages``, ``splits``);
    ``workspace``: an optional contiguous fp32 ``[splits, k, other]`` buffer for the partials of a token split."""
    if x.dim() != 2 or grad_out.dim() != 2 or x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"masked_weight_grad: x [N, in] and grad_out [N, out] expected, got {tuple(x.shape)} and "
                         f"{tuple(grad_out.shape)}")
    if x.device != grad_out.device or (index is not None and index.device != x.device):
        raise ValueError("masked_weight_grad: x, grad_out and index must be on one device")
    if index is not None and (index.dim() != 1 or index.dtype not in (torch.int64, torch.int32)):
        raise ValueError("masked_weight_grad: index must be a 1-D int64/int32 tensor")
    if index is not None and not index.is_contiguous():  # the kernel reads it by offsets
        index = index.contiguous()
    a, b = (grad_out, x) if out_features else (x, grad_out)
    n, nb = x.shape[0], b.shape[1]
    k = a.shape[1] if index is None else index.numel()
    if out is None:
        out = torch.empty((k, nb), dtype=torch.float32, device=x.device)
    elif out.shape != (k, nb) or out.dtype != torch.float32 or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"masked_weight_grad: out must be fp32 [{k}, {nb}] with unit column stride")
    if k == 0 or nb == 0:
        return out
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype not in _TL:
        raise ValueError(f"masked_weight_grad: float32/bfloat16/float16 operands expected, got {dtype}")
    cfg = default_config(x.device, dtype, k, nb, n)
    cfg.update(config or {})
    splits = max(1, min(int(cfg["splits"]), triton.cdiv(max(n, 1), cfg["block_k"])))
    per_split = triton.cdiv(triton.cdiv(max(n, 1), splits), cfg["block_k"]) * cfg["block_k"]
    splits = triton.cdiv(max(n, 1), per_split)
    if splits == 1:
        target = out
    elif workspace is None:
        target = torch.empty((splits, k, nb), dtype=torch.float32, device=x.device)
    elif workspace.shape != (splits, k, nb) or not workspace.is_contiguous() or workspace.dtype != torch.float32:
        raise ValueError(f"masked_weight_grad: workspace must be contiguous fp32 [{splits}, {k}, {nb}]")
    else:
        target = workspace
    # the interpreter multiplies bf16 operands as raw integers: give tl.dot fp32 there (exact products either way)
    interpreted = x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    dot_dtype = tl.float32 if interpreted else _TL[dtype]
    # fp32 operands: full fp32 unless torch allows TF32 matmuls; 16-bit operands: the precision flag does not apply
    # (tensor cores take them as they are), pass Triton's default
    tf32 = dot_dtype != tl.float32 or (x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    grid = (triton.cdiv(k, cfg["block_m"]), triton.cdiv(nb, cfg["block_n"]), splits)
    _masked_weight_grad_kernel[grid](
        a, b, index if index is not None else a, target, n, k, nb, per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), target.stride(0) if splits > 1 else 0, target.stride(-2),
        HAS_INDEX=index is not None, DOT_DTYPE=dot_dtype, PRECISION="tf32" if tf32 else "ieee",
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        torch.sum(target, dim=0, out=out)
    return out
