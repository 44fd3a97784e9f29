"""Circuit-tuning attached to a model: the forwards and backwards that one optimizer step sees.

``TuningSession(model, optimizer, top_n)`` hooks the model (nothing in it is rewritten) for as long as it is
attached (``CircuitAdamW(..., model=model, top_n=N)`` attaches one; ``CircuitTuner`` drives the same one):

- every grad-enabled forward of a *refresh* step is recorded for attribution (``AttributionRun.begin/end``:
  what the scorer reads is kept, the taps score edges during the backward, whoever calls ``backward``);
- the tunable linears run ``MaskedLinears``: their backward yields the compact gradients of the circuit's
  rows, or (``deferred``: the circuit is chosen only after this backward) keeps what those need — never a
  full-size ``.grad`` of a tunable weight;
- parameters no circuit contains (embeddings, norms, unembedding) are frozen (``requires_grad=False``) until
  ``detach()``: circuit-tuning never updates them, so no backward computes their gradient.

A step: forwards and backwards (any number: gradient accumulation), then ``conclude()`` selects the circuit
from their scores (refresh steps) and returns its rows' gradients, the optimizer applies them and calls
``finish_step()``. Forwards under ``torch.no_grad()`` pass straight through (evaluation, generation).

Memory modes of a refresh step (``memory_mode``): ``deferred`` (one backward; each linear keeps the smaller of
``(x, grad_out)`` and its dense fp32 dW until selection — or, when the driver runs one backward per step
(``CircuitTuner`` on one micro-batch, one process), only the rows that can still enter the circuit:
``ct_fast.pruning``), ``lagged`` (one backward computing the dW of the
previous circuit), ``two_pass`` (a scoring backward, then a second, masked one — only a driver that can run
the forward again does it: ``CircuitTuner``), ``auto`` (deferred unless what it keeps exceeds a quarter of the
free device memory). Between refreshes (``reused``) the known circuit's dW is computed directly.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attribution import AttributionRun, ABLATIONS, check_token_budget
from .distributed import DataParallel
from .circuit import SELECTION_METHODS, Circuit, TopNSchedule, is_whole_number, selections_by_param
from .errors import CTFastError, NonFiniteError
from .graph import ComputationGraph
from .masked_linear import MaskedLinears
from .profiling import PhaseTimer
from .pruning import CandidatePruner

MEMORY_MODES = ("auto", "deferred", "two_pass", "lagged")


@dataclass
class Conclusion:
    """What a step applies: ``circuit`` (whose rows are updated; with ``lagged`` the previous step's),
    ``selection`` ``{param: ParamSelection}``, ``grads`` ``{param: compact fp32 [k, ...]}``, ``norm`` (the
    2-norm of all of them, a 0-d tensor; with several ranks: averaged over them), and how the step ran."""

    circuit: Circuit
    selection: dict
    grads: dict
    norm: torch.Tensor
    refreshed: bool
    top_n: int
    memory_mode: str
    comm_bytes: int = 0  # several ranks: bytes this rank all-reduced in this step
    overlapped_bytes: int = 0  # ... of which launched while the backward ran (stream_grads)


def _batch_of(args: tuple, kwargs: dict) -> dict:
    """The batch a model call sees: ``input_ids``, ``attention_mask``, ``labels`` (as HF causal LMs take them)."""
    batch = {"input_ids": kwargs.get("input_ids", args[0] if args else None),
             "attention_mask": kwargs.get("attention_mask", args[1] if len(args) > 1 else None),
             "labels": kwargs.get("labels")}
    if not isinstance(batch["input_ids"], torch.Tensor):
        raise CTFastError("circuit-tuning records forwards called with input_ids (model(input_ids=..., "
                          "attention_mask=..., labels=...)); inputs_embeds alone is not supported")
    return {k: v for k, v in batch.items() if v is not None}


class ForwardRng:
    """The RNG state each micro-batch's model forward starts from (after attribution's own corrupted forward), kept
    by a scoring pass and restored by the training pass that runs the same forwards again (two_pass over several
    micro-batches, outcome metrics): dropout then draws the same masks in both passes — those of deferred mode's
    one forward — and the generators end where that forward leaves them. ``key``: the micro-batch the next
    forward runs (set by the driver)."""

    def __init__(self, device: torch.device):
        self.device, self.states, self.replaying, self.key = torch.device(device), {}, False, None
        self.end = None  # the generators where the scoring pass left them

    def _now(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _restore(self, state: tuple):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def at_forward(self):
        if self.key is None:
            return
        if not self.replaying:
            self.states[self.key] = self._now()
        elif self.key in self.states:
            self._restore(self.states[self.key])

    def scored(self):
        """The scoring pass is over: where it leaves the generators is where the step leaves them."""
        self.end = self._now()

    def replayed(self):
        """The training pass is over: the generators back where the scoring pass left them (it also ran forwards
        the training pass skips: micro-batches without label tokens)."""
        if self.end is not None:
            self._restore(self.end)


def _detach(masked: MaskedLinears, frozen: list, handles: list, ddp, ddp_sync, zeroed: list):
    """Undo ``TuningSession``'s changes to the model (also run when the session is garbage-collected)."""
    for h in handles:
        h.remove()
    for module in zeroed:
        module.__dict__.pop("zero_grad", None)  # the class's zero_grad again
    masked.__exit__(None, None, None)
    for p in frozen:
        p.requires_grad_(True)
    if ddp is not None:
        ddp.require_backward_grad_sync = ddp_sync


