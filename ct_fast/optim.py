"""Drop-in optimizers whose updates can be restricted to a circuit's parameter slices.

Without a circuit ``CircuitAdamW``/``CircuitSGD`` are ``torch.optim.AdamW``/``SGD``. After
``set_circuit(circuit, model)`` a step reads and writes only the circuit's rows (or columns) of each
parameter, its gradient and its state; everything else stays bit-identical and its state does not move.
State is block-sparse: per parameter, a preallocated pool of row slots (``state_capacity`` rows, by default
all of them) holds moments and a step count for rows that have been in some circuit, so a row's trajectory
equals the torch optimizer's run on that row alone over the steps in which it was selected (since it last
took a slot: when the pool is full, the rows idle longest lose their state).

With ``model=`` and ``top_n=`` they circuit-tune inside an ordinary training loop (``ct_fast.session``): the
model's forwards and backwards score edges and produce the compact gradients of circuit rows, and ``step()``
selects the circuit and updates only it.

Example::

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4, model=model, top_n=300)
    for batch in loader:
        model(**batch).loss.backward()     # k backwards before a step: gradient accumulation
        opt.clip_grad_norm_(1.0)           # optional: clips the circuit's gradient
        opt.step()                         # selects the circuit from this step's scores, updates only it
        opt.zero_grad()

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4, state_capacity=0.5)   # a fixed circuit instead
    opt.set_circuit(circuit, model)    # or a {param: bool mask} dict; set_circuit(None): dense again
    loss.backward(); opt.step()
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from . import ops
from .circuit import Circuit, ParamSelection
from .distributed import is_dtensor, local, shard_rows
from .errors import CTFastError

_SELECTED = torch.iinfo(torch.long).max  # slot priority of a row selected in the current step: never evicted
_FREE = -1  # slot priority of a free slot: taken first


def _n_rows(p: torch.Tensor, dim: int) -> int:
    """Rows of ``p`` along ``dim`` that this rank updates (an FSDP2 DTensor: its local shard's)."""
    p = local(p)
    return p.shape[dim] if p.dim() else 1


def check_state_capacity(capacity):
    """``capacity`` as None, a float in (0, 1] or an int >= 1; anything else raises ``CTFastError``."""
    if capacity is None:
        return None
    if isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool) and capacity >= 1:
        return int(capacity)
    if isinstance(capacity, numbers.Real) and not isinstance(capacity, numbers.Integral) and 0 < capacity <= 1:
        return float(capacity)
    raise CTFastError(f"state_capacity={capacity!r}: expected None (every row can hold state), a float in (0, 1] "
                      "(a fraction of each parameter's rows) or an int >= 1 (rows per parameter)")


def pool_size(capacity, n_rows: int) -> int:
    """Slots of a parameter with ``n_rows`` rows on its sliced axis under ``state_capacity=capacity``."""
    if capacity is None:
        return n_rows
    if isinstance(capacity, float):  # round first: 0.3 * 10 is 3.0000000000000004
        capacity = max(1, math.ceil(round(capacity * n_rows, 6)))
    return min(n_rows, capacity)


