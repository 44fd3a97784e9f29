"""Drop-in optimizers whose updates can be restricted to a circuit's parameter slices.

Without a circuit ``CircuitAdamW``/``CircuitSGD`` are ``torch.optim.AdamW``/``SGD``. After
``set_circuit(circuit, model)`` a step reads and writes only the circuit's rows (or columns) of each
parameter, its gradient and its state; everything else stays bit-identical and its state does not move.
State is block-sparse: a preallocated pool of row slots holds moments and a step count for rows that have been
in some circuit, so a row's trajectory equals the torch optimizer's run on that row alone over the steps in
which it was selected (since it last took a slot: when the pool is full, the rows idle longest lose their
state). Parameters of a param group whose rows have the same width share one pool (``ct_fast.state_pool``),
sized by ``state_capacity`` (by default a slot for every row).

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

import inspect
import math
import numbers
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .circuit import Circuit, ParamSelection
from .distributed import is_dtensor, local, shard_rows
from .errors import CTFastError
from .state_pool import RowPool, pool_size


_TORCH_SWITCHES = ("foreach", "fused", "capturable")  # torch.optim implementation choices, same arithmetic


def _without_torch_switches(options: dict | None) -> dict:
    """``options`` without torch.optim's implementation switches (``foreach``/``fused``/``capturable``: ct_fast picks
    its kernels itself — ``CT_FAST_BACKEND`` — and its steps are capturable), so code written for torch's AdamW/SGD
    runs as it is; ``differentiable=True`` (a step autograd can see through) is refused."""
    options = dict(options or {})
    for name in _TORCH_SWITCHES:
        options.pop(name, None)
    if options.pop("differentiable", False):
        raise CTFastError("differentiable=True (backpropagating through the optimizer step) is not supported by the "
                          "circuit optimizers; use torch.optim for that")
    return options


def _check_tuning_options(options: dict):
    """Refuse option names ``TuningSession`` does not take (a misspelling), listing the ones it does."""
    from .session import TuningSession

    known = set(inspect.signature(TuningSession).parameters) - {"model", "optimizer", "top_n", "rerun"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CTFastError(f"unknown circuit-tuning option(s) {unknown}; the options are {sorted(known)}")


def _n_rows(p: torch.Tensor, dim: int) -> int:
    """Rows of ``p`` along ``dim`` that this rank updates (an FSDP2 DTensor: its local shard's)."""
    p = local(p)
    return p.shape[dim] if p.dim() else 1


def _check_pool_members(pools: list, by_id: dict):
    """Refuse saved optimizer-state pools whose members do not fit the parameters they load into (another model, the
    parameters listed in another order, an FSDP2 rank's file in another number of processes): each member's rows
    along its axis and their width must be the parameter's (this rank's shard's) — else two parameters would share
    moments, or a step index out of range."""
    for saved in pools:
        width = int(saved["width"])
        for pid, dim, _, n_rows, _ in saved["members"]:
            p = by_id.get(pid)
            if p is None:
                raise CTFastError(f"the optimizer state names parameter {pid}, which this optimizer does not have "
                                  "(saved for another model or other param groups)")
            rows = _n_rows(p, int(dim))
            if int(n_rows) != rows or rows * width != local(p).numel():
                raise CTFastError(
                    f"the optimizer state of parameter {pid} holds {n_rows} rows of width {width} (axis {dim}), but "
                    f"this optimizer's parameter {pid} has {rows} rows of width {local(p).numel() // max(rows, 1)} "
                    "there: it was saved for another model, with the parameters in another order, or (FSDP2) with "
                    "another number of processes — load it into the same model, parameters and world size")


def check_state_capacity(capacity):
    """``capacity`` as None, a float in (0, 1] or an int >= 1; anything else raises ``CTFastError``."""
    if capacity is None:
        return None
    if isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool) and capacity >= 1:
        return int(capacity)
    if isinstance(capacity, numbers.Real) and not isinstance(capacity, numbers.Integral) and 0 < capacity <= 1:
        return float(capacity)
    raise CTFastError(f"state_capacity={capacity!r}: expected None (every row can hold state), a float in (0, 1] "
                      "(a fraction of each parameter's rows) or an int >= 1 (rows per parameter, pooled)")


class _StepLayout(NamedTuple):
    """What a step of one param group derives from the selection and the pools alone, kept while neither changes
    (every step of a fixed circuit after its first): each updated parameter's place, rows, slot requests and
    state tensors — the per-parameter dictionary lookups, validation and list building an eager step would
    otherwise repeat on the host (``_CircuitOptimizer._update``)."""
    entries: tuple  # (p, dim, index, count, block, compact) per updated parameter, in group order; block: its one
    # range of selected rows (a narrow of p.grad) or None; compact: its gradient came from set_grad_rows
    skipped: tuple  # selected parameters that had no gradient
    rows: list  # per entry: its selected rows [count] (an index kept for the selection)
    pools: tuple  # (pool, entry positions, the pool's global rows wanted [sum of counts]) per pool
    state: dict  # "steps" and each moment: the pool tensors, per entry


