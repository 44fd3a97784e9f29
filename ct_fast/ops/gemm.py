"""GEMM operands cuBLAS runs at full speed: 16-byte aligned leading dimensions.

cuBLAS takes its vectorised tensor-core kernels only when every operand's leading dimension (and base address)
is a whole number of 16-byte vectors; otherwise it falls back to kernels that load 2 or 4 bytes at a time
(``cutlass_80_tensorop_..._align2`` on an H200, sm80 code on an sm90 GPU). The circuit's GEMMs have such
dimensions by construction: a gathered block of k selected features (``[tokens, k]``, k = 205 at 5% of 4096), a
score block of ``n_d`` downstream nodes (``[rows, n_d]``, 98 in a llama-1B span). The H200 measured it: masked dW
over 64-aligned feature blocks ran at 307 TFLOP/s, over strided features (k = 615, 205, 820, ...) at 127; the
faithful step's scoring spent 22.6 of its 171 ms of kernels in align2 GEMMs (bench/results/gpu_profile.json).

The fix is padding: the padded rows/columns cost at most 7 extra features of compute and are never read back.
It applies on a GPU only (``aligns``); elsewhere the calls are the plain ones, bit for bit.
"""

from __future__ import annotations

import torch

ALIGN_BYTES = 16


def aligns(device: torch.device) -> bool:
    """Whether GEMMs on ``device`` pad to aligned leading dimensions (GPUs: cuBLAS; CPU BLAS does not care)."""
    return device.type == "cuda"


def padding(n: int, dtype: torch.dtype) -> int:
    """Elements to add to a leading dimension of ``n`` elements of ``dtype`` to make it 16-byte aligned."""
    per = max(1, ALIGN_BYTES // dtype.itemsize)
    return -n % per


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[m, k] x [k, n] -> [m, n]``) written into a buffer whose rows are 16-byte aligned on a GPU (the
    result is a view ``[m, n]`` of ``[m, n + pad]``): cuBLAS's ldc is then aligned whatever ``n`` is (n > 1; a single
    column is a GEMV)."""
    if not _pads(b.shape[1], a) or torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # (no autograd)
        return a @ b
    return torch.mm(a, b, out=_aligned_empty((a.shape[0],), b.shape[1], a))


def _pads(n: int, like: torch.Tensor) -> int:
    """Elements a result row of ``n`` elements (n > 1) in ``like``'s dtype gets to be 16-byte aligned on its device."""
    return padding(n, like.dtype) if aligns(like.device) and n > 1 else 0


def _aligned_empty(lead: tuple, n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[*lead, n]`` in ``like``'s dtype and device whose rows are 16-byte aligned (``_pads``)."""
    return torch.empty(*lead, n + _pads(n, like), dtype=like.dtype, device=like.device)[..., :n]


def split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [m, s, k] x b [n, s, k] -> [m, n]`` fp32: ``a.view(m, -1) @ b.view(n, -1).t()`` with its K split explicitly
    into ``s`` blocks — one bmm of ``s`` partial products ``[s, m, n]`` (in ``a``'s dtype, rows 16-byte aligned on a
    GPU), summed in fp32. For a skinny product with a huge K (the scorer's ``A @ G^T``) where the GEMM's own split of
    K leaves the GPU idle; whether it is faster is measured (``measured.derive_products``)."""
    out = _aligned_empty((a.shape[1], a.shape[0]), b.shape[0], a)
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0), out=out).sum(0, dtype=torch.float32)


def padded_index(index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``index [k]`` with its last entry repeated up to an aligned count (on a GPU): a block gathered by it is
    ``[rows, k + pad]``, its leading dimension aligned; the first k rows of a product with it are the unpadded
    product's. Unchanged where nothing needs padding, and for a single feature (the GEMM is a GEMV).
    Made once per index tensor (kept on it: the masked linears reuse a selection's index every step, read only)."""
    pad = padding(index.numel(), dtype) if aligns(index.device) and index.numel() > 1 else 0
    if pad == 0:
        return index
    kept = getattr(index, "_ct_fast_padded", None)
    if kept is None or kept.numel() != index.numel() + pad:
        kept = index._ct_fast_padded = torch.cat([index, index[-1:].expand(pad)])
    return kept
