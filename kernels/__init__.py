"""Triton kernels of ct_fast, installed as ``ct_fast.kernels``.

Each kernel has its pure-torch reference in ``ct_fast.ops.reference`` / ``ct_fast.ops.library`` (the oracle and
fallback) and is reached through ``ct_fast.ops`` dispatch (``CT_FAST_BACKEND=triton``, or ``auto`` on a GPU for
the ops not in ``ct_fast.ops.AUTO_SKIP``). On CPU they run only under ``TRITON_INTERPRET=1`` (small test shapes).

- ``score_edges`` / ``score_edges_into``: fused attribution scoring, one upstream group or several accumulated
  into a block of the score matrix (``score_edges.py``)
- ``residual_grads`` / ``residual_grads_blocks``: the downstream nodes' residual gradients through their norm,
  written once (the norm's reductions, then the gradients), for one block of nodes or several read through one
  norm (``residual_grads.py``)
- ``masked_weight_grad``: compact dW of selected features, one gathering GEMM (``masked_weight_grad.py``)
- ``masked_adamw_`` / ``masked_sgd_``: optimizers on selected rows; ``nonfinite_flag_``: their skip-flag check
  (``masked_optim.py``)
"""

from .masked_optim import masked_adamw_, masked_sgd_, nonfinite_flag_
from .masked_weight_grad import masked_weight_grad
from .residual_grads import residual_grads, residual_grads_blocks
from .score_edges import score_edges, score_edges_into

__all__ = ["masked_adamw_", "masked_sgd_", "masked_weight_grad", "nonfinite_flag_", "residual_grads",
           "residual_grads_blocks", "score_edges", "score_edges_into"]
