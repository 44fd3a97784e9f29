"""Drop-in optimizers whose updates can be restricted to a circuit's parameter slices.

Without a circuit ``CircuitAdamW``/``CircuitSGD`` are ``torch.optim.AdamW``/``SGD``. After
``set_circuit(circuit, model)`` a step reads and writes only the circuit's rows (or columns) of each
parameter, its gradient and its state; everything else stays bit-identical and its state does not move.
State is block-sparse: per parameter, moments exist only for rows that have been in some circuit, each
row with its own step count, so a row's trajectory equals the torch optimizer's run on that row alone
over the steps in which it was selected.

Example::

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4)
    opt.set_circuit(circuit, model)    # or a {param: bool mask} dict; set_circuit(None): dense again
    loss.backward(); opt.step()
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .circuit import Circuit, ParamSelection
from .errors import CTFastError

_ALL = "all"


class _CircuitOptimizer(torch.optim.Optimizer):
    """Shared machinery: the current selection per parameter and the compact row-state layout.

    Per parameter, state holds ``dim`` (the sliced axis), ``slot [rows]`` (long, -1 = no state yet),
    ``step [capacity]`` (fp32) and the moment tensors ``[capacity, *other dims]`` (fp32).
    """

    _moments: tuple[str, ...] = ()

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._selection: dict[torch.Tensor, ParamSelection] | None = None  # None: dense
        self._grad_rows: dict[torch.Tensor, torch.Tensor] = {}

    # ---- circuit ----
    def set_circuit(self, circuit=None, model: nn.Module | None = None):
        """Restrict the next steps to ``circuit`` (a ``Circuit`` with ``model``, or a dict mapping parameters
        or their names to bool masks / ``ParamSelection``); parameters it does not name are frozen.
        ``None`` makes the optimizer dense again."""
        if circuit is None:
            self._selection = None
            return
        if isinstance(circuit, Circuit):
            if model is None:
                raise CTFastError("set_circuit(circuit) needs the model: set_circuit(circuit, model)")
            graph = circuit.graph
            circuit = circuit.param_selections(graph) if graph is not None else {
                k: ParamSelection.from_mask(m) for k, m in circuit.param_masks(model).items() if m.any()}
        by_name = dict(model.named_parameters()) if model is not None else {}
        mine = {p for g in self.param_groups for p in g["params"]}
        selection = {}
        for key, sel in circuit.items():
            p = by_name.get(key) if isinstance(key, str) else key
            if p is None:
                raise CTFastError(f"set_circuit: {key!r} names no parameter of the model (pass model= for names)")
            if p not in mine:
                continue  # not optimised by this optimizer (e.g. a frozen embedding)
            if isinstance(sel, torch.Tensor):
                if sel.shape != p.shape:
                    raise CTFastError(f"set_circuit: the mask for {key if isinstance(key, str) else 'a parameter'} "
                                      f"has shape {tuple(sel.shape)}, the parameter {tuple(p.shape)}")
                sel = ParamSelection.from_mask(sel)
            if sel.count:
                selection[p] = sel
        self._selection = selection

    def set_grad_rows(self, grad_rows: dict):
        """Compact gradients for the next ``step()``: ``{param: [k, *other dims]}`` holding the gradient of the
        selected rows in the selection's order (what ``MaskedLinears`` produces). They replace ``p.grad``,
        so no full-size gradient needs to exist."""
        self._grad_rows = dict(grad_rows)

    def _rows(self, p: torch.Tensor):
        """``(dim, index)`` of the rows to update (index None: all rows), or None if p is frozen."""
        if self._selection is None:
            dim = self.state[p]["dim"] if "dim" in self.state[p] else 0
            return dim, None
        sel = self._selection.get(p)
        if sel is None:
            return None
        return sel.dim, None if sel.full else sel.index(p.device)

    # ---- compact state ----
    def _prepare(self, p: torch.Tensor, dim: int, index):
        """Allocate state for rows that have none; return ``(state, rows [k], slots [k])``."""
        state = self.state[p]
        n_rows = p.shape[dim] if p.dim() else 1
        if "dim" not in state:
            state["dim"] = dim
            state["slot"] = torch.full((n_rows,), -1, dtype=torch.long, device=p.device)
            state["step"] = torch.zeros(0, dtype=torch.float32, device=p.device)
            for k in self._moments:
                state[k] = torch.zeros((0, max(1, p.numel()) // n_rows), dtype=torch.float32, device=p.device)
        elif state["dim"] != dim:
            self._relayout(p, state, dim)
        rows = torch.arange(n_rows, device=p.device) if index is None else index
        new = rows[state["slot"][rows] < 0]
        if new.numel():
            cap = state["step"].numel()
            state["slot"][new] = torch.arange(cap, cap + new.numel(), device=p.device)
            state["step"] = torch.cat([state["step"], state["step"].new_zeros(new.numel())])
            for k in self._moments:
                state[k] = torch.cat([state[k], state[k].new_zeros((new.numel(), state[k].shape[1]))])
        return state, rows, state["slot"][rows]

    def _relayout(self, p: torch.Tensor, state: dict, dim: int):
        """Move a dense state (every row allocated, one shared step count — e.g. after dense steps) to rows
        along ``dim``; a partial row state cannot change axis and raises."""
        old = state["dim"]
        n_old = p.shape[old] if p.dim() else 1
        steps = state["step"]
        dense = (steps.numel() == n_old and bool((state["slot"] == torch.arange(n_old, device=p.device)).all())
                 and bool((steps == steps[0]).all()))
        if not dense:
            raise CTFastError(f"a parameter of shape {tuple(p.shape)} was selected along axis {dim} after axis {old}; "
                              "a parameter's circuit slices must keep one axis")
        moved_shape = (n_old,) + self._row_shape(p, old)
        for k in self._moments:
            full = state[k].view(moved_shape).movedim(0, old)
            state[k] = full.movedim(dim, 0).reshape(p.shape[dim], -1).contiguous()
        state["dim"] = dim
        state["slot"] = torch.arange(p.shape[dim], device=p.device)
        state["step"] = steps.new_full((p.shape[dim],), float(steps[0]))

    @staticmethod
    def _row_shape(p, dim):
        return tuple(s for i, s in enumerate(p.shape) if i != dim)

    @staticmethod
    def _as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
        """A 2-D view ``[rows, M]`` of ``t`` with axis ``dim`` first (writes through to ``t``)."""
        t = t.unsqueeze(0) if t.dim() == 0 else t
        moved = t.movedim(dim, 0)
        try:
            return moved.view(moved.shape[0], -1)
        except RuntimeError:
            raise CTFastError(f"cannot view a parameter of shape {tuple(t.shape)} and strides {t.stride()} as rows "
                              f"along axis {dim}; circuit optimizers need row/column slices of 1-D/2-D or "
                              "contiguous parameters") from None

    def _collect(self, group: dict) -> dict:
        """The multi-tensor lists of one parameter group: params as row views, compact fp32 grads, states."""
        out = {"params": [], "grads": [], "rows": [], "slots": [], "steps": []}
        out.update({k: [] for k in self._moments})
        for p in group["params"]:
            sel = self._rows(p)
            compact = self._grad_rows.pop(p, None)
            if sel is None or (p.grad is None and compact is None):
                continue
            if compact is None and p.grad.is_sparse:
                raise CTFastError("sparse gradients are not supported by circuit optimizers")
            dim, index = sel
            state, rows, slots = self._prepare(p, dim, index)
            p2 = self._as_rows(p, dim)
            if compact is not None:
                g = compact.reshape(rows.numel(), -1)
                if g.shape != (rows.numel(), p2.shape[1]):
                    raise CTFastError(f"compact gradient of shape {tuple(compact.shape)} does not match the "
                                      f"{rows.numel()} selected rows of a parameter of shape {tuple(p.shape)}")
            else:
                g = self._as_rows(p.grad, dim)
                g = g if index is None else g.index_select(0, index)
            out["params"].append(p2)
            out["grads"].append(g.float().contiguous())
            out["rows"].append(rows)
            out["slots"].append(slots)
            out["steps"].append(state["step"])
            for k in self._moments:
                out[k].append(state[k])
        return out

    def _apply(self, lists: dict, group: dict):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:  # validate and prepare every group before writing any parameter
            collected = [(group, self._collect(group)) for group in self.param_groups]
        finally:
            self._grad_rows = {}
        for group, lists in collected:
            if lists["params"]:
                self._apply(lists, group)
        return loss

    # ---- state_dict: keep the compact layout's dtypes; carry the current circuit ----
    def state_dict(self):
        sd = super().state_dict()
        if self._selection is not None:
            ids = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            sd["circuit"] = {ids[p]: [s.dim, s.size, [list(r) for r in s.ranges]] for p, s in self._selection.items()}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        circuit = state_dict.pop("circuit", None)
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():  # torch casts state to the param dtype: undo that
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v
                             for k, v in saved.items()}
        if circuit is None:
            self._selection = None
        else:
            self._selection = {params[int(i)]: ParamSelection(d, n, tuple(tuple(r) for r in rs))
                               for i, (d, n, rs) in circuit.items()}

    def num_state_rows(self) -> int:
        """Rows of state allocated over all parameters (a measure of the block-sparse footprint)."""
        return sum(int(s["step"].numel()) for s in self.state.values() if "step" in s)


class CircuitAdamW(_CircuitOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, optional amsgrad/maximize) with circuit masking.

    Moments are fp32 whatever the parameter dtype (bf16/fp16 parameters get fp32 math).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise CTFastError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay}")
        self._moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _apply(self, lists: dict, group: dict):
        b1, b2 = group["betas"]
        ops.masked_adamw_(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                          lists.get("max_exp_avg_sq", []), lists["steps"], lists["rows"], lists["slots"],
                          group["lr"], b1, b2, group["eps"], group["weight_decay"], group["maximize"])


class CircuitSGD(_CircuitOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, L2 weight decay, maximize) with circuit masking."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise CTFastError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise CTFastError("nesterov momentum requires momentum > 0 and dampening = 0")
        self._moments = ("momentum_buffer",) if momentum else ()
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    def _apply(self, lists: dict, group: dict):
        ops.masked_sgd_(lists["params"], lists["grads"], lists.get("momentum_buffer", []), lists["steps"],
                        lists["rows"], lists["slots"], group["lr"], group["momentum"], group["dampening"],
                        group["weight_decay"], group["nesterov"], group["maximize"])
