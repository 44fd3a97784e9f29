"""The circuit-tuning loop: attribute, select, update only the circuit (docs/design.md section 3).

Faithful mode (the default, ``refresh_every=1``): each step discovers the circuit on its own batch,
then the training loss's gradient on that batch updates exactly the circuit. With ``metric="loss"`` the
circuit is known only after the backward that scores it, while the weight gradient needs each layer's
``(x, grad_out)`` during that backward; ``memory_mode`` chooses how to bridge the two:

- ``"deferred"``: one backward; each linear keeps the smaller of ``(x, grad_out)`` and its dense fp32
  weight gradient until selection, then the circuit's rows are taken from it (fastest: one backward);
- ``"two_pass"``: an attribution backward that computes no weight gradient (the graph retained), then a
  second backward with the masked weight gradient of the circuit only (least memory; works with
  activation checkpointing; with several micro-batches the second pass re-runs each forward instead);
- ``"lagged"``: one backward that both scores this batch's edges and computes the masked weight gradient
  of the circuit selected on the *previous* step — standard memory and time, but the circuit lags one
  batch (the first step, with no circuit yet, runs ``two_pass``);
- ``"auto"`` (default): ``deferred`` unless its kept tensors would take more than a quarter of the free
  device memory (estimated per batch shape), then ``two_pass``.

``two_pass`` and ``deferred`` give equal circuits and updates. With an outcome metric (``logit_diff``...)
the attribution backward computes activation gradients only, then the loss backward follows.

Example::

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4)
    tuner = ct_fast.CircuitTuner(model, opt, top_n=300)
    for batch in loader:
        result = tuner.step(batch)          # or tuner.step([micro_batch_1, micro_batch_2])
        print(result.loss, result.circuit.fraction, result.timings)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .attribution import AttributionRun, evaluate_metric, model_inputs
from .circuit import Circuit, TopNSchedule, selections_by_param
from .masked_linear import MaskedLinears
from .errors import CTFastError, NonFiniteError
from .graph import ComputationGraph
from .optim import _CircuitOptimizer
from .profiling import PhaseTimer

PHASES = ("forward", "attribution", "selection", "backward", "optimizer")
MEMORY_MODES = ("auto", "deferred", "two_pass", "lagged")


@dataclass
class StepResult:
    """What one tuner step did. ``circuit`` is the circuit whose parameters this step updated (with
    ``memory_mode="lagged"`` the one selected on the previous step; ``CircuitTuner.circuit`` holds the
    newest); ``memory_mode`` the mode the step ran in (``"reused"`` between refreshes, ``"outcome"`` for an
    outcome metric). ``timings`` in seconds per phase (``PHASES``) and
    ``total`` (on a GPU, phases only with ``profile=True``)."""

    loss: float
    metric: float
    circuit: Circuit
    tuned_params: int
    top_n: int
    refreshed: bool
    memory_mode: str = "reused"
    timings: dict = field(default_factory=dict)


def _label_tokens(batch: dict) -> int:
    labels = batch.get("labels")
    if labels is None:
        raise CTFastError("the training loss needs 'labels' in every batch (e.g. input_ids with -100 on padding)")
    return int((labels[:, 1:] != -100).sum())


class CircuitTuner:
    """Circuit-tuning with any ``CircuitAdamW``/``CircuitSGD``; see the module docstring.

    ``top_n``: edges per circuit (int) or a ``TopNSchedule`` (``schedule=`` is an alias); ``metric``:
    what attribution maximises (``"loss"``, ``"logit_diff"``, ``"logprob_diff"`` or a callable);
    ``ablation``, ``positions``, ``pool``: as in ``attribute``; ``selection``: ``"edges"`` or ``"nodes"``;
    ``refresh_every=k``: re-discover the circuit every k steps and reuse it in between;
    ``token_budget``: score at most this many positions per batch (a rescaled random subset) to bound the
    attribution cost on long inputs; ``memory_mode``: see the module docstring; ``profile``: time phases
    on a GPU too (CUDA events, one synchronisation per step; on CPU phases are always timed, for free).
    """

    def __init__(self, model: nn.Module, optimizer: _CircuitOptimizer, top_n, metric="loss", ablation="mean",
                 positions=None, selection="edges", refresh_every: int = 1, schedule: TopNSchedule | None = None,
                 pool: bool = False, threshold: float = 0.0, graph: ComputationGraph | None = None,
                 mlp_head_dim: int | None = None, token_budget: int | None = None, memory_mode: str = "auto",
                 profile: bool = False):
        if not isinstance(optimizer, _CircuitOptimizer):
            raise CTFastError(f"CircuitTuner needs a ct_fast.CircuitAdamW or CircuitSGD, got {type(optimizer).__name__}")
        if memory_mode not in MEMORY_MODES:
            raise CTFastError(f"memory_mode={memory_mode!r} is not one of {MEMORY_MODES}")
        if not isinstance(refresh_every, int) or refresh_every < 1:
            raise CTFastError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        self.model, self.optimizer = model, optimizer
        self.graph = graph or ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
        self.schedule = schedule or (top_n if isinstance(top_n, TopNSchedule) else TopNSchedule(int(top_n)))
        for probe in (0, self.schedule.steps):
            n = self.schedule(probe)
            if n < 0 or n > self.graph.n_edges:
                raise CTFastError(f"top_n={n} is out of range: the graph has {self.graph.n_edges} edges")
        self.metric, self.ablation, self.positions, self.pool = metric, ablation, positions, pool
        self.selection, self.threshold, self.refresh_every = selection, threshold, refresh_every
        self.token_budget, self.memory_mode, self.profile = token_budget, memory_mode, profile
        self._auto_modes: dict = {}  # batch shape -> the mode "auto" chose for it
        self.step_count = 0
        self.circuit: Circuit | None = None
        # gradients only for parameters some node owns: embeddings, norms and the unembedding never get dW
        owned = {id(p) for n, p in model.named_parameters() if n in self.graph.tunable_params}
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) in owned]
        if not self.params:
            raise CTFastError("the optimizer holds none of the model's circuit parameters (attention and MLP "
                              "projections); build it from model.parameters()")
        self.device = next(model.parameters()).device

    def step(self, batch, corrupted_batch=None) -> StepResult:
        """One circuit-tuning step on ``batch`` (a dict, or a list of micro-batch dicts whose gradients and
        scores are accumulated). Refuses (raises, model untouched) on NaN/inf loss, metric or scores."""
        batches = [_to(b, self.device) for b in (batch if isinstance(batch, (list, tuple)) else [batch])]
        corrupted = corrupted_batch if isinstance(corrupted_batch, (list, tuple)) else [corrupted_batch] * len(batches)
        corrupted = [None if c is None else _to(c, self.device) for c in corrupted]
        if len(corrupted) != len(batches):
            raise CTFastError(f"{len(batches)} micro-batches but {len(corrupted)} corrupted micro-batches")
        timer = PhaseTimer(self.device, self.profile)
        t_start = time.perf_counter()
        refresh = self.circuit is None or self.step_count % self.refresh_every == 0
        top_n = self.schedule(self.step_count)
        tokens = [_label_tokens(b) for b in batches]
        if sum(tokens) == 0:
            raise CTFastError("no micro-batch has a label token (labels are all -100): there is no training loss "
                              "to step on — check the labels (-100 marks tokens without loss)")
        w_loss = [n / sum(tokens) for n in tokens]  # a micro-batch without label tokens weighs 0
        sizes = [b["input_ids"].shape[0] for b in batches]
        w_metric = w_loss if self.metric == "loss" else [s / sum(sizes) for s in sizes]
        previous = self.circuit
        mode = "reused"  # a step between refreshes: one forward and a masked-dW backward of the known circuit
        with MaskedLinears(self.model, self.graph) as masked:
            if refresh:
                mode, loss, metric, retained = self._refresh(masked, batches, corrupted, top_n, w_loss, w_metric,
                                                             timer)
                applied = previous if mode == "lagged" else self.circuit
                selection = masked.selection if mode == "lagged" else self._param_selection(applied)
                if mode == "deferred":
                    with timer.span("backward"):
                        masked.finish(selection)
                elif mode in ("two_pass", "outcome"):  # the training pass: masked dW of the circuit only
                    masked.selection, masked.active = selection, True
                    if retained is not None:  # one micro-batch: backward over the graph kept by attribution
                        with timer.span("backward"):
                            torch.autograd.grad(retained, [masked.anchor])
                    else:
                        loss, _ = self._train_pass(masked, batches, w_loss, w_metric, timer)
            else:
                applied = self.circuit
                selection = self._param_selection(applied)
                masked.selection, masked.active = selection, True
                loss, metric = self._train_pass(masked, batches, w_loss, w_metric, timer)
            grads = masked.take_grad_rows()
        with timer.span("optimizer"):
            self.optimizer.set_circuit(selection)
            self.optimizer.set_grad_rows(grads)
            self.optimizer.step()
        self.step_count += 1
        return StepResult(loss=loss, metric=metric, circuit=applied, tuned_params=applied.num_params, top_n=top_n,
                          refreshed=refresh, memory_mode=mode, timings=self._timings(timer, t_start))

    def _refresh(self, masked, batches, corrupted, top_n, w_loss, w_metric, timer):
        """Forward and attribution backward on every micro-batch, then the new circuit in ``self.circuit``.

        Returns the mode the step runs in, the (weighted) loss and metric, and (two_pass on one batch) the
        weighted loss whose graph is kept for the training backward. What the attribution backward also
        does depends on the mode: deferred keeps what dW needs, lagged computes dW of the previous
        circuit, two_pass (and an outcome metric) computes no weight gradient."""
        mode = self._mode(masked, batches) if self.metric == "loss" else "outcome"
        if mode == "lagged" and self.circuit is None:
            mode = "two_pass"  # no circuit to lag behind yet
        if mode == "lagged":
            masked.selection, masked.active = self._param_selection(self.circuit), True
        else:
            masked.selection, masked.active = None, mode == "deferred"
        retain = mode == "two_pass" and len(batches) == 1
        run = AttributionRun(self.model, self.graph, self.ablation, self.positions, self.pool, self.token_budget,
                             budget_seed=self.step_count, timer=timer)
        loss = metric = 0.0
        retained = None
        for b, c, wl, wm in zip(batches, corrupted, w_loss, w_metric):
            if wm == 0:  # no label token: no loss, no gradient; its examples and tokens still count
                with timer.span("forward"):
                    run.observe(b)
                continue
            with timer.span("forward"):
                out, value = run.forward(b, metric=self.metric, corrupted_batch=c)
            step_loss, step_metric = _finite_values(out.loss, value)
            del out  # the logits ([B, T, vocab]) are not needed by the backward: free them before it
            loss, metric = loss + step_loss * wl, metric + step_metric * wm
            with timer.span("backward"):
                run.backward(value, [masked.anchor], scale=wm, retain_graph=retain)
            retained = value * wm if retain else None
        with timer.span("selection"):
            scores = run.scores()  # raises NonFiniteError on NaN/inf; nothing was applied yet
            self.circuit = scores.top_n(top_n, method=self.selection, threshold=self.threshold)
        return mode, loss, metric, retained

    def _mode(self, masked, batches) -> str:
        """The memory mode of this step (``auto``: from the bytes deferred would keep, per batch shape)."""
        if self.memory_mode != "auto":
            return self.memory_mode
        shape = tuple(tuple(b["input_ids"].shape) for b in batches)
        if shape not in self._auto_modes:
            mode = "deferred"
            if self.device.type == "cuda":
                tokens = sum(b["input_ids"].numel() for b in batches)
                kept = masked.deferred_bytes(tokens, next(self.model.parameters()).element_size())
                free, _ = torch.cuda.mem_get_info(self.device)
                mode = "deferred" if kept <= free / 4 else "two_pass"
            self._auto_modes[shape] = mode
        return self._auto_modes[shape]

    @staticmethod
    def _timings(timer: PhaseTimer, t_start: float) -> dict:
        seconds = timer.seconds()
        out = {}
        if seconds or timer.active:
            out = {k: seconds.get(k, 0.0) for k in PHASES}
            out["backward"] = max(0.0, out["backward"] - out["attribution"])  # scoring runs inside the backward
        out["total"] = time.perf_counter() - t_start
        return out

    def _param_selection(self, circuit: Circuit) -> dict:
        """``{parameter: ParamSelection}`` of ``circuit``, restricted to parameters this tuner trains
        (held by the optimizer, ``requires_grad``): a frozen parameter gets no gradient and no update."""
        trained = {id(p) for p in self.params}
        return {p: s for p, s in selections_by_param(self.model, circuit.param_selections(self.graph)).items()
                if id(p) in trained}

    def _train_pass(self, masked, batches, w_loss, w_metric, timer) -> tuple[float, float]:
        """Forward and loss backward with the circuit known: compact dW of circuit rows only.
        Returns the (weighted) loss and metric of the batches."""
        loss = metric = 0.0
        for b, wl, wm in zip(batches, w_loss, w_metric):
            if wl == 0:  # no label token: nothing to train on (an outcome metric is still reported)
                if wm:
                    with timer.span("forward"), torch.no_grad():
                        metric += evaluate_metric(self.metric, self.model(**model_inputs(b)), b).item() * wm
                continue
            with timer.span("forward"):
                out = self.model(**model_inputs(b))
                with torch.no_grad():
                    value = evaluate_metric(self.metric, out, b)
            train_loss = out.loss
            del out  # free the logits before the backward
            step_loss, step_metric = _finite_values(train_loss, value)
            loss, metric = loss + step_loss * wl, metric + step_metric * wm
            with timer.span("backward"):
                torch.autograd.grad(train_loss * wl, [masked.anchor])
        return loss, metric


def _to(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on the model's device (a no-op when they already are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _finite_values(loss, metric) -> tuple[float, float]:
    """The loss and metric as floats (one host sync for both); raises if the loss is missing or non-finite."""
    if loss is None:
        raise CTFastError("the training loss needs 'labels' in every batch (e.g. input_ids with -100 on padding)")
    values = torch.stack([loss.detach().float().reshape(()), metric.detach().float().reshape(())]).tolist()
    if not math.isfinite(values[0]):
        raise NonFiniteError(f"the training loss is {values[0]}: the step is refused and the model untouched — "
                             "check labels, inputs and learning rate")
    return values[0], values[1]