class _CircuitOptimizer(torch.optim.Optimizer):
    """Shared machinery: the current selection per parameter and the pooled row state.

    Per parameter, state holds ``dim`` (the sliced axis) and a pool of ``capacity`` slots, allocated once
    (zeros) on the parameter's first selection and never grown:

    - ``slot [n_rows]`` long: each row's slot, -1 = none;
    - ``owner [capacity]`` long: the row holding each slot, -1 = free;
    - ``last_used [capacity]`` long: the optimizer step at which the slot's row was last selected;
    - ``step [capacity + 1]`` fp32 and the moment tensors ``[capacity + 1, width]`` fp32 (width: the other
      dims); the extra last row is scratch: it absorbs the no-op writes of ``_assign`` (content meaningless).

    ``capacity`` comes from the parameter group's ``state_capacity`` when the pool is allocated.
    """

    _moments: tuple[str, ...] = ()

    def __init__(self, params, defaults, model: nn.Module | None = None, top_n=None, tuning: dict | None = None):
        super().__init__(params, defaults)
        self._selection: dict[torch.Tensor, ParamSelection] | None = None  # None: dense
        self._grad_rows: dict[torch.Tensor, torch.Tensor] = {}
        self._clock = 0  # optimizer steps taken: the time stamps of last_used
        self.tuning = None  # the attached TuningSession (model=)
        self.last_step = None  # the Conclusion the last circuit-tuning step applied
        if model is not None:
            self.attach(model, top_n, **(tuning or {}))
        elif top_n is not None or tuning:
            raise CTFastError(f"circuit-tuning options ({', '.join(['top_n'] * (top_n is not None) + sorted(tuning or {}))}) "
                              "need the model: CircuitAdamW(model.parameters(), ..., model=model, top_n=N)")

    # ---- circuit-tuning in the caller's loop ----
    def attach(self, model: nn.Module, top_n=None, **options):
        """Circuit-tune ``model`` from now on (what ``model=`` does): see ``ct_fast.session.TuningSession``
        for ``options``. Returns the session."""
        from .session import TuningSession
        if self.tuning is not None and self.tuning.attached:
            raise CTFastError("this optimizer already circuit-tunes a model (built with model=): call its step() in "
                              "your loop, or build one without model= for CircuitTuner")
        self.tuning = TuningSession(model, self, top_n, **options)
        self.tuning.attach()
        return self.tuning

    def detach(self):
        """Stop circuit-tuning: the model's hooks are removed and its frozen parameters unfrozen; the optimizer is
        an ordinary (dense) one again, its state kept."""
        if self.tuning is not None:
            self.tuning.detach()
            self.tuning = None
        self._selection = None

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        if self.tuning is not None:
            self.tuning.zero_grad()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradient this step will apply to total ``norm_type``-norm ``max_norm``; returns the norm before
        clipping (as ``torch.nn.utils.clip_grad_norm_``). Circuit-tuning: the circuit's compact gradient (the
        circuit is selected now, if this is a refresh step) — ``torch.nn.utils.clip_grad_norm_(model.parameters())``
        sees no gradient there (tunable weights get no ``.grad``) and clips nothing."""
        if self.tuning is None:
            return torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm,
                                                  norm_type)
        c = self.tuning.conclude()
        if c is None:
            return torch.zeros((), device=self.tuning.device)
        grads = list(c.grads.values())
        norm = c.norm if norm_type == 2.0 else torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)
        if grads:  # as torch: scale by min(1, max_norm / (norm + 1e-6)), no host sync
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    clip_grad_norm = clip_grad_norm_  # the name the HF Trainer looks for on sharded optimizers

    def add_param_group(self, param_group: dict):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_capacity"] = check_state_capacity(group["state_capacity"])

    # ---- circuit ----
    def set_circuit(self, circuit=None, model: nn.Module | None = None):
        """Restrict the next steps to ``circuit`` (a ``Circuit`` with ``model``, or a dict mapping parameters
        or their names to bool masks / ``ParamSelection``); parameters it does not name are frozen.
        ``None`` makes the optimizer dense again."""
        self._refuse_while_tuning("set_circuit")
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
        self._refuse_while_tuning("set_grad_rows")
        self._grad_rows = dict(grad_rows)

    def _refuse_while_tuning(self, what: str):
        if self.tuning is not None:
            raise CTFastError(f"{what}: this optimizer circuit-tunes its model (model= was given), so each step "
                              "selects its own circuit; call detach() first to set one by hand")

    def _rows(self, p: torch.Tensor):
        """``(dim, index, count)`` of the rows to update (index None: all ``count`` rows), or None if p is
        frozen. ``count`` is known on the host."""
        if self._selection is None:
            dim = self.state[p]["dim"] if "dim" in self.state[p] else 0
            return dim, None, _n_rows(p, dim)
        sel = self._selection.get(p)
        if sel is None:
            return None
        return sel.dim, None if sel.full else sel.index(p.device), sel.count

    # ---- pooled state ----
    @staticmethod
    def _pool_size(p: torch.Tensor, group: dict, n_rows: int) -> int:
        """Pool slots of ``p``: the group's ``state_capacity``, except that 1-D parameters (biases: a row is one
        element, and a shared output bias is selected whole with any of its heads) always get a full pool."""
        return pool_size(None if p.dim() <= 1 else group["state_capacity"], n_rows)

    def _check_capacity(self, p: torch.Tensor, group: dict, dim: int, count: int):
        """Raise if ``count`` selected rows do not fit the parameter's pool (host-side, no state touched)."""
        state = self.state[p]
        n_rows = _n_rows(p, dim)
        cap = state["owner"].numel() if "owner" in state else self._pool_size(p, group, n_rows)
        if count > cap:
            what = "a dense step (no circuit) updates all" if self._selection is None else "the circuit selects"
            raise CTFastError(f"{what} {count} of the {n_rows} rows (axis {dim}) of a parameter of shape "
                              f"{tuple(p.shape)}, but its optimizer-state pool holds {cap} rows "
                              f"(state_capacity={group['state_capacity']!r}); raise state_capacity to at least "
                              f"{count} rows or {math.ceil(1000 * count / n_rows) / 1000:g} (or None), or select "
                              "fewer rows")

    def _allocate(self, p: torch.Tensor, state: dict, dim: int, capacity: int):
        """The empty pool: every row without a slot, every slot free, zero moments and steps."""
        n_rows, dev = _n_rows(p, dim), p.device
        state.update(dim=dim, slot=torch.full((n_rows,), -1, dtype=torch.long, device=dev),
                     owner=torch.full((capacity,), -1, dtype=torch.long, device=dev),
                     last_used=torch.zeros(capacity, dtype=torch.long, device=dev),
                     step=torch.zeros(capacity + 1, dtype=torch.float32, device=dev))
        for k in self._moments:
            state[k] = torch.zeros((capacity + 1, max(1, local(p).numel()) // n_rows), dtype=torch.float32,
                                   device=dev)

    def _prepare(self, p: torch.Tensor, group: dict, dim: int, index):
        """Give the selected rows slots (allocating the pool on first use); return ``(state, rows [k], slots [k])``."""
        state = self.state[p]
        n_rows = _n_rows(p, dim)
        if "owner" not in state:
            self._allocate(p, state, dim, self._pool_size(p, group, n_rows))
        rows = torch.arange(n_rows, device=p.device) if index is None else index
        return state, rows, self._assign(state, rows)

    def _assign(self, state: dict, rows: torch.Tensor) -> torch.Tensor:
        """Slots ``[k]`` of the selected ``rows [k]`` (distinct, k <= capacity), with device ops only (no sync).

        Rows that hold a slot keep it; the k-th row without one takes the k-th slot in order of priority:
        free slots first, then the least recently used, never one whose row is selected now (k <= capacity
        guarantees enough others). Its previous owner loses the slot; the slot restarts at zero moments, step 0
        (written only to new slots: kept rows write to the scratch row instead, so no kept row is read).
        """
        slot, owner, last_used = state["slot"], state["owner"], state["last_used"]
        cap = owner.numel()
        held = slot.index_select(0, rows)  # [k], -1: missing
        missing = held < 0
        selected = torch.zeros(cap + 1, dtype=torch.bool, device=rows.device)  # entry cap: a sink for missing rows
        selected.index_fill_(0, torch.where(missing, cap, held), True)
        priority = torch.where(selected[:cap], _SELECTED, torch.where(owner < 0, _FREE, last_used))
        candidates = torch.argsort(priority, stable=True)
        rank = (missing.cumsum(0) - 1).clamp_(min=0)  # the k-th missing row takes candidate k
        slots = torch.where(missing, candidates.index_select(0, rank), held)
        evicted = owner.index_select(0, slots)  # previous owners (-1: free; the row itself if it kept its slot)
        # unlink evicted rows; entries that evict nobody point at a selected row, relinked just below
        slot.index_fill_(0, torch.where(missing & (evicted >= 0), evicted, rows), -1)
        slot.index_copy_(0, rows, slots)
        owner.index_copy_(0, slots, rows)
        last_used.index_fill_(0, slots, self._clock)
        if cap < slot.numel():  # a full-size pool never evicts: its new rows take never-used (zero) slots
            fresh = torch.where(missing, slots, cap)  # cap: the scratch row
            for k in ("step",) + self._moments:
                state[k].index_fill_(0, fresh, 0.0)
        return slots

    def _relayout(self, p: torch.Tensor, group: dict, state: dict, dim: int):
        """Move a dense state (every row holding its own slot, one shared step count — e.g. after dense steps)
        to rows along ``dim`` (lossless); a partial row state cannot change axis and raises."""
        old = state["dim"]
        n_old, n_new = _n_rows(p, old), _n_rows(p, dim)
        steps = state["step"][:-1]  # without the scratch entry
        dense = (steps.numel() == n_old and bool((state["slot"] == torch.arange(n_old, device=p.device)).all())
                 and bool((steps == steps[0]).all()))
        if not dense:
            raise CTFastError(f"a parameter of shape {tuple(p.shape)} was selected along axis {dim} after axis {old}; "
                              "a parameter's circuit slices must keep one axis")
        cap = self._pool_size(p, group, n_new)
        if cap < n_new:
            raise CTFastError(f"moving the dense state of a parameter of shape {tuple(p.shape)} to axis {dim} needs "
                              f"{n_new} rows of state, but state_capacity={group['state_capacity']!r} gives {cap}; "
                              "raise state_capacity")
        moved_shape = (n_old,) + self._row_shape(p, old)
        moved = {k: state[k][:n_old].view(moved_shape).movedim(0, old).movedim(dim, 0).reshape(n_new, -1)
                 for k in self._moments}
        self._allocate(p, state, dim, cap)
        for k, v in moved.items():
            state[k][:n_new].copy_(v)
        state["slot"].copy_(torch.arange(n_new, device=p.device))
        state["owner"].copy_(state["slot"])
        state["last_used"].fill_(self._clock)
        state["step"].copy_(steps[0])

    def _upgrade(self, p: torch.Tensor, group: dict, state: dict):
        """A state saved before pools existed (slots 0..m-1 appended as rows entered) as a pool of the group's
        capacity, the same rows keeping the same slots."""
        slot, m = state["slot"], state["step"].numel()
        cap = self._pool_size(p, group, slot.numel())
        if m > cap:
            raise CTFastError(f"the saved optimizer state of a parameter of shape {tuple(p.shape)} holds {m} rows, "
                              f"more than state_capacity={group['state_capacity']!r} allows ({cap}); "
                              "load it with a larger state_capacity")
        rows = (slot >= 0).nonzero().flatten()
        state["owner"] = torch.full((cap,), -1, dtype=torch.long, device=slot.device).index_copy_(
            0, slot[rows], rows)
        state["last_used"] = torch.zeros(cap, dtype=torch.long, device=slot.device)
        for k in ("step",) + self._moments:  # free slots and the scratch row: zeros
            state[k] = torch.cat([state[k], state[k].new_zeros((cap + 1 - m,) + state[k].shape[1:])])

    @staticmethod
    def _row_shape(p, dim):
        return tuple(s for i, s in enumerate(local(p).shape) if i != dim)

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

    def _plan(self, group: dict) -> list[tuple]:
        """Validate one parameter group without touching its state (but for a lossless re-layout):
        ``(p, dim, index, params as rows [R, M], compact fp32 grads [k, M])`` per parameter to update."""
        plan = []
        for p in group["params"]:
            sel = self._rows(p)
            compact = self._grad_rows.pop(p, None)
            if sel is None or (p.grad is None and compact is None):
                continue
            if compact is None and p.grad.is_sparse:
                raise CTFastError("sparse gradients are not supported by circuit optimizers")
            dim, index, count = sel
            if is_dtensor(p):  # FSDP2: this rank updates the rows of its shard
                index, count, compact = self._local_selection(p, dim, index, count, compact)
                if count == 0:
                    continue
            if "dim" in self.state[p] and self.state[p]["dim"] != dim:
                self._relayout(p, group, self.state[p], dim)
            self._check_capacity(p, group, dim, count)
            p2 = self._as_rows(local(p), dim)
            if compact is not None:
                g = compact.reshape(count, -1)
                if g.shape != (count, p2.shape[1]):
                    raise CTFastError(f"compact gradient of shape {tuple(compact.shape)} does not match the "
                                      f"{count} selected rows of a parameter of shape {tuple(p.shape)}")
            else:
                g = self._as_rows(local(p.grad), dim)
                g = g if index is None else g.index_select(0, index)
            plan.append((p, dim, index, p2, g.float().contiguous()))
        return plan

    def _local_selection(self, p, dim: int, index, count: int, compact):
        """A dim-0-sharded parameter's selection on this rank: ``(index, count, compact)`` of the rows it holds.

        Along dim 0 the selected rows inside the shard ``[first, stop)`` (and their compact gradient rows); along
        dim 1 every selected column, each narrowed to the shard's rows. Host-side: the ranges are known."""
        first, stop = shard_rows(p)
        if dim == 1:
            return index, count, None if compact is None else compact[:, first:stop]
        sel = None if self._selection is None else self._selection.get(p)
        ranges = ((0, p.shape[0]),) if sel is None else sel.ranges
        rows, spans, offset = [], [], 0
        for a, b in ranges:
            lo, hi = max(a, first), min(b, stop)
            if lo < hi:
                rows.append((lo - first, hi - first))
                spans.append((offset + lo - a, offset + hi - a))
            offset += b - a
        count = sum(b - a for a, b in rows)
        full = rows == [(0, stop - first)]
        device = local(p).device
        index = None if full else ParamSelection(0, stop - first, tuple(rows)).index(device)
        if compact is not None:
            pick = torch.cat([torch.arange(a, b, device=compact.device) for a, b in spans]) if spans else \
                torch.zeros(0, dtype=torch.long, device=compact.device)
            compact = compact.index_select(0, pick)
        return index, count, compact

    def _collect(self, group: dict, plan: list[tuple]) -> dict:
        """The multi-tensor lists of one validated group: slots assigned, states gathered."""
        out = {"params": [], "grads": [], "rows": [], "slots": [], "steps": []}
        out.update({k: [] for k in self._moments})
        for p, dim, index, p2, g in plan:
            state, rows, slots = self._prepare(p, group, dim, index)
            out["params"].append(p2)
            out["grads"].append(g)
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
        """One update. Circuit-tuning: selects the circuit from this step's backwards (refresh steps) and updates
        its rows only; a step with no backward since the last one does nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.tuning is None:
            self._update()
            return loss
        c = self.tuning.conclude()
        if c is None:
            return loss
        with self.tuning.timer.span("optimizer"):
            self._selection, self._grad_rows = c.selection, dict(c.grads)
            self._update()
        self.tuning.finish_step()
        self.last_step = c
        return loss

    def _update(self):
        """Apply ``p.grad`` / the compact gradients to the current selection (every row when dense)."""
        try:  # validate every group before any state or parameter is written
            plans = [(group, self._plan(group)) for group in self.param_groups]
        finally:
            self._grad_rows = {}
        self._clock += 1
        for group, plan in plans:
            if plan:
                self._apply(self._collect(group, plan), group)

    # ---- state_dict: keep the pool's dtypes; carry the current circuit and the clock ----
    def state_dict(self):
        sd = super().state_dict()
        sd["clock"] = self._clock
        if self._selection is not None:
            ids = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            sd["circuit"] = {ids[p]: [s.dim, s.size, [list(r) for r in s.ranges]] for p, s in self._selection.items()}
        if self.tuning is not None:
            sd["tuning"] = self.tuning.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        from .state_interchange import convert_torch_state
        state_dict = dict(convert_torch_state(self, state_dict))
        circuit = state_dict.pop("circuit", None)
        clock = state_dict.pop("clock", 0)
        tuning = state_dict.pop("tuning", None)
        if tuning is not None and self.tuning is not None:
            self.tuning.load_state_dict(tuning)
        super().load_state_dict(state_dict)
        groups = {p: g for g in self.param_groups for p in g["params"]}
        params = list(groups)
        for g in self.param_groups:  # saved before state_capacity existed
            g["state_capacity"] = check_state_capacity(g.get("state_capacity", self.defaults["state_capacity"]))
        for i, saved in state_dict["state"].items():  # torch casts state to the param dtype: undo that
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v
                             for k, v in saved.items()}
            if "slot" in self.state[p] and "owner" not in self.state[p]:
                self._upgrade(p, groups[p], self.state[p])
        self._clock = clock
        if circuit is None:
            self._selection = None
        else:
            self._selection = {params[int(i)]: ParamSelection(d, n, tuple(tuple(r) for r in rs))
                               for i, (d, n, rs) in circuit.items()}

    # ---- footprint (for logs and benchmarks: these synchronise) ----
    def _pools(self):
        return [s for s in self.state.values() if "owner" in s]

    def num_state_rows(self) -> int:
        """Rows currently holding state, over all parameters (the block-sparse footprint in use)."""
        return sum(int((s["owner"] >= 0).sum()) for s in self._pools())

    def state_capacity_rows(self) -> int:
        """Rows of the allocated pools, over all parameters (fixed once each parameter has been selected)."""
        return sum(s["owner"].numel() for s in self._pools())

    def state_bytes(self) -> int:
        """Bytes of all state tensors (pools, moments, index tensors)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))


