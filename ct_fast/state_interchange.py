"""State interchange with ``torch.optim.AdamW`` / ``SGD``: their state_dicts load into the circuit optimizers
(converted to the pooled layout), and a circuit state_dict never silently feeds a torch optimizer.

- ``convert_torch_state`` (called by ``CircuitAdamW/CircuitSGD.load_state_dict``): a per-parameter state in
  torch's format (``step``/``exp_avg``/``exp_avg_sq``[/``max_exp_avg_sq``] or ``momentum_buffer``, the
  parameter's shape) becomes a dense pool along axis 0 (every row its own slot, one step count), so the run
  continues torch's trajectory exactly; a later circuit on columns re-lays it out losslessly.
- ``install_torch_guard``: a global step pre-hook that makes any other ``torch.optim.Optimizer`` holding a
  circuit (pooled-row) state raise ``CTFastError`` before its step, instead of ignoring or misreading it.
- ``to_torch_state``: a circuit state_dict in which every row holds state at one step count (e.g. after dense
  steps) as a torch state_dict.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import CTFastError
from .state_pool import per_parameter_states, pool_size

_TORCH_KEYS = {"AdamW": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "SGD": ("momentum_buffer",)}


def _saved_kind(group: dict) -> str | None:
    """The optimizer family whose hyper-parameters a saved param group holds."""
    if "betas" in group:  # Adam and AdamW groups carry amsgrad; RAdam's, NAdam's and Adamax's do not (other updates)
        return "AdamW" if "amsgrad" in group else None
    if "momentum" in group and "dampening" in group:
        return "SGD"
    return None


def _is_pooled(state) -> bool:
    """Whether a per-parameter state is in ct_fast's layout: a member of a shared pool (``dim``/``pool``), or a
    per-parameter pool of the earlier layouts (``slot`` with ``owner``, or with ``dim`` before pools)."""
    return isinstance(state, dict) and ("pool" in state or "slot" in state and ("owner" in state or "dim" in state))


def _n_rows(shape, dim: int = 0) -> int:
    return shape[dim] if len(shape) else 1


def _shape(t) -> tuple:
    return tuple(t.shape)


def _id_map(optimizer, saved_groups: list) -> dict:
    """Saved parameter id -> ``(param, saved group index)``, as ``torch.optim.Optimizer.load_state_dict`` maps
    them (the flattened param_groups order); raises if the groups do not match."""
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved_groups]
    if mine != theirs:
        raise CTFastError(f"load_state_dict: the state_dict has {len(theirs)} param group(s) of {theirs} parameters, "
                          f"this {type(optimizer).__name__} {len(mine)} of {mine}; build the optimizer over the same "
                          "parameters, in the same groups and order, as the optimizer that saved it")
    return {pid: (p, gi) for gi, (g, sg) in enumerate(zip(optimizer.param_groups, saved_groups))
            for p, pid in zip(g["params"], sg["params"])}


def _check_groups(optimizer, saved_groups: list):
    """The saved hyper-parameters must describe this optimizer's algorithm (its moments follow the saved groups'
    amsgrad / momentum, restored by the load as torch does)."""
    from .optim import CircuitAdamW, CircuitSGD

    mine = "AdamW" if isinstance(optimizer, CircuitAdamW) else "SGD" if isinstance(optimizer, CircuitSGD) else None
    if mine is None:
        return
    name = type(optimizer).__name__
    for gi, g in enumerate(saved_groups):
        kind = _saved_kind(g)
        if kind != mine:
            saved = {"AdamW": "torch.optim.Adam/AdamW (or CircuitAdamW)",
                     "SGD": "torch.optim.SGD (or CircuitSGD)"}.get(kind, "another optimizer")
            target = {"AdamW": "ct_fast.CircuitAdamW", "SGD": "ct_fast.CircuitSGD"}.get(kind)
            fix = (f"load it into {target}(...)" if target else
                   "load a torch.optim.AdamW/SGD or circuit-optimizer state_dict")
            raise CTFastError(f"load_state_dict: param group {gi} of the state_dict was saved by {saved} "
                              f"(hyper-parameters {sorted(k for k in g if k != 'params')}), but this is a {name}; "
                              f"{fix}")
        if mine == "AdamW":
            if g.get("decoupled_weight_decay", True) is False and g.get("weight_decay", 0):
                raise CTFastError(f"load_state_dict: param group {gi} of the state_dict was saved by torch.optim.Adam "
                                  f"with weight_decay={g['weight_decay']} (an L2 penalty in the gradient), but "
                                  "CircuitAdamW decays weights decoupled (AdamW), so the run cannot continue; "
                                  "continue it with torch.optim.Adam, or start the circuit run from the model "
                                  "without the optimizer state")


def _convert_one(optimizer, p: torch.Tensor, pid, group: dict, saved: dict) -> dict | None:
    """One torch-format per-parameter state as a dense pool along axis 0 (None: nothing to keep)."""
    from .optim import CircuitAdamW

    adamw = isinstance(optimizer, CircuitAdamW)
    kind = "AdamW" if adamw else "SGD"
    foreign = [k for k in saved if k not in _TORCH_KEYS[kind]]
    if foreign:
        other = "AdamW" if kind == "SGD" else "SGD"
        hint = (f"a torch.optim.{other} state: load it into ct_fast.Circuit{other}(...)"
                if all(k in _TORCH_KEYS[other] for k in saved) else "not a torch.optim.AdamW/SGD state")
        raise CTFastError(f"load_state_dict: the saved state of parameter {pid} (shape {_shape(p)}) holds "
                          f"{sorted(saved)}, {hint}; this is a {type(optimizer).__name__}")
    own = optimizer._moments_of(group)  # the saved group's hyper-parameters, restored by the load (as torch)
    unread = [k for k in _TORCH_KEYS[kind] if k != "step" and saved.get(k) is not None and k not in own]
    if unread:
        flag = f"amsgrad={group.get('amsgrad')}" if kind == "AdamW" else f"momentum={group.get('momentum')}"
        raise CTFastError(f"load_state_dict: the saved state of parameter {pid} (shape {_shape(p)}) holds {unread}, "
                          f"but its saved param group has {flag}, which keeps none: the state_dict is inconsistent "
                          "(edited, or saved by another optimizer)")
    moments = {k: saved.get(k) for k in own}
    if adamw:
        missing = [k for k in ("step",) + own if saved.get(k) is None]
        if missing:
            raise CTFastError(f"load_state_dict: the saved AdamW state of parameter {pid} (shape {_shape(p)}) lacks "
                              f"{missing} (it holds {sorted(saved)}); it is not a complete torch.optim.AdamW state")
        step = float(saved["step"])
    else:
        buf = saved.get("momentum_buffer")
        if buf is None or "momentum_buffer" not in own:
            return None  # no buffer: the next step starts it (torch: buffer = gradient), as a fresh pool does
        step = 1.0  # > 0: the next step updates the buffer instead of starting it
    for k, v in moments.items():
        if not isinstance(v, torch.Tensor) or _shape(v) != _shape(p):
            got = _shape(v) if isinstance(v, torch.Tensor) else type(v).__name__
            raise CTFastError(f"load_state_dict: the saved {k} of parameter {pid} has shape {got}, the parameter "
                              f"{_shape(p)}; the state_dict belongs to other parameters (check the model and the "
                              "order of the parameters given to the optimizer)")
    n_rows = _n_rows(_shape(p))
    cap = pool_size(None if p.dim() <= 1 else group["state_capacity"], n_rows)
    if cap < n_rows:
        raise CTFastError(f"load_state_dict: the torch state of parameter {pid} (shape {_shape(p)}) is dense (all "
                          f"{n_rows} rows hold state), but state_capacity={group['state_capacity']!r} of its param "
                          f"group gives a pool of {cap} rows; build the optimizer with state_capacity=None (or at "
                          f"least {n_rows} rows) to load it, or start a fresh run (no load_state_dict) for a "
                          "bounded pool")
    dev = p.device
    rows = torch.arange(n_rows, dtype=torch.long, device=dev)
    out = {"dim": 0, "slot": rows, "owner": rows.clone(),
           "last_used": torch.zeros(n_rows, dtype=torch.long, device=dev),
           "step": torch.full((n_rows + 1,), step, dtype=torch.float32, device=dev)}
    width = max(1, p.numel()) // n_rows if n_rows else 0
    for k, v in moments.items():
        pool = torch.zeros((n_rows + 1, width), dtype=torch.float32, device=dev)  # last row: scratch
        pool[:n_rows].copy_(v.detach().reshape(n_rows, width))
        out[k] = pool
    return out


def convert_torch_state(optimizer, state_dict: dict) -> dict:
    """``state_dict`` with every per-parameter state saved by a torch optimizer converted to the pooled layout
    of ``optimizer`` (a ``CircuitAdamW``/``CircuitSGD``); circuit states pass unchanged.

    A torch state is dense: it becomes a full pool along axis 0 (``slot = owner = arange``, every slot at the
    saved step count; SGD: step 1 where a momentum buffer exists, and no state where none does), on the
    parameter's device, fp32. Saved param groups without ``state_capacity`` (torch's) take the optimizer's
    current group's. Raises ``CTFastError`` (nothing loaded) for an AdamW state into a CircuitSGD or the
    reverse, moments its saved group's amsgrad (or SGD momentum) keeps none of, shapes that do not match the
    parameters, or a pool (``state_capacity``) smaller than the dense state.
    """
    saved_groups = state_dict.get("param_groups")
    if saved_groups is None or "state" not in state_dict:
        raise CTFastError("load_state_dict: expected an optimizer state_dict (keys 'state' and 'param_groups'), "
                          f"got keys {sorted(state_dict)}")
    ids = _id_map(optimizer, saved_groups)
    _check_groups(optimizer, saved_groups)
    torch_format = {pid: s for pid, s in state_dict["state"].items()
                    if isinstance(s, dict) and s and not _is_pooled(s)}
    if not torch_format and all("state_capacity" in g for g in saved_groups):
        return state_dict
    from .optim import check_state_capacity

    groups = []
    for g, mine in zip(saved_groups, optimizer.param_groups):
        g = dict(g)
        if "state_capacity" not in g:  # torch's groups: keep this run's capacity
            g["state_capacity"] = mine["state_capacity"]
        g["state_capacity"] = check_state_capacity(g["state_capacity"])
        for k, v in (("maximize", False), ("amsgrad", False), ("nesterov", False)):  # as torch's __setstate__
            if k in optimizer.defaults:
                g.setdefault(k, v)
        groups.append(g)
    state = {}
    for pid, s in state_dict["state"].items():
        if pid not in torch_format:
            state[pid] = s
            continue
        if pid not in ids:
            raise CTFastError(f"load_state_dict: the state_dict holds state for parameter id {pid!r}, which none of "
                              "its param groups lists; it is not a valid optimizer state_dict")
        p, gi = ids[pid]
        converted = _convert_one(optimizer, p, pid, groups[gi], s)
        if converted is not None:
            state[pid] = converted
    return {**state_dict, "state": state, "param_groups": groups}


# ---- torch optimizers must not consume a circuit state -----------------------------------------------

_GUARD = None  # the RemovableHandle of the global step pre-hook
_scanned: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> id of its state found clean


def _forget(optimizer):
    """Load post-hook: the state changed, scan it again at the next step (id() may be reused)."""
    _scanned[optimizer] = None


def _guard(optimizer, args, kwargs):
    from .optim import _CircuitOptimizer

    if isinstance(optimizer, _CircuitOptimizer):
        return None
    state = getattr(optimizer, "state", None)
    if state is None:
        return None
    if optimizer in _scanned:
        if _scanned[optimizer] == id(state):
            return None
    else:  # first time: rescan after every load_state_dict even if the new state reuses the old one's id
        optimizer.register_load_state_dict_post_hook(_forget)
    pooled = [(p, s) for p, s in state.items() if _is_pooled(s)]
    if pooled:
        cls = type(optimizer)
        name = (f"torch.optim.{cls.__qualname__}" if cls.__module__.startswith("torch.optim")
                else f"{cls.__module__}.{cls.__qualname__}")
        p, s = pooled[0]
        sgd = "momentum_buffer" in s or isinstance(optimizer, torch.optim.SGD)
        target = "CircuitSGD" if sgd and "exp_avg" not in s else "CircuitAdamW"
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else p
        raise CTFastError(f"this {name} holds a ct_fast circuit-optimizer state (pooled rows) for "
                          f"{len(pooled)} parameter(s), e.g. one of shape {shape}; a torch optimizer would "
                          f"ignore or misread it, so the step was refused (parameters untouched). Load that "
                          f"state_dict into ct_fast.{target}(...) instead, or convert it first with "
                          "ct_fast.state_interchange.to_torch_state(state_dict, params) (needs every row to hold "
                          "state, e.g. after dense steps)")
    _scanned[optimizer] = id(state)
    return None


def install_torch_guard():
    """Register (once; later calls return the same handle) a global optimizer step pre-hook that raises
    ``CTFastError`` before the step of any non-circuit ``torch.optim.Optimizer`` whose state holds ct_fast's
    pooled row layout (a circuit state_dict loaded into torch's optimizer). The state is scanned once per
    optimizer and state object (again after each ``load_state_dict``); other steps cost a dict lookup."""
    global _GUARD
    if _GUARD is None:
        _GUARD = register_optimizer_step_pre_hook(_guard)
    return _GUARD


# ---- circuit -> torch ----------------------------------------------------------------------------------

def to_torch_state(state_dict: dict, params) -> dict:
    """A ``CircuitAdamW``/``CircuitSGD`` state_dict as a ``torch.optim.AdamW``/``SGD`` state_dict.

    ``params``: the parameters (tensors, or param-group dicts) in the order the circuit optimizer was given
    them. Every row of each parameter with state must hold a slot at one shared step count (a dense run, or
    circuits that selected whole parameters in the same steps); a partial row state has no torch equivalent
    and raises ``CTFastError``. Torch-format states pass unchanged; ``clock``, ``circuit`` and
    ``state_capacity`` are dropped.
    """
    flat = []
    for x in params:
        flat.extend(x["params"] if isinstance(x, dict) else [x])
    ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    if len(ids) != len(flat):
        raise CTFastError(f"to_torch_state: the state_dict covers {len(ids)} parameters, {len(flat)} were given; "
                          "pass the parameters the circuit optimizer was built with, in the same order")
    by_id = dict(zip(ids, flat))
    state = {}
    for pid, s in per_parameter_states(state_dict)["state"].items():
        if not _is_pooled(s):
            state[pid] = s
            continue
        p = by_id[pid]
        dim, slot = int(s["dim"]), s["slot"].long()
        n_rows = _n_rows(_shape(p), dim)
        if slot.numel() != n_rows:
            raise CTFastError(f"to_torch_state: the state of parameter {pid} has {slot.numel()} rows along axis "
                              f"{dim}, the given parameter of shape {_shape(p)} {n_rows}; pass the same parameters")
        held = (slot >= 0).all()
        steps = s["step"][slot.clamp(min=0)]
        if not bool(held) or not bool((steps == steps[0]).all()):
            raise CTFastError(f"to_torch_state: parameter {pid} (shape {_shape(p)}) holds state for "
                              f"{int((slot >= 0).sum())} of its {n_rows} rows (axis {dim}) at step counts "
                              f"{sorted(set(steps[slot >= 0].tolist()))}; torch keeps one state per parameter, so "
                              "only a state in which every row holds state at one step count converts: continue "
                              "with the circuit optimizer, or take dense steps first")
        step = float(steps[0])
        row_shape = tuple(n for i, n in enumerate(p.shape) if i != dim)
        out = {}
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            if k in s:
                rows = s[k].index_select(0, slot).reshape((n_rows,) + row_shape)
                out[k] = (rows.movedim(0, dim) if p.dim() else rows.reshape(())).contiguous()
        if "exp_avg" in s:
            out = {"step": torch.tensor(step, dtype=torch.float32), **out}
        elif step == 0 or "momentum_buffer" not in out:
            continue  # SGD without a (started) momentum buffer: torch keeps no state
        state[pid] = out
    groups = []
    for g in state_dict["param_groups"]:
        g = {k: v for k, v in g.items() if k != "state_capacity"}
        if "betas" in g:
            g["decoupled_weight_decay"] = True  # so that torch.optim.Adam loads it as AdamW too
        groups.append(g)
    return {"state": state, "param_groups": groups}
