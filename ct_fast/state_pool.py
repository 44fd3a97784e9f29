"""Bounded optimizer state shared by the parameters whose rows have one width (the circuit optimizers' state).

A circuit selects a few rows (or columns) of many parameters, and which ones changes from step to step. A
``RowPool`` gives optimizer state (moments, a step count) to rows of one width only while they hold one of its
slots. All parameters of one param group whose sliced rows have the same width share one pool: in a Llama the
rows of q/k/v/gate/up and the columns of o/down are all ``d_model`` long, so their state is one pool, and a circuit
may put most of its rows into a few parameters (a whole-MLP node selects every row of gate/up) as long as the
group's total fits. Each member brings ``budget`` slots (``state_capacity`` of its own rows); the pool's
capacity is their sum. (A parameter that brings a slot for every row has a pool of its own: see
``_CircuitOptimizer._pool_key``.)

Layout (tensors on the parameters' device, allocated at the first step that selects a member):

- ``slot [R]`` long: the slot of each member row, -1 none. Member ``p``'s row ``r`` is entry ``base(p) + r``,
  its *global row*;
- ``owner [C]`` long: the global row holding each slot, -1 free;
- ``last_used [C]`` long: the optimizer step at which the slot's row was last selected;
- ``step [C + 1]`` fp32 and one ``[C + 1, width]`` fp32 tensor per moment; the last row is scratch (it absorbs the
  no-op writes of ``assign``; its content means nothing).

When new rows need slots and none is free, the rows idle longest lose theirs (ties: the lower global row), never
a row selected in the same step; an evicted row restarts from zero moments and step 0 when it returns. The
choice depends on rows and time stamps only, not on slot numbers, so a state_dict may renumber slots and a
resumed run still evicts exactly as the uninterrupted one.

A pool with a slot for every row (``capacity == rows``: a parameter under ``state_capacity=None``, a bias)
never evicts, and gives row ``r`` slot ``r`` (``own_slots``): its ``assign`` is three scatters, no search —
a per-parameter pool's search cost ~20 launches a parameter, which made a masked step host-bound. Selected again
with the same rows (a fixed circuit), it launches nothing: the rows' time stamps are owed (``_due``) and written
when anything reads ``t`` or the optimizer moves to another selection (``write_stamps``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .errors import CTFastError

_SELECTED = torch.iinfo(torch.long).max  # slot priority of a row selected in the current step: never evicted
_FREE = -1  # slot priority of a free slot: taken first
_INDEX = ("slot", "owner", "last_used")


def pool_size(capacity, n_rows: int) -> int:
    """Slots a parameter with ``n_rows`` rows on its sliced axis brings into its pool under
    ``state_capacity=capacity`` (None: all rows; a float: that fraction, rounded up; an int: that many)."""
    if capacity is None:
        return n_rows
    if isinstance(capacity, float):  # round first: 0.3 * 10 is 3.0000000000000004
        capacity = max(1, math.ceil(round(capacity * n_rows, 6)))
    return min(n_rows, capacity)


class Member(NamedTuple):
    """A parameter's place in its pool: its rows are global rows ``base .. base + n_rows - 1``."""
    base: int
    n_rows: int
    dim: int  # the parameter's sliced axis
    budget: int  # the slots it brought


