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
        """Allocate state for rows that have none; return ``(state, slots)`` (slots None: identity layout)."""
        state = self.state[p]
        rows = p.shape[dim] if p.dim() else 1
        if "dim" not in state:
            state["dim"] = dim
            state["slot"] = torch.full((rows,), -1, dtype=torch.long, device=p.device)
            state["step"] = torch.zeros(0, dtype=torch.float32, device=p.device)
            for k in self._moments:
                state[k] = p.new_zeros((0,) + self._row_shape(p, dim), dtype=torch.float32)
        elif state["dim"] != dim:
            raise CTFastError(f"a parameter of shape {tuple(p.shape)} was selected along axis {dim} after axis "
                              f"{state['dim']}; a parameter's circuit slices must keep one axis")
        want = torch.arange(rows, device=p.device) if index is None else index
        new = want[state["slot"][want] < 0]
        if new.numel():
            cap = state["step"].numel()
            state["slot"][new] = torch.arange(cap, cap + new.numel(), device=p.device)
            state["step"] = torch.cat([state["step"], state["step"].new_zeros(new.numel())])
            for k in self._moments:
                state[k] = torch.cat([state[k], state[k].new_zeros((new.numel(),) + state[k].shape[1:])])
        slots = state["slot"][want]
        identity = slots.numel() == state["step"].numel() and bool((slots == torch.arange(
            slots.numel(), device=p.device)).all()) and index is None
        return state, None if identity else slots

    @staticmethod
    def _row_shape(p, dim):
        return tuple(s for i, s in enumerate(p.shape) if i != dim)

    def _update_param(self, p: torch.Tensor, group: dict):
        rows = self._rows(p)
        compact = self._grad_rows.pop(p, None)
        if rows is None or (p.grad is None and compact is None):
            return
        if compact is None and p.grad.is_sparse:
            raise CTFastError("sparse gradients are not supported by circuit optimizers")
        dim, index = rows
        state, slots = self._prepare(p, dim, index)
        view = p.unsqueeze(0) if p.dim() == 0 else p
        p_rows = view.movedim(dim, 0)
        if compact is not None:
            g_rows = compact
            if index is not None:
                p_rows = p_rows.index_select(0, index)
            if g_rows.shape != p_rows.shape:
                raise CTFastError(f"compact gradient of shape {tuple(g_rows.shape)} does not match the "
                                  f"{tuple(p_rows.shape)} selected rows of a parameter")
        else:
            grad = p.grad.unsqueeze(0) if p.dim() == 0 else p.grad
            g_rows = grad.movedim(dim, 0)
            if index is not None:
                p_rows, g_rows = p_rows.index_select(0, index), g_rows.index_select(0, index)
        work = p_rows.float()
        if slots is None:
            state["step"] += 1
            moments = [state[k] for k in self._moments]
            self._math(work, g_rows.float(), moments, state["step"], group)
        else:
            state["step"][slots] += 1
            moments = [state[k].index_select(0, slots) for k in self._moments]
            self._math(work, g_rows.float(), moments, state["step"][slots], group)
            for k, m in zip(self._moments, moments):
                state[k].index_copy_(0, slots, m)
        if index is not None:
            view.movedim(dim, 0).index_copy_(0, index, work.to(p.dtype))
        elif work.data_ptr() != p_rows.data_ptr():
            p_rows.copy_(work)

    def _math(self, param_rows, grad_rows, moments, step, group):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                self._update_param(p, group)
        self._grad_rows = {}
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

    def _math(self, param_rows, grad_rows, moments, step, group):
        b1, b2 = group["betas"]
        ops.adamw_rows_(param_rows, grad_rows, moments[0], moments[1], step, lr=group["lr"], beta1=b1, beta2=b2,
                        eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                        max_exp_avg_sq=moments[2] if group["amsgrad"] else None)


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

    def _math(self, param_rows, grad_rows, moments, step, group):
        ops.sgd_rows_(param_rows, grad_rows, moments[0] if moments else None, step, lr=group["lr"],
                      momentum=group["momentum"], dampening=group["dampening"],
                      weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])
