"""The circuit-tuning loop: attribute, select, update only the circuit (docs/design.md section 3).

Faithful mode (the default, ``refresh_every=1``): each step discovers the circuit on its own batch,
then the training loss's gradient on that batch updates exactly the circuit. With ``metric="loss"`` the
circuit is known only after the backward that scores it, while the weight gradient needs each layer's
``(x, grad_out)`` during that backward; ``memory_mode`` chooses how to bridge the two:

- ``"deferred"``: one backward; each linear keeps the smaller of ``(x, grad_out)`` and its dense fp32
  weight gradient until selection, then the circuit's rows are taken from it (fastest: one backward). A
  step on one micro-batch (one process) computes only the rows that can still be selected, decided layer
  by layer during the backward (``ct_fast.pruning``);
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

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .attribution import check_target_pos, evaluate_metric, model_inputs
from .circuit import Circuit, TopNSchedule
from .errors import CTFastError, NonFiniteError
from .fused_loss import causal_lm_loss
from .graph import ComputationGraph
from .optim import _CircuitOptimizer
from .profiling import PhaseTimer
from .session import MEMORY_MODES, ForwardRng, TuningSession  # noqa: F401  (MEMORY_MODES: the CLI lists them)

PHASES = ("forward", "attribution", "selection", "backward", "optimizer")


@dataclass
class StepResult:
    """What one tuner step did. ``circuit`` is the circuit whose parameters this step updated (with
    ``memory_mode="lagged"`` the one selected on the previous step; ``CircuitTuner.circuit`` holds the
    newest); ``memory_mode`` the mode the step ran in (``"reused"`` between refreshes, ``"outcome"`` for an
    outcome metric). ``timings`` in seconds per phase (``PHASES``) and
    ``total`` (on a GPU, phases only with ``profile=True``, timed on the device); ``host_timings`` the host's
    seconds in the same phases (the same as ``timings`` on a CPU): a GPU phase whose device time is about its
    host time was bound by its host (its ``total``: up to the step's return, not waiting for the device)."""

    loss: float
    metric: float
    circuit: Circuit
    tuned_params: int
    top_n: int
    refreshed: bool
    memory_mode: str = "reused"
    timings: dict = field(default_factory=dict)
    host_timings: dict = field(default_factory=dict)


def _label_tokens(batch: dict) -> int:
    labels = batch.get("labels")
    if labels is None:
        raise CTFastError(_NO_LABELS)
    return int((labels[:, 1:] != -100).sum())


class CircuitTuner:
    """Circuit-tuning with any ``CircuitAdamW``/``CircuitSGD``; see the module docstring.

    ``top_n``: edges per circuit (int) or a ``TopNSchedule`` (``schedule=`` is an alias); ``metric``:
    what attribution maximises (``"loss"``, ``"logit_diff"``, ``"logprob_diff"`` or a callable);
    ``ablation``, ``positions``, ``pool``: as in ``attribute``; ``selection``: ``"edges"`` or ``"nodes"``;
    ``refresh_every=k``: re-discover the circuit every k steps and reuse it in between;
    ``token_budget``: score at most this many positions per micro-batch (each forward; a rescaled random
    subset) to bound the attribution cost on long inputs; ``memory_mode``: see the module docstring;
    ``profile``: time phases on a GPU too (CUDA events, one synchronisation per step; on CPU phases are always
    timed, for free);
    ``overlap_comm``: with several ranks, all-reduce the circuit's compact gradients while the training backward
    runs when the circuit is already known (default: on CUDA devices; on the CPU it measured no gain);
    ``fused_loss``: with ``metric="loss"``, compute the loss without the ``[B, T, vocab]`` logits
    (``ct_fast.fused_loss``: the unembedding and cross-entropy in token chunks; equal to the model's loss up to
    rounding).

    It is a loop over the machinery of the drop-in optimizers (``ct_fast.session``): it attaches the
    optimizer to the model (as ``CircuitAdamW(..., model=model, top_n=N)`` does), runs the forwards and
    backwards of a step, and calls ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, optimizer: _CircuitOptimizer, top_n, metric="loss", ablation="mean",
                 positions=None, selection="edges", refresh_every: int = 1, schedule: TopNSchedule | None = None,
                 pool: bool = False, threshold: float = 0.0, graph: ComputationGraph | None = None,
                 mlp_head_dim: int | None = None, token_budget: int | None = None, memory_mode: str = "auto",
                 profile: bool = False, overlap_comm: bool | None = None, fused_loss: bool = False):
        if not isinstance(optimizer, _CircuitOptimizer):
            raise CTFastError(f"CircuitTuner needs a ct_fast.CircuitAdamW or CircuitSGD, got {type(optimizer).__name__}")
        if optimizer.tuning is not None:
            raise CTFastError("this optimizer already circuit-tunes a model (built with model=): call its step() in "
                              "your loop, or build one without model= for CircuitTuner")
        self.model, self.optimizer = model, optimizer
        self.session = TuningSession(
            model, optimizer, schedule or top_n, metric=metric, ablation=ablation, positions=positions,
            selection=selection, refresh_every=refresh_every, pool=pool, threshold=threshold, graph=graph,
            mlp_head_dim=mlp_head_dim, token_budget=token_budget, memory_mode=memory_mode, profile=profile,
            rerun=True, overlap_comm=overlap_comm)
        self.graph, self.schedule, self.params = self.session.graph, self.session.schedule, self.session.params
        self.metric, self.device, self.memory_mode = metric, self.session.device, memory_mode
        self.refresh_every, self.token_budget, self.ablation = refresh_every, token_budget, ablation
        if fused_loss and metric != "loss":
            raise CTFastError(f"fused_loss computes the training loss without logits; metric={metric!r} needs them: "
                              "use metric='loss' or fused_loss=False")
        self.fused_loss = bool(fused_loss)

    @property
    def circuit(self) -> Circuit | None:
        """The newest circuit (with ``memory_mode="lagged"``, the one the next step updates)."""
        return self.session.circuit

    @circuit.setter
    def circuit(self, circuit: Circuit | None):
        self.session.circuit = circuit
        self.session.circuit_top_n = 0 if circuit is None else len(circuit)
        self.session._reset_step()

    @property
    def step_count(self) -> int:
        return self.session.step_count

    @step_count.setter
    def step_count(self, n: int):
        self.session.step_count = n
        self.session._reset_step()

    def _tokens_per_rank(self, mine: int) -> float:
        """The global batch's label tokens over the ranks (``mine`` with one process): the loss of a rank is its
        tokens' sum over this, so that the ranks' average is the global batch's per-token mean — one process on
        the concatenated batch, also when the ranks hold different numbers of label tokens. One small all-reduce."""
        dp = self.session.dp
        if dp is None:
            return mine
        return dp.reduce_number(mine, "label tokens") / dp.world

    def state_dict(self) -> dict:
        """What a resume needs besides the model's and the optimizer's state dicts: the step count (the refresh and
        ``top_n`` schedules follow it) and the newest circuit (reused between refreshes, lagged's next update)."""
        return self.session.state_dict()

    def load_state_dict(self, state: dict):
        self.session.load_state_dict(state)

    def step(self, batch, corrupted_batch=None) -> StepResult:
        """One circuit-tuning step on ``batch`` (a dict, or a list of micro-batch dicts whose gradients and
        scores are accumulated). Refuses (raises, model untouched) on NaN/inf loss, metric or scores."""
        given = batch if isinstance(batch, (list, tuple)) else [batch]
        tokens = [_label_tokens(b) for b in given]  # (before the move: labels given on the host cost no sync)
        for b in given:  # (on the host, as given: the check reads no device)
            if "target_pos" in b and self.metric in ("logit_diff", "logprob_diff"):
                check_target_pos(b)
        batches = [_to(b, self.device) for b in given]
        corrupted = corrupted_batch if isinstance(corrupted_batch, (list, tuple)) else [corrupted_batch] * len(batches)
        corrupted = [None if c is None else _to(c, self.device) for c in corrupted]
        if len(corrupted) != len(batches):
            raise CTFastError(f"{len(batches)} micro-batches but {len(corrupted)} corrupted micro-batches")
        no_labels = sum(tokens) == 0  # refused (_step): with several ranks on all of them together
        # a micro-batch without label tokens weighs 0; several ranks weigh by the tokens of all of them (the ranks'
        # gradients and scores are averaged: each is scaled by its share of the global batch's label tokens)
        per_rank = self._tokens_per_rank(sum(tokens))  # (every rank joins its all-reduce)
        w_loss = [n / per_rank for n in tokens] if not no_labels else [1 / len(tokens)] * len(tokens)
        sizes = [b["input_ids"].shape[0] for b in batches]
        w_metric = w_loss if self.metric == "loss" else [s / sum(sizes) for s in sizes]
        session = self.session
        session.abort()  # a step left unfinished by an exception starts over
        timer = PhaseTimer(self.device, session.profile)
        t_start = time.perf_counter()
        with self._attached():
            return self._step(batches, corrupted, w_loss, w_metric, timer, t_start, no_labels)

    @contextlib.contextmanager
    def _attached(self):
        """The session hooks the model and drives the optimizer for the duration of one step only: between steps
        the model is untouched and several tuners may share an optimizer."""
        if self.optimizer.tuning is not None:
            raise CTFastError("this optimizer circuit-tunes a model in a loop of its own (model= was given)")
        self.session.attach()
        self.optimizer.tuning = self.session
        try:
            yield
        finally:
            self.optimizer.tuning = None
            self.session.detach()

    def _step(self, batches, corrupted, w_loss, w_metric, timer, t_start, no_labels: bool = False) -> StepResult:
        session = self.session
        session.begin_step(batches, timer, backwards=len(batches))
        try:
            if no_labels:
                if session.dp is None:
                    raise CTFastError(_NO_LABEL_TOKENS)
                # several ranks: this one runs its forwards (NaN loss, no backward) up to the step's first collective,
                # where every rank refuses the step together (raising here alone would leave the others waiting)
                session.no_labels = True
            if session.mode in ("two_pass", "outcome"):  # a scoring pass, then a training pass on the circuit
                session.forward_rng = ForwardRng(self.device)
                loss, metric, retained = self._passes(batches, corrupted, w_loss, w_metric, timer, score=True)
                session.forward_rng.scored()
                session.select()
                if retained is not None:  # one micro-batch: the training backward over the graph kept
                    session.stream_grads()
                    with timer.span("backward"):
                        retained.backward()
                else:  # the forwards run again (dropout as in the first), on a circuit known now: plain linears
                    session.masked.plain_outside(session.masked.selection)  # outside it
                    session.forward_rng.replaying = True
                    loss, _, _ = self._passes(batches, corrupted, w_loss, w_metric, timer, score=False)
                    session.forward_rng.replayed()
            else:  # deferred, lagged, reused: one forward and backward per micro-batch
                loss, metric, _ = self._passes(batches, corrupted, w_loss, w_metric, timer, score=False)
            conclusion = session.conclude()
        except BaseException:
            session.abort()
            raise
        finally:
            session.forward_rng = None
        self.optimizer.step()  # times its own "optimizer" phase
        timings, host_timings = self._timings(timer, t_start)
        return StepResult(loss=loss, metric=metric, circuit=conclusion.circuit,
                          tuned_params=conclusion.circuit.num_params, top_n=conclusion.top_n,
                          refreshed=conclusion.refreshed, memory_mode=conclusion.memory_mode,
                          timings=timings, host_timings=host_timings)

    def _passes(self, batches, corrupted, w_loss, w_metric, timer, score: bool):
        """Forward and backward of every micro-batch. ``score``: backpropagate the metric (the scoring pass of
        two_pass/outcome; with two_pass on one micro-batch the graph is kept for the training backward and
        returned); else the training loss (it also scores when the session records: deferred, lagged).
        Returns the (weighted) loss and metric.

        The losses are read on the host once, after the pass's backwards (``_read_losses``), not between each
        forward and its backward: on a GPU that read drains the queue, and the host would launch the backward only
        once the device has finished the forward. A non-finite loss is refused there, before the step concludes —
        nothing of the step is applied yet. With several ranks each loss is read before its backward: a rank
        skips the backward of a non-finite one, and the ranks refuse the step together."""
        session = self.session
        retain = score and session.mode == "two_pass" and len(batches) == 1
        if not score:  # several ranks: average the gradients while the backward runs (one backward on every rank)
            session.stream_grads(one_backward=len(batches) == 1)
        loss = metric = 0.0
        retained = None
        unread = []  # (loss, metric, w_loss, w_metric): values still on the device
        for i, (b, c, wl, wm) in enumerate(zip(batches, corrupted, w_loss, w_metric)):
            if session.forward_rng is not None:
                session.forward_rng.key = i
            w = wm if score else wl
            if w == 0:  # no label token: no loss, no gradient; its examples and tokens still count
                if session.run is not None and not session.run.closed:
                    with timer.span("forward"):
                        session.observe(b)
                elif wm and not session.refresh:  # an outcome metric is still reported
                    with timer.span("forward"), torch.no_grad():
                        metric += evaluate_metric(self.metric, self.model(**model_inputs(b)), b).item() * wm
                continue
            with timer.span("forward"):
                session.corrupted, session.given = c, b
                inputs = model_inputs(b)
                out = causal_lm_loss(self.model, inputs) if self.fused_loss else self.model(**inputs)
                with torch.set_grad_enabled(score):
                    value = evaluate_metric(self.metric, out, b)
            if out.loss is None:
                raise CTFastError(_NO_LABELS)
            # a micro-batch without label tokens (scored here for an outcome metric) has no loss: NaN, weighing 0
            micro_loss = out.loss if wl else torch.zeros_like(out.loss)
            if session.dp is not None:
                try:
                    step_loss, step_metric = _read_losses([(micro_loss, value, wl, wm)])
                except NonFiniteError:
                    session.nonfinite = True  # several ranks: refused on all of them at the step's first collective
                    continue
                loss, metric = loss + step_loss, metric + step_metric
            else:
                unread.append((micro_loss.detach(), value.detach(), wl, wm))
            target = (value if score else out.loss) * w
            del out  # the logits ([B, T, vocab]) are not needed by the backward: free them before it
            with timer.span("backward"):
                try:
                    target.backward(retain_graph=retain)
                except Exception as error:  # a non-finite loss is the error to report, not what it broke
                    _read_losses(unread, cause=error)
                    raise
            retained = target if retain else None
        step_loss, step_metric = _read_losses(unread)
        return loss + step_loss, metric + step_metric, retained

    @staticmethod
    def _timings(timer: PhaseTimer, t_start: float) -> tuple[dict, dict]:
        """``(timings, host_timings)``: seconds per phase on the device (the host on a CPU) and on the host."""
        host_total = time.perf_counter() - t_start  # before seconds() waits for the device
        seconds, host = timer.seconds(), timer.host_seconds()
        out, out_host = _phases(seconds, timer.active), _phases(host, timer.active)
        out["total"], out_host["total"] = time.perf_counter() - t_start, host_total
        return out, out_host


def _phases(seconds: dict, active: bool) -> dict:
    """``PHASES`` from a timer's seconds per span (``backward`` without the scoring inside it); {} if none timed."""
    if not (seconds or active):
        return {}
    out = {k: seconds.get(k, 0.0) for k in PHASES}
    out["backward"] = max(0.0, out["backward"] - out["attribution"])  # scoring runs inside the backward
    return out


def _to(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on the model's device (a no-op when they already are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_NO_LABELS = "the training loss needs 'labels' in every batch (e.g. input_ids with -100 on padding)"
_NO_LABEL_TOKENS = ("no micro-batch has a label token (labels are all -100): there is no training loss to step on — "
                    "check the labels (-100 marks tokens without loss)")


def _read_losses(unread: list, cause: BaseException | None = None) -> tuple[float, float]:
    """``(sum w_loss * loss, sum w_metric * metric)`` over ``unread`` ``(loss, metric, w_loss, w_metric)`` device
    scalars, read in one host sync; raises ``NonFiniteError`` (from ``cause``) if a loss is NaN/inf."""
    if not unread:
        return 0.0, 0.0
    values = torch.stack([t.detach().float().reshape(()) for loss, metric, _, _ in unread
                          for t in (loss, metric)]).tolist()
    loss = metric = 0.0
    for (_, _, wl, wm), value, measure in zip(unread, values[::2], values[1::2]):
        if not math.isfinite(value):
            raise NonFiniteError(f"the training loss is {value}: the step is refused and the model untouched — "
                                 "check labels, inputs and learning rate") from cause
        loss, metric = loss + value * wl, metric + measure * wm
    return loss, metric