class RowPool:
    """Slots of optimizer state for the rows of one width of several parameters (module docstring)."""

    def __init__(self, width: int, moments: tuple[str, ...], device: torch.device):
        self.width, self.moments, self.device = width, tuple(moments), torch.device(device)
        self.members: dict[torch.Tensor, Member] = {}  # live members (a parameter that left keeps its rows' span)
        self.rows = 0  # R: global rows, members that left included
        self.capacity = 0  # C: the members' budgets, members that left included
        self._t: dict[str, torch.Tensor] = {}  # the tensors (``t``); empty until allocated
        self._settled: torch.Tensor | None = None  # own slots: rows whose slot/owner entries stand (_assign_own)
        self._due: tuple | None = None  # own slots: (rows, clock) whose time stamps are owed (_assign_own)

    @property
    def t(self) -> dict[str, torch.Tensor]:
        """The pool's tensors (module docstring), their time stamps up to date."""
        if self._due is not None:
            self.write_stamps()
        return self._t

    @t.setter
    def t(self, tensors: dict[str, torch.Tensor]):
        self._t = tensors

    def write_stamps(self) -> None:
        """Write the time stamps owed (``_assign_own``): the rows last assigned take the clock's value now. The
        optimizer calls it before its clock moves to a step that selects other rows or may be skipped. Refused
        while a CUDA graph is being captured (the write would run at each replay, with that replay's clock)."""
        if self._due is None:
            return
        rows, clock = self._due
        if rows.is_cuda and torch.cuda.is_current_stream_capturing():
            raise CTFastError("a CUDA graph is capturing an optimizer step on another circuit than the last eager "
                              "step's (or one that may be skipped): run that step once eagerly (a warm-up) before "
                              "capturing it")
        self._due = None
        self._t["last_used"].index_copy_(0, rows, self._stamp(clock, rows))

    @staticmethod
    def _stamp(clock, rows: torch.Tensor) -> torch.Tensor:
        """``[k]`` copies of the step's time stamp ``clock`` (an int, or a 0-dim long tensor: read on the device)."""
        return clock.expand(rows.numel()) if isinstance(clock, torch.Tensor) else \
            torch.full((rows.numel(),), clock, dtype=torch.long, device=rows.device)

    @property
    def allocated(self) -> bool:
        return bool(self._t)

    @property
    def own_slots(self) -> bool:
        """A slot for every row: row ``r`` holds slot ``r`` whenever it holds one (never evicts)."""
        return self.capacity >= self.rows

    # ---- membership ----
    def join(self, entries) -> None:
        """Register ``(param, dim, n_rows, budget)`` entries (new parameters); an allocated pool grows once for
        all of them (zeros for the new slots, -1 for the new rows), keeping every held slot and its state."""
        entries = [e for e in entries if e[0] not in self.members]
        if not entries:
            return
        self._settled = None
        R, C = self.rows, self.capacity
        for p, dim, n_rows, budget in entries:
            self.members[p] = Member(self.rows, n_rows, dim, budget)
            self.rows += n_rows
            self.capacity += budget
        if not self.allocated:
            return
        old, (dr, dc) = self.t, (self.rows - R, self.capacity - C)
        self.t = {"slot": torch.cat([old["slot"], old["slot"].new_full((dr,), -1)]),
                  "owner": torch.cat([old["owner"], old["owner"].new_full((dc,), -1)]),
                  "last_used": torch.cat([old["last_used"], old["last_used"].new_zeros(dc)])}
        for k in ("step",) + self.moments:  # held slots, then the new ones and the scratch row
            self.t[k] = torch.cat([old[k][:C], old[k].new_zeros((dc + 1,) + old[k].shape[1:])])

    def leave(self, p: torch.Tensor) -> None:
        """``p`` gives up its slots (zeroed, so a never-evicting pool still hands out zero state); in an allocated
        pool its rows' span and budget stay, unused (an unallocated one just forgets it)."""
        m = self.members.pop(p)
        self._settled = None
        if not self.allocated:
            members, self.members, self.rows, self.capacity = self.members, {}, 0, 0
            self.join([(q, k.dim, k.n_rows, k.budget) for q, k in members.items()])
            return
        held = self.t["slot"][m.base:m.base + m.n_rows]
        freed = torch.where(held >= 0, held, self.capacity)  # capacity: the scratch row
        self.t["owner"].index_fill_(0, freed[freed < self.capacity], -1)
        for k in ("step",) + self.moments:
            self.t[k].index_fill_(0, freed, 0.0)
        held.fill_(-1)

    def allocate(self) -> None:
        """The empty tensors, sized for every member registered so far (no-op once allocated)."""
        if self.allocated:
            return
        self._settled = None
        R, C, dev = self.rows, self.capacity, self.device
        self.t = {"slot": torch.full((R,), -1, dtype=torch.long, device=dev),
                  "owner": torch.full((C,), -1, dtype=torch.long, device=dev),
                  "last_used": torch.zeros(C, dtype=torch.long, device=dev),
                  "step": torch.zeros(C + 1, dtype=torch.float32, device=dev)}
        for k in self.moments:
            self.t[k] = torch.zeros((C + 1, self.width), dtype=torch.float32, device=dev)

    def global_rows(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        base = self.members[p].base
        return rows + base if base else rows

    def slots_of(self, p: torch.Tensor) -> torch.Tensor:
        """``[n_rows]`` slots of ``p``'s rows (-1: none), a view of the slot table."""
        m = self.members[p]
        return self.t["slot"][m.base:m.base + m.n_rows]

    # ---- slots ----
    def assign(self, rows: torch.Tensor, clock, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Slots ``[k]`` of the selected global ``rows [k]`` (distinct, k <= capacity), device ops only (no sync).

        Rows that hold a slot keep it; the k-th row without one takes the k-th slot in order of priority: free
        slots first, then the one whose row is idle longest (ties: the lower global row), never one whose row is
        selected now. The previous owner loses the slot, which restarts at zero moments and step 0 (written to new
        slots only: kept rows write the scratch row, so no kept row is read). ``skip`` (a one-element bool tensor
        on the device): where true, nothing changes (the step is skipped; the slots returned are then unused).
        ``clock``: the step's time stamp, an int or a 0-dim long tensor on the device."""
        if self.own_slots:
            return self._assign_own(rows, clock, skip)
        slot, owner, last_used = self.t["slot"], self.t["owner"], self.t["last_used"]
        cap = owner.numel()
        if skip is not None:
            before = (slot.clone(), owner.clone(), last_used.clone())
        held = slot.index_select(0, rows)  # [k], -1: missing
        missing = held < 0
        selected = torch.zeros(cap + 1, dtype=torch.bool, device=rows.device)  # entry cap: a sink for missing rows
        selected.index_fill_(0, torch.where(missing, cap, held), True)
        idle = last_used * slot.numel() + owner  # (time stamp, global row) as one key
        priority = torch.where(selected[:cap], _SELECTED, torch.where(owner < 0, _FREE, idle))
        candidates = torch.argsort(priority, stable=True)
        rank = (missing.cumsum(0) - 1).clamp_(min=0)  # the k-th missing row takes candidate k
        slots = torch.where(missing, candidates.index_select(0, rank), held)
        evicted = owner.index_select(0, slots)  # previous owners (-1: free; the row itself if it kept its slot)
        # unlink evicted rows; entries that evict nobody point at a selected row, relinked just below
        slot.index_fill_(0, torch.where(missing & (evicted >= 0), evicted, rows), -1)
        slot.index_copy_(0, rows, slots)
        owner.index_copy_(0, slots, rows)
        if isinstance(clock, torch.Tensor):  # (index_fill_ would read a tensor value on the host)
            last_used.index_copy_(0, slots, clock.expand(slots.numel()).contiguous())
        else:
            last_used.index_fill_(0, slots, clock)
        if skip is not None:
            for now, old in zip((slot, owner, last_used), before):
                now.copy_(torch.where(skip, old, now))
        if cap < slot.numel():  # a pool with a slot per row never evicts: its new rows take zero slots
            fresh = torch.where(missing, slots, cap)  # cap: the scratch row
            for k in ("step",) + self.moments:
                if skip is None:
                    self.t[k].index_fill_(0, fresh, 0.0)
                else:  # evicted state stays if the step is skipped
                    x = self.t[k]
                    kept = x.index_select(0, fresh)
                    x.index_copy_(0, fresh, torch.where(skip.reshape((1,) * kept.dim()), kept, 0.0))
        return slots

    def _assign_own(self, rows: torch.Tensor, clock, skip: torch.Tensor | None) -> torch.Tensor:
        """``assign`` in a pool with a slot per row: each row's slot is itself. Its state was zero until first
        selected (allocated zero, zeroed by ``leave``), as a fresh slot's; nothing is evicted.

        The slot and owner entries of a row, once written, stay (until the pool changes: join, leave, load), so
        when ``rows`` is the very tensor the previous unskipped call wrote (a fixed circuit's cached index) nothing
        is launched: the rows' time stamps are owed (``_due``: the value of ``clock`` when next read — the
        optimizer's clock advances in place, so the stamp is the last step's as long as every step selects these
        rows; ``write_stamps`` settles them before a step that does not)."""
        if skip is None and rows is self._settled:
            self._due = (rows, clock)
            return rows
        self.write_stamps()
        slot, owner, last_used = self._t["slot"], self._t["owner"], self._t["last_used"]
        stamp = self._stamp(clock, rows)
        if skip is None:
            for t, value in ((slot, rows), (owner, rows), (last_used, stamp)):
                t.index_copy_(0, rows, value)
            self._settled = rows  # held: the tensor cannot be freed and its id reused
        else:  # a skipped step changes nothing
            for t, value in ((slot, rows), (owner, rows), (last_used, stamp)):
                t.index_copy_(0, rows, torch.where(skip, t.index_select(0, rows), value))
            self._settled = None  # whether this step wrote them is known on the device only
        return rows

    def renumber_own(self) -> None:
        """Give every held row of a slot-per-row pool its own slot (a state_dict of an earlier version may number
        them otherwise); the state moves with its row. Load time only (host-side check)."""
        self._settled = None
        slot = self.t["slot"]
        rows = (slot >= 0).nonzero().flatten()
        old = slot.index_select(0, rows)
        if torch.equal(old, rows):
            return
        for k in ("last_used", "step") + self.moments:
            moved = self.t[k].index_select(0, old)
            self.t[k].zero_()
            self.t[k].index_copy_(0, rows, moved)
        self.t["owner"].fill_(-1)
        self.t["owner"].index_copy_(0, rows, rows)
        slot.index_copy_(0, rows, rows)

    def place(self, p: torch.Tensor, rows: torch.Tensor, values: dict, last_used: torch.Tensor) -> None:
        """Load held rows of ``p`` (state_dict import): ``rows [m]`` get free slots (their own in a slot-per-row
        pool) and ``values`` (``step [m]``, each moment ``[m, width]``) and time stamps ``last_used [m]``.
        Host-side checks; load time only."""
        self._settled = None
        g = self.global_rows(p, rows)
        free = (self.t["owner"] < 0).nonzero().flatten()
        if free.numel() < rows.numel():
            raise ValueError(f"{rows.numel()} rows need state, {free.numel()} slots are free")
        if self.own_slots and bool((self.t["owner"].index_select(0, g) >= 0).any()):
            raise ValueError("rows loaded twice")
        slots = g if self.own_slots else free[:rows.numel()]
        self.t["slot"].index_copy_(0, g, slots)
        self.t["owner"].index_copy_(0, slots, g)
        self.t["last_used"].index_copy_(0, slots, last_used.to(self.device, torch.long))
        for k, v in values.items():
            self.t[k].index_copy_(0, slots, v.to(self.device, torch.float32))

    # ---- footprint ----
    def held_rows(self) -> int:
        """Rows holding a slot (synchronises)."""
        return int((self.t["owner"] >= 0).sum()) if self.allocated else 0

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    # ---- state_dict ----
    def state_dict(self, pid_of: dict) -> dict:
        """The pool as plain data: members by saved parameter id, the tensors themselves (no copies: as torch's, save
        or copy it before the next step — a fixed circuit's time stamps are written when the state is read)."""
        return {"width": self.width, "rows": self.rows, "capacity": self.capacity,
                "members": [[pid_of[p], m.dim, m.base, m.n_rows, m.budget] for p, m in self.members.items()],
                **self.t}

    @classmethod
    def from_state_dict(cls, saved: dict, params: dict, moments: tuple[str, ...], device) -> "RowPool":
        """Rebuild a saved pool; ``params`` maps saved ids to this optimizer's parameters."""
        pool = cls(int(saved["width"]), moments, device)
        pool.rows, pool.capacity = int(saved["rows"]), int(saved["capacity"])
        for pid, dim, base, n_rows, budget in saved["members"]:
            pool.members[params[pid]] = Member(int(base), int(n_rows), int(dim), int(budget))
        if "slot" in saved:
            pool.t = {k: saved[k].to(pool.device, torch.long if k in _INDEX else torch.float32, copy=True)
                      for k in _INDEX + ("step",) + pool.moments}
            if pool.own_slots:
                pool.renumber_own()
        return pool


def per_parameter_states(state_dict: dict) -> dict:
    """The per-parameter states of a circuit-optimizer ``state_dict`` in the per-parameter pool layout
    (``dim``, ``slot [n_rows]`` into ``step``/moment tensors; the shared tensors themselves, not copies): what
    ``state_interchange.to_torch_state`` reads. States of other layouts pass unchanged."""
    state = dict(state_dict["state"])
    for saved in state_dict.get("pools", []):
        if "slot" not in saved:  # never allocated: no member holds state
            for pid, *_ in saved["members"]:
                state.pop(pid, None)
            continue
        shared = {k: saved[k] for k in saved if k not in ("width", "rows", "capacity", "members") + _INDEX}
        for pid, dim, base, n_rows, _ in saved["members"]:
            state[pid] = {"dim": dim, "slot": saved["slot"][base:base + n_rows], **shared}
    return {**state_dict, "state": state}