class CircuitAdamW(_CircuitOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, optional amsgrad/maximize) with circuit masking.

    Moments are fp32 whatever the parameter dtype (bf16/fp16 parameters get fp32 math).

    ``state_capacity`` bounds the state: per parameter, a pool of ``ceil(f * n_rows)`` rows for a float
    ``f`` in (0, 1], ``min(n, n_rows)`` rows for an int ``n``, all rows for None (the default; a param group
    may set its own). The pool is allocated on the parameter's first selection and never grows. A step whose
    selection exceeds a pool raises ``CTFastError`` before anything is written; dense steps (no circuit) need
    the full pool. When new rows need slots and none is free, the rows idle longest (not selected in this
    step) are evicted: an evicted row loses its moments and step count and restarts from zero — as a fresh
    torch optimizer on that row — when it is selected again. Rows outside the circuit keep their state frozen
    while they hold a slot.

    ``model=``, ``top_n=`` and the options of ``CircuitTuner`` (``ablation``, ``positions``, ``selection``,
    ``refresh_every``, ``schedule``, ``token_budget``, ``memory_mode``...) circuit-tune inside your own loop
    (module docstring); without ``model=`` this is ``torch.optim.AdamW``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, state_capacity=None, *, model: nn.Module | None = None, top_n=None, **tuning):
        state_capacity = check_state_capacity(state_capacity)
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise CTFastError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay}")
        self._moments = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, state_capacity=state_capacity),
                         model, top_n, tuning)

    def _apply(self, lists: dict, group: dict):
        b1, b2 = group["betas"]
        ops.masked_adamw_(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                          lists.get("max_exp_avg_sq", []), lists["steps"], lists["rows"], lists["slots"],
                          group["lr"], b1, b2, group["eps"], group["weight_decay"], group["maximize"])


class CircuitSGD(_CircuitOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, L2 weight decay, maximize) with circuit masking.

    See ``CircuitAdamW`` for ``state_capacity`` (bounded state, evictions) and ``model=`` / ``top_n=``
    (circuit-tuning in your own loop).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, state_capacity=None, *, model: nn.Module | None = None, top_n=None, **tuning):
        state_capacity = check_state_capacity(state_capacity)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise CTFastError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise CTFastError("nesterov momentum requires momentum > 0 and dampening = 0")
        self._moments = ("momentum_buffer",) if momentum else ()
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, state_capacity=state_capacity),
                         model, top_n, tuning)

    def _apply(self, lists: dict, group: dict):
        ops.masked_sgd_(lists["params"], lists["grads"], lists.get("momentum_buffer", []), lists["steps"],
                        lists["rows"], lists["slots"], group["lr"], group["momentum"], group["dampening"],
                        group["weight_decay"], group["nesterov"], group["maximize"])