def _discarding_zero_grad(session_ref):
    """A module's ``zero_grad`` that also forgets the attached session's step so far (``TuningSession.zero_grad``)."""
    def zero_grad(module, set_to_none: bool = True):
        session = session_ref()
        if session is not None and module in (session.model, session.ddp):  # (not a deepcopy: inert, as its hooks)
            session.zero_grad()
        return type(module).zero_grad(module, set_to_none)

    return zero_grad


_ATTACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the session attached to it


class TuningSession:
    """Per-model circuit-tuning state shared by the drop-in optimizers and ``CircuitTuner``.

    Options as ``CircuitTuner``'s. ``rerun``: the driver can run a step's forwards again (``CircuitTuner``),
    so ``two_pass`` is available; a plain training loop cannot (``auto`` then falls back to ``lagged`` when
    ``deferred`` would not fit, with a warning). ``backwards_per_step``: how many backwards your loop runs
    before each ``step()`` (a further one is refused with an error); with 1 (no gradient accumulation) a
    deferred step computes only the weight gradients its circuit can need (``ct_fast.pruning``) — faster.
    ``CircuitTrainer`` sets it from ``gradient_accumulation_steps``.
    """

    def __init__(self, model: nn.Module, optimizer, top_n, metric="loss", ablation="mean", positions=None,
                 selection="edges", refresh_every: int = 1, schedule: TopNSchedule | None = None, pool: bool = False,
                 threshold: float = 0.0, graph: ComputationGraph | None = None, mlp_head_dim: int | None = None,
                 token_budget: int | None = None, memory_mode: str = "auto", profile: bool = False,
                 rerun: bool = False, overlap_comm: bool | None = None, backwards_per_step: int | None = None):
        if memory_mode not in MEMORY_MODES:
            raise CTFastError(f"memory_mode={memory_mode!r} is not one of {MEMORY_MODES}")
        if not is_whole_number(refresh_every) or refresh_every < 1:
            raise CTFastError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if ablation not in ABLATIONS:
            raise CTFastError(f"ablation={ablation!r} is not one of {ABLATIONS}")
        if not rerun:  # the loop's backward is all there is
            if metric != "loss":
                raise CTFastError(f"metric={metric!r}: in your own loop attribution scores what your backward "
                                  "computes (metric='loss'); outcome metrics need ct_fast.CircuitTuner")
            if ablation == "corrupted":
                raise CTFastError("ablation='corrupted' needs paired corrupted inputs per batch: use "
                                  "ct_fast.CircuitTuner.step(batch, corrupted_batch)")
            if memory_mode == "two_pass":
                raise CTFastError("memory_mode='two_pass' runs each forward twice, which your loop does not: use "
                                  "'deferred', 'lagged' or 'auto' here, or ct_fast.CircuitTuner for two_pass")
        if backwards_per_step is not None and (not is_whole_number(backwards_per_step) or backwards_per_step < 1):
            raise CTFastError(f"backwards_per_step must be None or an int >= 1, got {backwards_per_step!r}")
        if top_n is None and schedule is None:
            raise CTFastError("circuit-tuning needs top_n (edges per circuit) or a schedule")
        if selection not in SELECTION_METHODS:
            raise CTFastError(f"selection={selection!r} is not one of {SELECTION_METHODS}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            raise CTFastError(f"threshold must be a finite number (edges need a score above it), got {threshold!r}")
        check_token_budget(token_budget, pool)
        model, self.ddp, group, self.sharded = DataParallel.of(model)  # hooks go on the module a DDP wrapper holds
        self.model, self.optimizer = model, optimizer
        if graph is None:
            graph = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
        else:
            graph.check_model(model)
        self.graph = graph
        self.schedule = schedule or (top_n if isinstance(top_n, TopNSchedule) else TopNSchedule(top_n))
        for probe in (0, self.schedule.steps):
            n = self.schedule(probe)
            if n < 0 or n > self.graph.n_edges:
                raise CTFastError(f"top_n={n} is out of range: the graph has {self.graph.n_edges} edges")
        self.metric, self.ablation, self.positions, self.pool = metric, ablation, positions, pool
        self.selection, self.threshold, self.refresh_every = selection, threshold, refresh_every
        self.token_budget, self.memory_mode, self.profile, self.rerun = token_budget, memory_mode, profile, rerun
        self.backwards_per_step = backwards_per_step  # promised by the loop (1: deferred steps may prune)
        self.backwards_from_trainer = False  # backwards_per_step was set by a CircuitTrainer (the next may reset it)
        self.device = next(model.parameters()).device
        # stream_grads on: measured no gain on CPU (gloo shares the cores with the backward); on GPUs NCCL runs
        # on its own stream
        self.overlap_comm = self.device.type == "cuda" if overlap_comm is None else bool(overlap_comm)
        owned = set(self.graph.tunable_params)
        # trained: what some node owns, the optimizer holds and requires grad (trained_now); frozen: what no circuit
        # contains. Both listed once, in the model's order (a walk of the model per step costs ~1 ms)
        self._owned = [p for n, p in model.named_parameters() if n in owned]
        self._unowned = [p for n, p in model.named_parameters() if n not in owned]  # frozen while attached
        self.params = self._trained_now()
        if not self.params:
            raise CTFastError("the optimizer holds none of the model's circuit parameters (attention and MLP "
                              "projections); build it from model.parameters()")
        self._trained = {id(p) for p in self.params}
        self._param_selection: tuple = (None, None)  # (circuit, its param_selection)
        self._reserve_state_pools(model)
        self.anchor = torch.zeros((), device=self.device, dtype=next(model.parameters()).dtype, requires_grad=True)
        self.masked = MaskedLinears(model, self.graph, anchor=self.anchor)
        self._auto_modes: dict = {}  # batch shape -> the mode "auto" chose for it
        self.prune = True  # deferred steps of one backward: skip the dW of nodes that cannot be selected
        self._pruner: CandidatePruner | None = None  # built at the first step that prunes
        self.step_count = 0
        self.circuit: Circuit | None = None
        self.circuit_top_n = 0  # the top_n self.circuit was selected with
        self.corrupted = None  # the corrupted batch of the next recorded forward (CircuitTuner)
        self.given = None  # ... and the whole micro-batch it runs (CircuitTuner): task fields positions= may name
        self.forward_rng: ForwardRng | None = None  # a driver running the forwards twice (CircuitTuner)
        self._open: list = []  # recordings of the forwards in progress (None: a forward not recorded)
        self.dp = None
        self.nonfinite = False  # a driver saw a NaN/inf loss on this rank this step (the ranks refuse together)
        self._reset_step()
        self._detach = None
        if group is not None:
            self._join(group)

    def sync_trained(self):
        """The trained parameters again — what some node owns, the optimizer holds and requires grad now — at each
        refresh step and when the optimizer gains a param group: a parameter unfrozen or added after attaching is
        trained from the next circuit on, one frozen leaves it."""
        params = self._trained_now()
        trained = {id(p) for p in params}
        if trained == self._trained:
            return
        if not params:
            raise CTFastError("no circuit parameter is left to train: the optimizer holds none of the model's "
                              "attention and MLP projections that require grad")
        self.params, self._trained, self._param_selection = params, trained, (None, None)
        self._reserve_state_pools(self.model)

    def _trained_now(self) -> list:
        """The parameters some node owns that the optimizer holds and that require grad, in the model's order."""
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [p for p in self._owned if id(p) in held and p.requires_grad]

    def _reserve_state_pools(self, model: nn.Module):
        """Register every trained parameter in its optimizer-state pool now (so each pool is allocated once, at
        its final size), and refuse a node whose rows alone overflow a pool, so that no circuit containing it
        could step (a small fractional ``state_capacity`` with nodes that own whole parameters)."""
        g = self.graph
        trained = {n: p for n, p in model.named_parameters() if id(p) in self._trained}
        self.optimizer.reserve_state({trained[n]: dim for n, dim in g.param_dims.items() if n in trained})
        if self.sharded:  # a node's rows are split over the ranks' shards: each step checks its own
            return
        gi_of = {p: gi for gi, grp in enumerate(self.optimizer.param_groups) for p in grp["params"]}
        for node, slices in [*g.upstream_params.items(), *g.downstream_params.items()]:
            entries: dict[int, list] = {}
            for s in slices:
                p = trained.get(s.param)
                if p is not None:
                    entries.setdefault(gi_of[p], []).append((p, s.dim, s.stop - s.start))
            for gi, es in entries.items():
                for key, (count, slots, n_rows) in self.optimizer.pool_demand(gi, es).items():
                    if count > slots:
                        cap = self.optimizer.param_groups[gi]["state_capacity"]
                        whole_mlp = node.startswith("mlp.") and node.count(".") == 1
                        raise CTFastError(
                            f"state_capacity={cap!r} gives the parameters with rows of width {key[1]} a shared "
                            f"optimizer-state pool of {slots} rows, but node {node!r} alone selects {count} of "
                            "them, so no circuit containing it could step; "
                            + ("split MLP nodes into heads (mlp_head_dim=..., e.g. 64 or 128), or " if whole_mlp
                               else "") + f"pass state_capacity >= {math.ceil(1000 * count / n_rows) / 1000:g} "
                            "(a fraction) or None")

    def _join(self, group):
        """Several ranks: check that all run the same graph and options, and start from rank 0's weights."""
        self.dp = DataParallel(group, self.device)
        s = self.schedule
        self.dp.agree("circuit-tuning setup", {
            "graph": self.graph.describe(), "top_n": [s.start, s.end, s.steps, s.kind], "metric": str(self.metric),
            "refresh_every": self.refresh_every, "memory_mode": self.memory_mode, "ablation": self.ablation,
            "selection": self.selection, "threshold": self.threshold, "token_budget": self.token_budget,
            "overlap_comm": int(self.overlap_comm), "trained": [tuple(p.shape) for p in self.params]})
        if self.ddp is None and not self.sharded:
            self.dp.broadcast_parameters(self.model)

    # ---- attachment ----
    def attach(self):
        """Hook the model: freeze what no circuit contains, swap the linears' forward, record forwards. Undone by
        ``detach()`` or when the session is garbage-collected (the hooks hold no reference to it). A model is
        circuit-tuned by one session at a time."""
        if self.attached:
            return
        other = _ATTACHED.get(self.model)
        other = other() if other is not None else None
        if other is not None and other is not self and other.attached:
            raise CTFastError("this model is already circuit-tuned by another optimizer (built with model=, or "
                              "attached): call that optimizer's detach() first — two sessions would both record "
                              "and freeze the same model")
        _ATTACHED[self.model] = weakref.ref(self)
        frozen = [p for p in self._unowned if p.requires_grad]  # (listed once: a model walk per step costs ~1 ms)
        for p in frozen:
            p.requires_grad_(False)
        ddp_sync = None
        if self.ddp is not None:  # DDP's own reduction expects .grad: ct_fast reduces the compact gradients
            ddp_sync, self.ddp.require_backward_grad_sync = self.ddp.require_backward_grad_sync, False
        self.masked.__enter__()
        me = weakref.ref(self)
        model = self.model
        handles = [
            model.register_forward_pre_hook(lambda m, a, kw: me() and me()._before_forward(m, a, kw), with_kwargs=True),
            model.register_forward_hook(lambda m, a, kw, out: me() and me()._after_forward(m, out), with_kwargs=True,
                                        always_call=True)]
        # model.zero_grad() discards the step's backwards as the optimizer's zero_grad() does (what they accumulate
        # lives here, not in .grad; the HF Trainer calls only the model's), on a DDP wrapper too
        zeroed = [model] + ([self.ddp] if self.ddp is not None else [])
        for module in zeroed:
            module.zero_grad = types.MethodType(_discarding_zero_grad(me), module)
        self._detach = weakref.finalize(self, _detach, self.masked, frozen, handles, self.ddp, ddp_sync, zeroed)

    def detach(self):
        """Remove the hooks and masked linears and unfreeze what was frozen (idempotent)."""
        if self._detach is not None:
            self._detach()
        self._open.clear()

    @property
    def attached(self) -> bool:
        return self._detach is not None and self._detach.alive

    # ---- one step ----
    def _reset_step(self):
        self.mode: str | None = None  # decided by the step's first forward (or begin_step)
        self.refresh = False
        self.top_n = self.schedule(self.step_count)
        self.run: AttributionRun | None = None
        self.masked.pruner = None
        self.timer: PhaseTimer | None = None
        self._previous: tuple = (self.circuit, self.circuit_top_n)  # what lagged applies
        self._selected = False
        self._conclusion: Conclusion | None = None
        self._agreed = False
        self._stream = None  # a GradStream while a backward averages the compact gradients (stream_grads)
        self.nonfinite = False
        self.no_labels = False  # a driver saw no label token in this rank's batches (the ranks refuse together)
        if self.dp is not None:
            self.dp.comm_bytes = 0

    def begin_step(self, batches: list, timer: PhaseTimer | None = None, backwards: int | None = None):
        """Decide how this step runs (once: the first forward of a step calls it with its own batch).
        ``backwards``: how many backwards the driver runs in this step at most (default: the loop's promise,
        ``backwards_per_step``); a further one is refused, and with 1 deferred mode may prune."""
        if self.mode is not None:
            return
        if self.dp is None and not self.sharded and dist.is_available() and dist.is_initialized():
            _, _, group, _ = DataParallel.of(self.model)  # a process group started after the optimizer was built
            if group is not None:  # (e.g. by the HF Trainer's arguments): join it at its first step
                self._join(group)
        self.timer = timer or PhaseTimer(self.device, self.profile)
        backwards = self.backwards_per_step if backwards is None else backwards
        self.refresh = self.circuit is None or self.step_count % self.refresh_every == 0
        if self.refresh:
            self.sync_trained()
        self.top_n = self.schedule(self.step_count)
        if not self.refresh:
            mode = "reused"
        elif self.metric != "loss":
            mode = "outcome"
        else:
            mode = self._choose_mode(batches, backwards)
            if mode == "lagged" and self.circuit is None and self.rerun:  # no circuit to lag behind yet: the tuner
                mode = "two_pass"  # runs the forwards again on this batch's circuit
        m = self.masked
        if mode in ("reused", "lagged") and self.circuit is None:  # your loop's first lagged step: it scores this
            m.selection, m.active = {}, True  # batch and updates nothing (no earlier circuit), keeping no dW
        elif mode in ("reused", "lagged"):
            m.selection, m.active = self.param_selection(self.circuit), True
        else:  # deferred keeps what dW needs; two_pass and outcome score first and train afterwards
            m.selection, m.active = None, mode == "deferred"
        m.plain_outside(m.selection)  # known before the forwards: the linears outside it need no autograd function
        if self.refresh:
            self.run = AttributionRun(self.model, self.graph, self.ablation, self.positions, self.pool,
                                      self.token_budget, budget_seed=self.step_count, timer=self.timer)
        if self.run is not None:
            self.run.max_backwards = backwards
        if (mode == "deferred" and backwards == 1 and self.prune and self.selection == "edges" and self.dp is None
                and not self.sharded):
            if self._pruner is None:  # exact here: each score is final once made
                self._pruner = CandidatePruner(self.graph, m, self.threshold)
            self._pruner.start(self.run, self.top_n)
            m.pruner = self._pruner
            self.run.on_layer_scored = m.pruner.on_scored
        self.mode = mode

    def _choose_mode(self, batches: list, backwards: int | None) -> str:
        """``memory_mode``, or for ``auto`` what fits: ``batches`` the step's micro-batches, or (your own loop) its
        first, which ``backwards`` (the loop's promise, if any) of that size then follow. Several ranks decide
        together (their batches, padded each on its own, and their free memory differ): ``lagged`` on all if it is
        needed on one — a small all-reduce every step there, where a per-rank choice would split the ranks' modes."""
        if self.memory_mode != "auto" or self.device.type != "cuda":
            return "deferred" if self.memory_mode == "auto" else self.memory_mode
        shape = (tuple(tuple(b["input_ids"].shape) for b in batches), backwards)
        if self.dp is None and shape in self._auto_modes:
            return self._auto_modes[shape]
        tokens = sum(b["input_ids"].numel() for b in batches)
        if len(batches) == 1 and backwards:
            tokens *= backwards
        kept = self.masked.deferred_bytes(tokens, next(self.model.parameters()).element_size())
        free, _ = torch.cuda.mem_get_info(self.device)
        fallback = kept > free / 4
        if self.dp is not None:
            fallback = bool(self.dp.reduce_number(fallback, "memory_mode='auto'", op=dist.ReduceOp.MAX))
        mode = ("two_pass" if self.rerun else "lagged") if fallback else "deferred"
        if fallback and not self.rerun and self._auto_modes.get(shape) != mode:  # (once per batch shape)
            warnings.warn(f"memory_mode='auto': deferred would keep {kept / 2**30:.1f} GiB per step "
                          f"(free: {free / 2**30:.1f} GiB{'' if self.dp is None else ', or so on another rank'}), so "
                          "steps run 'lagged' (each updates the circuit selected on the previous batch); pass "
                          "memory_mode='deferred' to force the faithful mode", stacklevel=3)
        self._auto_modes[shape] = mode
        return mode

    def param_selection(self, circuit: Circuit) -> dict:
        """``{parameter: ParamSelection}`` of ``circuit``, restricted to the trained parameters; the same dict while
        the circuit is the same (steps between refreshes: the optimizer keeps its step layouts for it)."""
        made_for, selection = self._param_selection
        if circuit is not made_for:
            selection = {p: s for p, s in selections_by_param(self.model, circuit.param_selections(self.graph)).items()
                         if id(p) in self._trained}
            self._param_selection = (circuit, selection)
        return selection

    # ---- forward hooks ----
    def _before_forward(self, module, args, kwargs):
        if module is not self.model or not torch.is_grad_enabled():  # a deepcopy of the model, or no_grad
            self._open.append(None)
            return None
        batch = _batch_of(args, kwargs)
        given, self.given = self.given, None
        if given is not None:  # the model's inputs, and the task fields beside them (target_pos, a positions key)
            batch = {**given, **batch}
        self.begin_step([batch])
        self.masked.new_forward()
        recording = None
        if self.run is not None and not self.run.closed:
            corrupted, self.corrupted = self.corrupted, None
            self._open.append(None)  # the corrupted baseline's own forward (no_grad) passes through
            try:
                recording = self.run.begin(batch, corrupted, anchor=self.anchor)
            finally:
                self._open.pop()
        if self.forward_rng is not None:
            self.forward_rng.at_forward()
        self._open.append(recording)
        return None

    def _after_forward(self, module, output):
        recording = self._open.pop() if self._open else None
        if recording is None:
            return None
        if output is None:  # the forward raised: nothing to score
            recording.capture.__exit__(None, None, None)
            return None
        self.run.end(recording)  # (refuses a forward whose taps saw no autograd: reentrant checkpointing)
        return None

    def observe(self, batch: dict):
        """Count a micro-batch with no gradient in this refresh step's attribution (``AttributionRun.observe``)."""
        self.begin_step([batch])
        if self.run is not None:
            self.run.observe(batch)

    # ---- the end of a step ----
    @property
    def pending(self) -> bool:
        """Has a backward run since the last step (is there anything to step on)?"""
        return self.masked.touched or (self.run is not None and self.run.committed > 0)

    def _agree_step(self):
        """Several ranks: check that all are at the same point of the same step before its first collective, and
        refuse the step on every rank if one saw a non-finite loss."""
        if self.dp is None or self._agreed:
            return
        self._agreed = True
        seen = self.dp.agree("circuit-tuning step", {
            "step": self.step_count, "mode": str(self.mode), "top_n": self.top_n, "backward_ran": int(self.pending),
            "nonfinite": int(self.nonfinite), "no_labels": int(self.no_labels)},
            free=("nonfinite", "no_labels", "backward_ran", "mode"))
        if any(seen["no_labels"]):
            bad = [r for r, v in enumerate(seen["no_labels"]) if v]
            self.abort()
            raise CTFastError(f"no label token in this step's batches on rank(s) {bad} (labels all -100): there is no "
                              "training loss there, so the step is refused on every rank and the model untouched — "
                              "check the labels (-100 marks tokens without loss)")
        if any(seen["nonfinite"]):  # (a rank that saw a non-finite loss skipped its backward)
            bad = [r for r, v in enumerate(seen["nonfinite"]) if v]
            self.abort()
            raise NonFiniteError(f"the training loss is non-finite on rank(s) {bad}: the step is refused on every "
                                 "rank and the model untouched — check labels, inputs and learning rate")
        for key in ("backward_ran", "mode"):  # (a rank without a backward has no mode either)
            if len(set(seen[key])) > 1:
                self.abort()
                raise CTFastError(f"circuit-tuning step: the ranks disagree on {key} = {seen[key]} (rank order); "
                                  "every rank must run the same forwards and backwards and step in step")

    def stream_grads(self, one_backward: bool = True):
        """Several ranks with replicated weights (DDP or a bare module): average the circuit's compact gradients
        while the next backward runs, bucket by bucket as layers finish (``distributed.GradStream``). Call it right
        before the step's first training backward, once the circuit it trains is known (two_pass or outcome after
        ``select``; lagged; reused), with ``one_backward``: whether it is the step's only one on this rank. Every rank
        calls it at the same point; one small collective decides: the ranks stream only if it is the only backward
        on all of them (a rank with several micro-batches averages after its backwards, so all do).
        Off unless ``overlap_comm`` (default: on CUDA devices)."""
        m = self.masked
        if (self.dp is None or self.sharded or not self.overlap_comm or self._stream is not None or m.selection is None
                or not m.active):
            return
        sizes = {p: m.selection[p].count * (p.numel() // max(1, m.selection[p].size))
                 for p in reversed(self.params) if p in m.selection}  # the backward finishes the last layers first
        if not sizes:
            return
        seen = self.dp.agree("gradient streaming", {"step": self.step_count, "mode": str(self.mode),
                                                    "one_backward": int(one_backward)}, free=("one_backward",))
        if not all(seen["one_backward"]):
            return
        self._stream = stream = self.dp.stream(sizes)
        m.stream = lambda p: stream.ready(p, m.grad_rows)

    def select(self):
        """Choose this refresh step's circuit from the scores of its backwards; later backwards score nothing.
        Refuses (``NonFiniteError``, nothing changed, the step dropped) on non-finite scores."""
        self._agree_step()
        with self.timer.span("selection"):
            try:
                scores = self.run.scores(self.dp)
            except NonFiniteError:
                self.abort()
                raise
            self.run.close()
            self.circuit = scores.top_n(self.top_n, method=self.selection, threshold=self.threshold)
            self.circuit_top_n = self.top_n
        self._selected = True
        if self.mode in ("two_pass", "outcome"):  # the training backward computes this circuit's dW directly
            self.masked.selection, self.masked.active = self.param_selection(self.circuit), True

    def conclude(self) -> Conclusion | None:
        """Select the circuit (refresh steps) and return its rows' gradients; None if no backward ran since the
        last step. Refuses non-finite scores or gradients (``NonFiniteError``; the step is dropped, the model and
        optimizer untouched). Idempotent within a step."""
        if self._conclusion is not None:
            return self._conclusion
        stream, self._stream, self.masked.stream = self._stream, None, None
        if stream is not None:  # its collectives all complete before the step's next ones
            streamed = stream.finish(self.masked.grad_rows)
        self._agree_step()
        if self.run is not None and self.run.refused is not None:  # a caught refusal does not make a step
            refused = self.run.refused
            self.abort()
            raise CTFastError(refused)
        if self.mode is None or not self.pending:
            return None
        if self.refresh and not self._selected:
            self.select()
        # the circuit this step updates, and the top_n it was selected with (between refreshes: an earlier one)
        applied, top_n = self._previous if self.mode == "lagged" else (self.circuit, self.circuit_top_n)
        if applied is None:  # your loop's first lagged step: no earlier circuit, nothing updated
            applied = Circuit([], self.graph)
        selection = self.masked.selection if self.mode in ("reused", "lagged") else self.param_selection(applied)
        if self.mode == "deferred":
            with self.timer.span("backward"):
                self.masked.finish(selection)
        grads = self.masked.take_grad_rows()
        if stream is not None:
            grads = streamed
        elif self.dp is not None:  # the same circuit on every rank: its compact gradients have one layout
            # in parameter order: each rank fills ``grads`` in its own order (deferred mode keeps a linear's
            # dense dW or its (x, grad_out) by the rank's token count)
            grads = {p: grads[p] for p in self.params if p in grads}
            self.dp.reduce_grads(grads)
        norms = torch._foreach_norm([g for g in grads.values()]) if grads else []
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else self.anchor.new_zeros((), dtype=torch.float32)
        if stream is None:
            finite, complete = bool(torch.isfinite(norm)), True  # one host sync per step
        else:  # the same sync also reads how many gradients the ranks missed
            finite, complete = torch.stack([torch.isfinite(norm), stream.missing == 0]).tolist()
        if not finite:
            self.abort()
            raise NonFiniteError("the circuit's gradient is non-finite (a NaN/inf loss?): the step is refused and "
                                 "the model untouched — check labels, inputs and learning rate")
        if not complete:
            self.abort()
            raise CTFastError("a rank's backward produced no gradient for some circuit parameters (a different "
                              "model or inputs?): the step is refused on every rank, the model untouched")
        self._conclusion = Conclusion(applied, selection, grads, norm, self.refresh, top_n, self.mode,
                                      0 if self.dp is None else self.dp.comm_bytes,
                                      0 if stream is None else stream.early_bytes)
        self.masked.refuse = ("a backward after this step was concluded (by clip_grad_norm_, or another call that "
                              "reads the step's gradients) and before step(): its gradients would not count — run "
                              "every backward of the step first, or zero_grad() to start the step over")
        return self._conclusion

    def finish_step(self):
        """The optimizer applied the conclusion: the next forward starts a new step."""
        self.step_count += 1
        self.anchor.grad = None
        self.masked.clear()
        self._reset_step()

    def zero_grad(self):
        """Forget the gradients and scores of the backwards run so far in this step (forwards whose backward
        has not begun yet still count when it does). After the step's circuit was selected or the step concluded
        (``clip_grad_norm_``) the whole step is dropped: the next forward starts it over, scored afresh."""
        if self._selected or self._conclusion is not None:
            self.abort()
            return
        self.masked.clear()
        self.anchor.grad = None
        if self.run is not None and not self._selected:
            self.run.reset()
            if self.masked.pruner is not None:
                self.masked.pruner.reset()
        self._conclusion = None

    def abort(self):
        """Drop the step in progress (after a refused step): nothing of it is applied, and the circuit is the one
        before it (a circuit selected from a refused batch is no step's)."""
        self.circuit, self.circuit_top_n = self._previous
        self.masked.clear()
        self.anchor.grad = None
        self._reset_step()

    # ---- checkpoints ----
    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "circuit_top_n": self.circuit_top_n,
                "circuit": None if self.circuit is None else self.circuit.to_dict()}

    def load_state_dict(self, state: dict):
        self.step_count = int(state["step_count"])
        c = state.get("circuit")
        self.circuit = None if c is None else Circuit.from_dict(c, self.graph)
        self.circuit_top_n = int(state.get("circuit_top_n", 0 if c is None else len(self.circuit)))
        self._reset_step()