class _CircuitOptimizer(torch.optim.Optimizer):
    """Shared machinery: the current selection per parameter and the pooled row state.

    ``state[p]`` holds ``dim`` (the sliced axis); the moments and step counts live in ``RowPool``s
    (``ct_fast.state_pool``), one per (param group, row width, device), shared by the parameters whose rows
    have that width (a parameter that brings a slot for every row has one of its own). A parameter joins its pool when it is first selected or registered (``reserve_state``);
    a pool is allocated at the first step that selects one of its members and grows only when a parameter
    joins later (the tuning session registers them all up front, so its pools are allocated once).
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands over grad_scale/found_inf (see _skip_flag)
    skip_nonfinite = False

    def __init__(self, params, defaults, model: nn.Module | None = None, top_n=None, tuning: dict | None = None):
        tuning = _without_torch_switches(tuning)
        _check_tuning_options(tuning)
        super().__init__(params, defaults)
        self._selection: dict[torch.Tensor, ParamSelection] | None = None  # None: dense
        self._grad_rows: dict[torch.Tensor, torch.Tensor] = {}
        self._clock = 0  # optimizer steps taken (the time stamps of last_used), until the count moves to the device
        self._clock_t: torch.Tensor | None = None  # from the first slot assignment on: the count, on the device
        self._pools: dict[tuple, RowPool] = {}  # (group index, row width, device) -> the rows' shared state
        self._pool_of: dict[torch.Tensor, tuple] = {}  # parameter -> the key of its pool
        self._layouts: dict[int, _StepLayout] | None = None  # group index -> layout (``_update``); None: none kept
        self._moments_seen: dict[int, tuple] = {}  # group index -> the moments its pools were last checked for
        self._indices: dict[torch.Tensor, tuple] = {}  # param -> (its selection, the selected rows [k] on its device)
        self.tuning = None  # the attached TuningSession (model=)
        self.last_step = None  # the Conclusion the last circuit-tuning step applied
        self.step_skipped: torch.Tensor | None = None  # [1] fp32 on the device, 1: the last step wrote nothing
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
        _check_tuning_options(options)
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
        """Circuit-tuning (``model=``): clip the circuit's compact gradient, the one this step will apply (the circuit
        is selected now, if this is a refresh step), to total ``norm_type``-norm ``max_norm``; returns the norm
        before clipping (as ``torch.nn.utils.clip_grad_norm_``, which sees no gradient there: tunable weights get no
        ``.grad``). Without ``model=``: ``torch.nn.utils.clip_grad_norm_`` over every parameter's ``.grad`` (a
        circuit fixed by ``set_circuit`` included: the norm is the whole gradient's)."""
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
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
            c.norm = c.norm * scale  # the gradients' 2-norm now (a second call sees the clipped gradient, as torch's)
        return norm

    clip_grad_norm = clip_grad_norm_  # the name the HF Trainer looks for on sharded optimizers

    def add_param_group(self, param_group: dict):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_capacity"] = check_state_capacity(group["state_capacity"])
        where = self.__dict__.setdefault("_where", {})  # param -> (group index, position): called from __init__ too
        where.update((p, (len(self.param_groups) - 1, j)) for j, p in enumerate(group["params"]))
        self._layouts = None
        if getattr(self, "tuning", None) is not None:  # circuit-tuning (model=): the new parameters are trained
            self.tuning.sync_trained()

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
            if graph is not None:  # every parameter its circuits can select joins its pool now: allocated once
                dims = graph.param_dims
                self.reserve_state({p: dims[n] for n, p in model.named_parameters() if n in dims})
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
        if sel.full:
            return sel.dim, None, sel.count
        kept = self._indices.get(p)  # built when p's selection changes: a fixed circuit's steps, and a parameter whose
        if kept is None or kept[0] != sel or kept[1].device != p.device:  # rows a new circuit keeps, launch none
            kept = self._indices[p] = (sel, sel.index(p.device))
        return sel.dim, kept[1], sel.count

    def _single_range(self, p: torch.Tensor) -> tuple[int, int] | None:
        """``(start, stop)`` when p's selection is one range of rows, else None."""
        sel = (self._selection or {}).get(p)
        return sel.ranges[0] if sel is not None and len(sel.ranges) == 1 else None

    @property
    def _selection(self) -> dict | None:
        """The current selection ``{param: ParamSelection}`` (None: dense); setting another drops the step layouts."""
        return self.__dict__.get("_current_selection")

    @_selection.setter
    def _selection(self, selection: dict | None):
        if selection is not None and selection is self.__dict__.get("_current_selection"):
            return  # the same circuit again (the tuning session between refreshes): its layouts stay
        self.__dict__["_current_selection"] = selection
        self._layouts = None

    # ---- pooled state (ct_fast.state_pool) ----
    def _clock_on(self, device: torch.device) -> torch.Tensor:
        """The step count as a 0-dim device tensor (created at the first step, then advanced on the device: the
        value the pools stamp stays right when a captured step is replayed)."""
        if self._clock_t is None:
            self._clock_t = torch.tensor(self._clock, dtype=torch.long, device=device)
        return self._clock_t if self._clock_t.device == device else self._clock_t.to(device)

    def clock(self) -> int:
        """Optimizer steps taken (reads the device count: synchronises)."""
        return self._clock if self._clock_t is None else int(self._clock_t)

    @staticmethod
    def _entry(p: torch.Tensor, group: dict, dim: int) -> tuple:
        """``(p, dim, n_rows, budget)``: what ``p`` brings into its pool. 1-D parameters (biases: a row is one
        element, and a shared output bias is selected whole with any of its heads) bring a slot per row."""
        n_rows = _n_rows(p, dim)
        return p, dim, n_rows, pool_size(None if p.dim() <= 1 else group["state_capacity"], n_rows)

    def _pool_key(self, p: torch.Tensor, gi: int, dim: int) -> tuple:
        """``(group index, row width, device[, position in the group])``. A parameter that brings a slot for every
        row (``state_capacity=None``, biases) has a pool of its own, allocated when it is first selected: it
        gains nothing from sharing. The others share one pool per group, width and device."""
        q, group = local(p), self.param_groups[gi]
        n_rows = _n_rows(p, dim)
        key = (gi, max(1, q.numel()) // n_rows, str(q.device))
        if self._entry(p, group, dim)[3] >= n_rows:
            key += (self._where[p][1],)
        return key

    def _pool(self, key: tuple) -> RowPool:
        if key not in self._pools:
            self._pools[key] = RowPool(key[1], self._moments_of(self.param_groups[key[0]]), torch.device(key[2]))
        return self._pools[key]

    def _join(self, gi: int, entries) -> None:
        """Make each ``(p, dim, n_rows, budget)`` entry a member of its pool (one growth per pool)."""
        by_key: dict[tuple, list] = {}
        for e in entries:
            if e[0] not in self._pool_of:
                by_key.setdefault(self._pool_key(e[0], gi, e[1]), []).append(e)
        if by_key:
            self._layouts = None
        for key, es in by_key.items():
            self._pool(key).join(es)
            for p, dim, *_ in es:
                self._pool_of[p] = key
                self.state[p]["dim"] = dim

    def _leave(self, p: torch.Tensor) -> None:
        """``p`` leaves its pool (it is about to join the pool of another axis)."""
        self._layouts = None
        self._pools[self._pool_of.pop(p)].leave(p)

    def reserve_state(self, dims: dict, allocate: bool = False) -> None:
        """Register parameters (``{param: sliced axis}``) in their pools before their first selection, so that
        each pool is allocated once, at its final size (the tuning session registers every tunable parameter).
        Parameters the optimizer does not hold, or that already have state, are skipped. ``allocate``: allocate
        the pools now rather than at the first step that selects a member (the memory plan measures them)."""
        by_group: dict[int, list] = {}
        for p, dim in dims.items():
            if p in self._where and p not in self._pool_of:
                gi = self._where[p][0]
                by_group.setdefault(gi, []).append(self._entry(p, self.param_groups[gi], dim))
        for gi, entries in by_group.items():
            self._join(gi, entries)
        if allocate:
            for pool in self._pools.values():
                pool.allocate()

    def param_state(self, p: torch.Tensor) -> dict:
        """``p``'s state seen per parameter: ``dim``, ``slot [n_rows]`` (its rows' slots, -1: none; a view of the
        pool's slot table) and the pool's ``step``/moment tensors those slots index (shared with the other
        members of its pool). Empty if ``p`` has no allocated state."""
        key = self._pool_of.get(p)
        pool = None if key is None else self._pools[key]
        if pool is None or not pool.allocated:
            return {}
        return {"dim": pool.members[p].dim, "slot": pool.slots_of(p),
                **{k: pool.t[k] for k in ("step",) + pool.moments}}

    def pool_capacity(self, p: torch.Tensor) -> int:
        """Slots of the pool ``p`` belongs to (0 if it belongs to none yet)."""
        key = self._pool_of.get(p)
        return 0 if key is None else self._pools[key].capacity

    def pool_demand(self, gi: int, entries) -> dict:
        """``{pool key: (rows wanted, slots, rows of its members)}`` for ``(param, dim, count)`` entries of param
        group ``gi`` (count rows of each selected along dim), a parameter not yet in the pool of that axis
        counted as joining it. Host-side; nothing changes."""
        group, need = self.param_groups[gi], {}
        for p, dim, count in entries:
            need.setdefault(self._pool_key(p, gi, dim), []).append((p, dim, count))
        out = {}
        for key, es in need.items():
            pool = self._pools.get(key)
            members = pool.members if pool is not None else {}
            new = {p: self._entry(p, group, dim) for p, dim, _ in es if p not in members}
            out[key] = (sum(c for *_, c in es), (pool.capacity if pool is not None else 0) +
                        sum(e[3] for e in new.values()),
                        sum(m.n_rows for m in members.values()) + sum(e[2] for e in new.values()))
        return out

    def _check_capacity(self, gi: int, group: dict, plan: list[tuple]):
        """Raise if the rows a step selects in some pool exceed its slots (host-side, no state touched). A step whose
        parameters are all members, on their axes, of pools with a slot per row (``RowPool.own_slots``) cannot
        overflow one: nothing to check (no per-step pool keys); a parameter joining a pool makes the full check."""
        if all(self._owns_slots(p, dim) for p, dim, *_ in plan):
            return
        entries = [(p, dim, g.shape[0]) for p, dim, _, _, g in plan]
        for key, (total, cap, rows) in self.pool_demand(gi, entries).items():
            if total <= cap:
                continue
            mine = [(p, d, c) for p, d, c in entries if self._pool_key(p, gi, d) == key]
            what = "a dense step (no circuit) updates" if self._selection is None else "the circuit selects"
            detail = ", ".join(f"{c} of the {_n_rows(p, d)} rows (axis {d}) of a parameter of shape {tuple(p.shape)}"
                               for p, d, c in mine[:3]) + (", ..." if len(mine) > 3 else "")
            raise CTFastError(f"{what} {total} rows of width {key[1]} in param group {gi} ({detail}), but the "
                              f"optimizer-state pool these parameters share holds {cap} rows "
                              f"(state_capacity={group['state_capacity']!r}); raise state_capacity to at least "
                              f"{math.ceil(1000 * total / rows) / 1000:g} (or None), or select fewer rows")

    def _owns_slots(self, p: torch.Tensor, dim: int) -> bool:
        """Whether ``p`` is a member, along ``dim``, of a pool that gives every row a slot of its own."""
        key = self._pool_of.get(p)
        if key is None:
            return False
        pool = self._pools[key]
        return pool.own_slots and pool.members[p].dim == dim

    def _relayout(self, p: torch.Tensor, gi: int, group: dict, dim: int):
        """Move a dense state (every row holding a slot, one shared step count — e.g. after dense steps) to rows
        along ``dim`` (lossless); a partial row state cannot change axis and raises."""
        old_pool = self._pools[self._pool_of[p]]
        old = old_pool.members[p].dim
        n_old, n_new = _n_rows(p, old), _n_rows(p, dim)
        slots = old_pool.slots_of(p)
        steps = old_pool.t["step"].index_select(0, slots.clamp(min=0))
        if not (bool((slots >= 0).all()) and bool((steps == steps[0]).all())):
            raise CTFastError(f"a parameter of shape {tuple(p.shape)} was selected along axis {dim} after axis {old}; "
                              "a parameter's circuit slices must keep one axis")
        entry = self._entry(p, group, dim)
        if entry[3] < n_new:
            raise CTFastError(f"moving the dense state of a parameter of shape {tuple(p.shape)} to axis {dim} needs "
                              f"{n_new} rows of state, but state_capacity={group['state_capacity']!r} gives "
                              f"{entry[3]}; raise state_capacity")
        moved_shape = (n_old,) + self._row_shape(p, old)
        moved = {k: old_pool.t[k].index_select(0, slots).view(moved_shape).movedim(0, old).movedim(dim, 0)
                 .reshape(n_new, -1) for k in old_pool.moments}
        self._leave(p)
        self._join(gi, [entry])
        pool = self._pools[self._pool_of[p]]
        pool.allocate()
        new = pool.assign(pool.global_rows(p, torch.arange(n_new, device=slots.device)), self._clock_on(pool.device))
        pool.t["step"].index_fill_(0, new, steps[0])
        for k, v in moved.items():
            pool.t[k].index_copy_(0, new, v)

    def _import_rows(self, pending: list[tuple]):
        """Load per-parameter states of the earlier layouts (a pool per parameter, or rows appended as they
        entered; also torch states converted by ``state_interchange``) into the shared pools, the same rows
        keeping the same state and time stamps."""
        for p, saved in pending:
            gi = self._where[p][0]
            self._join(gi, [self._entry(p, self.param_groups[gi], int(saved["dim"]))])
        for p, saved in pending:
            pool = self._pools[self._pool_of[p]]
            pool.allocate()
            slot = saved["slot"].to(pool.device, torch.long)
            rows = (slot >= 0).nonzero().flatten()
            old = slot.index_select(0, rows)
            last = saved["last_used"].to(pool.device).index_select(0, old) if "last_used" in saved else \
                torch.zeros_like(rows)
            try:
                pool.place(p, rows, {k: saved[k].to(pool.device).index_select(0, old)
                                     for k in ("step",) + pool.moments}, last)
            except ValueError as e:
                group = self.param_groups[self._where[p][0]]
                raise CTFastError(f"load_state_dict: the saved optimizer state of a parameter of shape "
                                  f"{tuple(p.shape)} does not fit its pool ({e}) under state_capacity="
                                  f"{group['state_capacity']!r}; load it with a larger state_capacity") from None

    @staticmethod
    def _row_shape(p, dim):
        return tuple(s for i, s in enumerate(local(p).shape) if i != dim)

    @staticmethod
    def _as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
        """A 2-D view ``[rows, M]`` of ``t`` with axis ``dim`` first (writes through to ``t``)."""
        if dim == 0 and t.dim() == 2:  # already rows (the common case: no view to make, host time per parameter)
            return t
        t = t.unsqueeze(0) if t.dim() == 0 else t
        moved = t.movedim(dim, 0)
        try:
            return moved.view(moved.shape[0], -1)
        except RuntimeError:
            raise CTFastError(f"cannot view a parameter of shape {tuple(t.shape)} and strides {t.stride()} as rows "
                              f"along axis {dim}; circuit optimizers need row/column slices of 1-D/2-D or "
                              "contiguous parameters") from None

    def _plan(self, gi: int, group: dict) -> tuple[list, tuple | None]:
        """Validate one parameter group without touching its state (but for a lossless re-layout):
        ``(p, dim, index, params as rows [R, M], compact fp32 grads [k, M])`` per parameter to update, and what a
        ``_StepLayout`` of the group keeps of it (``(entries, skipped)``; None: no layout, an FSDP2 shard)."""
        plan, entries, skipped, sharded = [], [], [], False
        for p in group["params"]:
            sel = self._rows(p)
            compact = self._grad_rows.pop(p, None)
            if sel is None:
                continue
            if p.grad is None and compact is None:
                skipped.append(p)
                continue
            if compact is None and p.grad.is_sparse:
                raise CTFastError("sparse gradients are not supported by circuit optimizers")
            dim, index, count = sel
            if is_dtensor(p):  # FSDP2: this rank updates the rows of its shard
                sharded = True
                index, count, compact = self._local_selection(p, dim, index, count, compact)
                if count == 0:
                    continue
            key = self._pool_of.get(p)
            if key is not None and index is None and compact is None and not is_dtensor(p):
                # every element selected: take them along the axis the state already uses
                dim = self._pools[key].members[p].dim
                count = _n_rows(p, dim)
            if key is not None and self._pools[key].members[p].dim != dim:
                if self._pools[key].allocated:
                    self._relayout(p, gi, group, dim)
                else:  # registered on another axis, never selected: nothing to move
                    self._leave(p)
            p2 = self._as_rows(local(p), dim)
            block = None if compact is not None or index is None or is_dtensor(p) else self._single_range(p)
            g = self._grad_as_rows(p, dim, index, count, block, compact, p2)
            if g is None:
                raise CTFastError(f"compact gradient of shape {tuple(compact.shape)} does not match the "
                                  f"{count} selected rows of a parameter of shape {tuple(p.shape)}")
            plan.append((p, dim, index, p2, g))
            entries.append((p, dim, index, count, block, compact is not None))
        self._check_capacity(gi, group, plan)
        return plan, None if sharded else (tuple(entries), tuple(skipped))

    def _grad_as_rows(self, p, dim: int, index, count: int, block, compact, p2) -> torch.Tensor | None:
        """The fp32 gradient ``[count, M]`` of the selected rows: ``compact`` reshaped (None if its shape does not
        match ``p2 [R, M]``'s rows), else ``p.grad``'s rows — all (index None), one range of rows ``block`` (a head,
        a block of neurons: a view, not a gather kernel) or the rows of ``index``."""
        if compact is not None:
            g = compact.reshape(count, -1)
            return g.float().contiguous() if g.shape == (count, p2.shape[1]) else None
        g = self._as_rows(local(p.grad), dim)
        if index is not None:
            g = g.index_select(0, index) if block is None else g.narrow(0, block[0], block[1] - block[0])
        return g.float().contiguous()

    def _planned(self, layout: _StepLayout) -> list | None:
        """``_plan`` of a group from its layout: the step's gradients only (None: they do not come as they did when
        the layout was made — a gradient appeared, vanished or changed kind —, so the step plans afresh)."""
        grad_rows, plan = self._grad_rows, []
        for p in layout.skipped:
            if p.grad is not None or p in grad_rows:
                return None
        for p, dim, index, count, block, from_rows in layout.entries:
            compact = grad_rows.get(p)
            if (compact is not None) != from_rows or (compact is None and (p.grad is None or p.grad.is_sparse)):
                return None
            p2 = self._as_rows(p, dim)
            g = self._grad_as_rows(p, dim, index, count, block, compact, p2)
            if g is None:
                return None  # _plan names the mismatch
            plan.append((p, dim, index, p2, g))
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

    def _layout(self, gi: int, group: dict, plan: list[tuple], sources: tuple) -> _StepLayout:
        """The ``_StepLayout`` of one validated group: its parameters join their pools (allocated), each pool's
        wanted rows are gathered into one tensor (parameters of one pool list the same state tensors, at
        disjoint slots)."""
        self._join(gi, [self._entry(p, group, dim) for p, dim, *_ in plan if p not in self._pool_of])
        rows = [self._all_rows(_n_rows(p, dim), p2.device) if index is None else index
                for p, dim, index, p2, _ in plan]
        by_pool: dict[tuple, list[int]] = {}
        for i, (p, *_) in enumerate(plan):
            by_pool.setdefault(self._pool_of[p], []).append(i)
        pools = []
        for key, members in by_pool.items():
            pool = self._pools[key]
            pool.allocate()
            wanted = [pool.global_rows(plan[i][0], rows[i]) for i in members]
            pools.append((pool, tuple(members), wanted[0] if len(wanted) == 1 else torch.cat(wanted)))
        state = {k: [self._pools[self._pool_of[e[0]]].t[k] for e in plan] for k in ("step",) + self._moments_of(group)}
        state["steps"] = state.pop("step")
        return _StepLayout(*(sources or ((), ())), rows, tuple(pools), state)

    def _collect(self, layout: _StepLayout, plan: list[tuple], skip: torch.Tensor | None = None) -> dict:
        """The multi-tensor lists of one planned group: slots assigned (one ``assign`` per pool), state tensors
        listed per parameter."""
        slots = [None] * len(plan)
        for pool, members, wanted in layout.pools:
            assigned = pool.assign(wanted, self._clock_on(pool.device), skip)
            parts = [assigned] if len(members) == 1 else assigned.split([layout.rows[i].numel() for i in members])
            for i, s in zip(members, parts):
                slots[i] = s
        return {"params": [e[3] for e in plan], "grads": [e[4] for e in plan], "rows": layout.rows, "slots": slots,
                **layout.state}

    def _all_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """``arange(n)`` on ``device``, made once (read only: a whole parameter's rows, every step)."""
        cache, key = self.__dict__.setdefault("_aranges", {}), (n, str(device))
        if key not in cache:
            cache[key] = torch.arange(n, device=device)
        return cache[key]

    def _apply(self, lists: dict, group: dict, found_inf: torch.Tensor | None = None):
        raise NotImplementedError

    def _moments_of(self, group: dict) -> tuple[str, ...]:
        """The per-row state (besides the step count) ``group``'s hyper-parameters need: its pools hold these."""
        return ()

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
        try:
            with self.tuning.timer.span("optimizer"):
                self._selection, self._grad_rows = c.selection, dict(c.grads)
                self._update()
        except BaseException:  # refused before any write (e.g. a pool the circuit overflows): no step was made
            self.tuning.abort()
            raise
        self.tuning.finish_step()
        self.last_step = c
        return loss

    def _update(self):
        """Apply ``p.grad`` / the compact gradients to the current selection (every row when dense).

        A step planned afresh keeps each group's ``_StepLayout``; the next steps reuse them while the selection and
        the pools stay (a fixed circuit) and the gradients come as they did: then a step's host work is its
        gradients' views, one slot assignment per pool and the update's launch."""
        refused = None
        try:  # validate every group before any state or parameter is written
            self._check_moments()
            layouts = self._layouts
            plans = None if layouts is None else [(gi, group, self._planned(layouts[gi]))
                                                  for gi, group in enumerate(self.param_groups)]
            reused = plans is not None and all(plan is not None for *_, plan in plans)
            if not reused:
                drafts = [(gi, group, *self._plan(gi, group)) for gi, group in enumerate(self.param_groups)]
                plans = [(gi, group, plan) for gi, group, plan, _ in drafts]
        except CTFastError as e:
            refused = e
        finally:
            self._grad_rows = {}
        self._refuse_together(refused)
        flag = self._skip_flag(plans)
        if not reused:  # (after every check: a refused step allocates no pool)
            layouts = {gi: self._layout(gi, group, plan, sources) for gi, group, plan, sources in drafts}
            self._layouts = None if any(sources is None for *_, sources in drafts) else layouts
        if not reused or flag is not None:  # another selection, or a step a flag may skip: the time stamps owed
            for pool in self._pools.values():  # are the last step's, written before the clock moves
                pool.write_stamps()
        if self._clock_t is None:
            self._clock += 1
        else:
            self._clock_t.add_(1)
        for gi, group, plan in plans:
            if plan:
                self._apply(self._collect(layouts[gi], plan, None if flag is None else flag > 0), group, flag)
        self.step_skipped = flag

    def _refuse_together(self, refused: CTFastError | None):
        """Raise ``refused`` (this rank's reason to refuse the step, or None) — under FSDP2 on every rank if any
        refuses: each rank plans its own shard's rows, so a bounded pool may overflow on one rank only, and a step
        applied by the others would leave the model's shards inconsistent. (Replicated ranks plan the same rows and
        decide alike: no collective.)"""
        session = self.tuning
        if (session is None or not session.sharded or session.dp is None
                or all(g.get("state_capacity") is None for g in self.param_groups)):
            if refused is not None:
                raise refused
            return
        seen = session.dp.agree("optimizer step", {"refused": int(refused is not None)}, free=("refused",))
        if refused is not None:
            raise refused
        if any(seen["refused"]):
            bad = [r for r, v in enumerate(seen["refused"]) if v]
            raise CTFastError(f"rank(s) {bad} refused this step (their shard's rows overflow an optimizer-state pool: "
                              "see the error there), so it is refused on every rank and the model untouched; raise "
                              "state_capacity (or None)")

    def _check_moments(self) -> None:
        """Each group's pools hold the moments its hyper-parameters need now (``_moments_of``: a group's own amsgrad
        or SGD momentum, which a scheduler such as OneCycleLR may set after construction). A pool not allocated yet
        takes them; an allocated one without them refuses the step before anything is written. Checked when a
        group's need changes (a change drops the kept layouts)."""
        for gi, group in enumerate(self.param_groups):
            need = self._moments_of(group)
            if self._moments_seen.get(gi) == need:
                continue
            for key, pool in self._pools.items():
                if key[0] != gi or set(need) <= set(pool.moments):
                    continue
                if pool.allocated:
                    flags = {k: group.get(k) for k in ("amsgrad", "momentum") if k in group}
                    missing = sorted(set(need) - set(pool.moments))
                    raise CTFastError(f"param group {gi} now needs optimizer state {missing} ({flags}) that its rows "
                                      "were given none of at their first step; set these hyper-parameters before "
                                      "the first step (as a scheduler does at its construction)")
                pool.moments = need
            self._moments_seen[gi], self._layouts = need, None

    def _skip_flag(self, plans: list) -> torch.Tensor | None:
        """The device-side skip flag of this step (``[1]`` fp32, 1: skip), or None when nothing asks for one.

        With ``torch.amp.GradScaler`` (``_step_supports_amp_scaling``: it sets ``grad_scale`` and ``found_inf`` on
        the optimizer before ``step()``), the gradients are unscaled here (out of place) and the scaler's flag is
        kept; with ``skip_nonfinite`` or a scaler, any non-finite gradient the step applies sets it. Where it is
        set the step writes nothing — parameters, moments, step counts, slots — decided on the device (no host
        read), so a masked step stays capturable in a CUDA graph."""
        scale, given = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if scale is None and given is None and not self.skip_nonfinite:
            return None
        if self.tuning is not None:
            if scale is None and given is None:
                return None  # circuit-tuning refuses non-finite steps itself (NonFiniteError), before this
            raise CTFastError("torch.amp.GradScaler with a circuit-tuning optimizer (model=): the tuning session "
                              "refuses a non-finite step (NonFiniteError) instead of skipping it, so fp16 loss scaling "
                              "cannot adapt; train in bf16 (no scaler needed), or use the optimizer without model=")
        entries = [e for _, _, plan in plans for e in plan]
        if not entries:
            return None
        device = entries[0][4].device
        if any(e[4].device != device for e in entries):
            raise CTFastError("skipping non-finite steps on the device needs every parameter on one device; got "
                              f"{sorted({str(e[4].device) for e in entries})}")
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        if given is not None:
            flag.copy_((given.detach().reshape(-1)[:1] != 0).to(device, torch.float32))
        if scale is not None:  # unscale out of place: p.grad keeps the scaled values, as with torch's fused AdamW
            inv = scale.detach().double().reciprocal().float().to(device)
            unscaled = torch._foreach_mul([e[4] for e in entries], inv)
            it = iter(unscaled)
            for _, _, plan in plans:
                plan[:] = [(*e[:4], next(it)) for e in plan]
        ops.nonfinite_flag_([e[4] for _, _, plan in plans for e in plan], flag)
        return flag

    # ---- state_dict: the pools (their tensors, not copies), the current circuit and the clock ----
    def state_dict(self):
        sd = super().state_dict()
        ids = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        pools, state = [], {}
        for pool in self._pools.values():
            if pool.members:
                j = len(pools)
                pools.append(pool.state_dict(ids))
                # per parameter: its axis and pool; "step" (the pool's, shared) lets a torch optimizer load it,
                # so that install_torch_guard can refuse its step with a clear error
                extra = {"step": pool.t["step"]} if pool.allocated else {}
                state.update({ids[p]: {"dim": m.dim, "pool": j, **extra} for p, m in pool.members.items()})
        sd["state"], sd["pools"] = state, pools
        sd["clock"] = self.clock()
        if self._selection is not None:
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
        pools = state_dict.pop("pools", [])
        if tuning is not None and self.tuning is not None:
            self.tuning.load_state_dict(tuning)
        if tuning is not None and self.tuning is None:  # the tuning session's last circuit, not one set_circuit fixed:
            circuit = None  # without model= the optimizer is dense, as the saving one is once detached
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        _check_pool_members(pools, dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"]))))
        # members of pools pass as their axis only: torch would cast the shared tensors once per parameter
        super().load_state_dict({**state_dict, "state": {pid: {"dim": s["dim"]} if "pool" in s else s
                                                         for pid, s in state_dict["state"].items()}})
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for g in self.param_groups:  # saved before state_capacity existed
            g["state_capacity"] = check_state_capacity(g.get("state_capacity", self.defaults["state_capacity"]))
        self._pools, self._pool_of, self._layouts, self._moments_seen = {}, {}, None, {}
        self.state = defaultdict(dict)
        for saved in pools:
            members = [by_id[m[0]] for m in saved["members"]]
            device = local(members[0]).device
            gi = self._where[members[0]][0]
            pool = RowPool.from_state_dict(saved, by_id, self._moments_of(self.param_groups[gi]), device)
            key = self._pool_key(members[0], gi, saved["members"][0][1])
            self._pools[key] = pool
            for p, m in pool.members.items():
                self._pool_of[p] = key
                self.state[p]["dim"] = m.dim
        # per-parameter states of the earlier layouts (and torch's, converted): into the shared pools
        self._import_rows([(by_id[pid], s) for pid, s in state_dict["state"].items() if "slot" in s])
        self._clock, self._clock_t = clock, None
        if circuit is None:
            self._selection = None
        else:
            self._selection = {by_id[i]: ParamSelection(d, n, tuple(tuple(r) for r in rs))
                               for i, (d, n, rs) in circuit.items()}
        if self.tuning is not None:  # parameters trained now that the saved pools lack (unfrozen since the save)
            self.tuning._reserve_state_pools(self.tuning.model)  # join them in the order the saving run would

    # ---- footprint (for logs and benchmarks: these synchronise) ----
    def num_state_rows(self) -> int:
        """Rows currently holding state, over all pools (the block-sparse footprint in use)."""
        return sum(pool.held_rows() for pool in self._pools.values())

    def state_capacity_rows(self) -> int:
        """Slots of the allocated pools (fixed once every parameter has been selected or registered)."""
        return sum(pool.capacity for pool in self._pools.values() if pool.allocated)

    def state_bytes(self) -> int:
        """Bytes of all state tensors (moments, step counts, slot tables)."""
        return sum(pool.nbytes() for pool in self._pools.values())


class CircuitAdamW(_CircuitOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, optional amsgrad/maximize) with circuit masking.

    Moments are fp32 whatever the parameter dtype (bf16/fp16 parameters get fp32 math).

    ``state_capacity`` bounds the state: each parameter brings ``ceil(f * n_rows)`` slots for a float ``f`` in
    (0, 1], ``min(n, n_rows)`` for an int ``n``, one per row for None (the default; a param group may set its
    own), into the pool it shares with the parameters of its group whose rows have the same width — so a
    circuit may concentrate on a few parameters (a whole-MLP node selects every row of gate/up) as long as the
    pool's total fits (``ct_fast.state_pool``). A step whose selection exceeds a pool raises ``CTFastError``
    before anything is written; dense steps (no circuit) need full pools. When new rows need slots and none is
    free, the rows idle longest (not selected in this step) are evicted: an evicted row loses its moments and
    step count and restarts from zero — as a fresh torch optimizer on that row — when it is selected again.
    Rows outside the circuit keep their state frozen while they hold a slot.

    ``skip_nonfinite=True``: a step whose applied gradient holds an inf/NaN writes nothing (parameters, moments,
    step counts, slots), decided on the device without a host read; ``opt.step_skipped`` (``[1]`` fp32, 1:
    skipped) tells afterwards. ``torch.amp.GradScaler`` works the same way without the flag: ``scaler.step(opt)``
    hands over its scale and overflow flag, the step unscales on the device and skips overflows (fp16 training;
    not with ``model=``, whose session refuses non-finite steps with ``NonFiniteError``).

    ``model=``, ``top_n=`` and the options of ``CircuitTuner`` (``ablation``, ``positions``, ``selection``,
    ``refresh_every``, ``schedule``, ``token_budget``, ``memory_mode``...) circuit-tune inside your own loop
    (module docstring); without ``model=`` this is ``torch.optim.AdamW``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, state_capacity=None, *, skip_nonfinite: bool = False, model: nn.Module | None = None,
                 top_n=None, **tuning):
        state_capacity = check_state_capacity(state_capacity)
        self.skip_nonfinite = bool(skip_nonfinite)
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise CTFastError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                              f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, state_capacity=state_capacity),
                         model, top_n, tuning)

    def _moments_of(self, group: dict) -> tuple[str, ...]:  # (a group's own amsgrad, as torch)
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())

    def _apply(self, lists: dict, group: dict, found_inf: torch.Tensor | None = None):
        b1, b2 = group["betas"]
        ops.masked_adamw_(lists["params"], lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                          lists["max_exp_avg_sq"] if group["amsgrad"] else [], lists["steps"], lists["rows"],
                          lists["slots"],
                          group["lr"], b1, b2, group["eps"], group["weight_decay"], group["maximize"],
                          found_inf=found_inf)


class CircuitSGD(_CircuitOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, L2 weight decay, maximize) with circuit masking.

    See ``CircuitAdamW`` for ``state_capacity`` (bounded state, evictions) and ``model=`` / ``top_n=``
    (circuit-tuning in your own loop).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, state_capacity=None, *, skip_nonfinite: bool = False, model: nn.Module | None = None,
                 top_n=None, **tuning):
        state_capacity = check_state_capacity(state_capacity)
        self.skip_nonfinite = bool(skip_nonfinite)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise CTFastError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise CTFastError("nesterov momentum requires momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, state_capacity=state_capacity),
                         model, top_n, tuning)

    def _moments_of(self, group: dict) -> tuple[str, ...]:  # (a group's own momentum, e.g. cycled by OneCycleLR)
        return ("momentum_buffer",) if group.get("momentum") else ()

    def _apply(self, lists: dict, group: dict, found_inf: torch.Tensor | None = None):
        ops.masked_sgd_(lists["params"], lists["grads"], lists["momentum_buffer"] if group["momentum"] else [],
                        lists["steps"],
                        lists["rows"], lists["slots"], group["lr"], group["momentum"], group["dampening"],
                        group["weight_decay"], group["nesterov"], group["maximize"], found_inf=found_inf)
