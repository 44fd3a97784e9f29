"""Triton kernels of ct_fast, installed as ``ct_fast.kernels``.

Each kernel has its pure-torch reference in ``ct_fast.ops.reference`` (the oracle and fallback) and is
reached only through ``ct_fast.ops``. The fused scoring, masked-dW and masked multi-tensor optimizer
kernels land with the kernels issue; until then ``ct_fast.ops`` runs the reference.
"""
