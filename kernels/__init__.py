"""Triton kernels of ct_fast, installed as ``ct_fast.kernels``.

Each kernel has its pure-torch reference in ``ct_fast.ops.reference`` (the oracle and fallback) and is
reached through ``ct_fast.ops`` dispatch (``CT_FAST_BACKEND=triton``, or ``auto`` on a GPU without the
CUDA build). On CPU they run only under ``TRITON_INTERPRET=1`` (tests use small fp32 shapes).

- ``score_edges``: fused attribution scoring (``score_edges.py``)
- ``masked_adamw_``: AdamW on selected rows (``masked_adamw.py``)
"""

from .masked_adamw import masked_adamw_
from .score_edges import score_edges

__all__ = ["masked_adamw_", "score_edges"]
