"""The circuit-tuning loop: attribute, select, update only the circuit (DESIGN.md section 3).

Faithful mode (the default, ``refresh_every=1``): each step discovers the circuit on its own batch,
then the training loss's gradient on that batch updates exactly the circuit. With ``metric="loss"`` one
backward serves both: the taps score edges while the weight gradients are computed. With an outcome
metric the attribution backward computes activation gradients only, then the loss backward follows.

Example::

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4)
    tuner = ct_fast.CircuitTuner(model, opt, top_n=300)
    for batch in loader:
        result = tuner.step(batch)          # or tuner.step([micro_batch_1, micro_batch_2])
        print(result.loss, result.circuit.fraction, result.timings)
"""

from __future__ import annotations

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

PHASES = ("forward", "attribution", "selection", "backward", "optimizer")


@dataclass
class StepResult:
    """What one tuner step did. ``timings`` in seconds per phase (``PHASES``) and ``total``."""

    loss: float
    metric: float
    circuit: Circuit
    tuned_params: int
    top_n: int
    refreshed: bool
    timings: dict = field(default_factory=dict)


class _Clock:
    """Phase timer; synchronises the device so GPU time lands in the right phase."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, {k: 0.0 for k in PHASES}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, phase: str, minus: float = 0.0):
        self._sync()
        self.t[phase] += time.perf_counter() - self._t0 - minus


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
    attribution cost on long inputs.
    """

    def __init__(self, model: nn.Module, optimizer: _CircuitOptimizer, top_n, metric="loss", ablation="mean",
                 positions=None, selection="edges", refresh_every: int = 1, schedule: TopNSchedule | None = None,
                 pool: bool = False, threshold: float = 0.0, graph: ComputationGraph | None = None,
                 mlp_head_dim: int | None = None, token_budget: int | None = None):
        if not isinstance(optimizer, _CircuitOptimizer):
            raise CTFastError(f"CircuitTuner needs a ct_fast.CircuitAdamW or CircuitSGD, got {type(optimizer).__name__}")
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
        self.token_budget = token_budget
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
        clock = _Clock(self.device)
        t_start = time.perf_counter()
        refresh = self.circuit is None or self.step_count % self.refresh_every == 0
        top_n = self.schedule(self.step_count)
        tokens = [_label_tokens(b) for b in batches]
        w_loss = [n / max(1, sum(tokens)) for n in tokens]
        sizes = [b["input_ids"].shape[0] for b in batches]
        w_metric = w_loss if self.metric == "loss" else [s / sum(sizes) for s in sizes]
        loss = metric = 0.0
        with MaskedLinears(self.model, self.graph) as masked:
            if refresh:
                process = self.metric == "loss"  # one backward scores edges and keeps what dW needs
                masked.selection, masked.active = None, process
                run = AttributionRun(self.model, self.graph, self.ablation, self.positions, self.pool,
                                     self.token_budget, budget_seed=self.step_count)
                for b, c, wl, wm in zip(batches, corrupted, w_loss, w_metric):
                    clock.start()
                    out, value = run.forward(b, metric=self.metric, corrupted_batch=c)
                    clock.stop("forward")
                    _check_loss(out.loss)
                    loss, metric = loss + out.loss.item() * wl, metric + value.item() * wm
                    clock.start()
                    before = run.scoring_seconds
                    run.backward(value, [masked.anchor], scale=wm)
                    scoring = run.scoring_seconds - before
                    clock.stop("backward", minus=scoring)
                    clock.t["attribution"] += scoring
                clock.start()
                scores = run.scores()  # raises NonFiniteError on NaN/inf; nothing was applied yet
                self.circuit = scores.top_n(top_n, method=self.selection, threshold=self.threshold)
                clock.stop("selection")
                clock.start()
                selection = self._param_selection()
                if process:
                    masked.finish(selection)
                clock.stop("backward")
                if not process:  # the training pass of an outcome metric: loss gradient on the same batch
                    loss, _ = self._train_pass(masked, selection, batches, w_loss, w_metric, clock)
            else:
                selection = self._param_selection()
                loss, metric = self._train_pass(masked, selection, batches, w_loss, w_metric, clock)
            grads = masked.take_grad_rows()
        clock.start()
        self.optimizer.set_circuit(selection)
        self.optimizer.set_grad_rows(grads)
        self.optimizer.step()
        clock.stop("optimizer")
        self.step_count += 1
        timings = dict(clock.t, total=time.perf_counter() - t_start)
        return StepResult(loss=loss, metric=metric, circuit=self.circuit, tuned_params=self.circuit.num_params,
                          top_n=top_n, refreshed=refresh, timings=timings)

    def _param_selection(self) -> dict:
        """``{parameter: ParamSelection}`` of the current circuit, restricted to parameters this tuner trains
        (held by the optimizer, ``requires_grad``): a frozen parameter gets no gradient and no update."""
        trained = {id(p) for p in self.params}
        return {p: s for p, s in selections_by_param(self.model, self.circuit.param_selections(self.graph)).items()
                if id(p) in trained}

    def _train_pass(self, masked, selection, batches, w_loss, w_metric, clock) -> tuple[float, float]:
        """Forward and loss backward with the circuit known: compact dW of circuit rows only.
        Returns the (weighted) loss and metric of the batches."""
        masked.selection, masked.active = selection, True
        loss = metric = 0.0
        for b, wl, wm in zip(batches, w_loss, w_metric):
            clock.start()
            out = self.model(**model_inputs(b))
            clock.stop("forward")
            _check_loss(out.loss)
            loss += out.loss.item() * wl
            with torch.no_grad():
                metric += evaluate_metric(self.metric, out, b).item() * wm
            clock.start()
            torch.autograd.grad(out.loss * wl, [masked.anchor])
            clock.stop("backward")
        return loss, metric


def _to(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on the model's device (a no-op when they already are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_loss(loss):
    if loss is None or not torch.isfinite(loss.detach()):
        raise NonFiniteError(f"the training loss is {None if loss is None else loss.item()}: the step is "
                             "refused and the model untouched — check labels, inputs and learning rate")
