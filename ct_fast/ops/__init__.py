"""Op dispatch: one name per op, implemented by the pure-torch reference (``ct_fast.ops.reference``).

``CT_FAST_BACKEND`` selects the backend (see README, "Environment variables"). This version ships the
``torch`` reference only; native backends (``cuda``, ``triton``, ``cpp``) register here when built, and
an explicitly requested backend that is not available raises instead of silently falling back.
"""

from __future__ import annotations

import os

from ..errors import CTFastError
from . import reference
from .reference import (adamw_rows_, heads_to_residual, masked_bias_grad, masked_weight_grad, norm_vjp_,  # noqa: F401
                        score_edges, sgd_rows_)

AVAILABLE_BACKENDS = ("torch",)


def backend() -> str:
    """The backend named by ``CT_FAST_BACKEND`` (default ``auto`` -> the best available)."""
    name = os.environ.get("CT_FAST_BACKEND", "auto").lower()
    if name == "auto":
        return AVAILABLE_BACKENDS[0]
    if name not in AVAILABLE_BACKENDS:
        raise CTFastError(
            f"CT_FAST_BACKEND={name!r} is not available in this build (available: "
            f"{', '.join(AVAILABLE_BACKENDS)}); unset CT_FAST_BACKEND or set it to 'torch'"
        )
    return name


__all__ = ["adamw_rows_", "backend", "heads_to_residual", "masked_bias_grad", "masked_weight_grad", "norm_vjp_",
           "reference", "score_edges", "sgd_rows_"]
