"""Memory plan: the predicted peak bytes of one training step, per memory mode, before anything runs.

The model is built on the meta device (no weights are allocated: an 8B plan takes ~20 s on a 2-core CPU)
and its step runs there under a live-storage tracker (``LiveStorages``) that logs every allocation and free:
what the forward leaves for the backward (activations), the backward's working set (activation gradients,
logits, loss) and the dense gradients are *measured*, not modelled. The circuit engine runs with them in
stand-in form (``_Engine``: its forward capture, the tapped gradients a layer waits for, a placeholder for
the scoring temporaries and for each compact weight gradient), so a replay of the log finds the moment of
the peak. What lies outside the backward (state pool, deferred mode's kept tensors) follows the engine's
memory model (``circuit_parts``). Two traces (batch 2 and 3) give every storage's size as an affine function
of the batch, so plans at any batch, and the largest batch that fits, are replays. Everything is bytes.

Example::

    plan = ct_fast.memory_plan("llama-8B", batch=8, seq=2048, dtype="bf16", device_memory=80e9)
    print(plan.table())
    plan.modes["lagged"].fits, plan.modes["lagged"].max_batch

Assumptions (stated in ``MemoryPlan.assumptions`` too): inputs without padding mask (causal attention
through a fused kernel that keeps ``q, k, v, out`` and the log-sum-exp, as flash attention on GPU and
torch's CPU kernel do); full fine-tuning trains every parameter with torch's foreach optimizer (state in
the parameter dtype); the circuit optimizer's row pools (``state_capacity`` as in ``CircuitAdamW``: None,
the default, gives every row a slot) exist for every tunable parameter, as after enough steps; the CUDA
context, cuBLAS workspaces and allocator fragmentation are not included.
"""

from __future__ import annotations

import functools
import gc
import math
import numbers
import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import CTFastError
from .graph import ComputationGraph
from .models import DTYPES, SHAPES, check_positions, enable_activation_checkpointing, shape_config

MODES = ("deferred", "two_pass", "lagged")
FULL = "full"  # full fine-tuning with the torch optimizer, all parameters trained
OPTIMIZERS = ("adamw", "sgd")  # torch AdamW / SGD with momentum (full), CircuitAdamW / CircuitSGD (circuit)
BREAKDOWN_KEYS = ("params", "optimizer_state", "grads", "activations", "transients", "capture", "scoring",
                  "deferred_kept", "optimizer_step")
ASSUMPTIONS = (
    "inputs without a padding mask; causal attention through a fused kernel (q, k, v, out, log-sum-exp kept)",
    "full fine-tuning: every parameter trained by torch's foreach optimizer, state in the parameter dtype",
    "circuit modes: embeddings, norms and the unembedding frozen; the optimizer's row pools (state_capacity, "
    "None = every row) allocated for every tunable parameter; compact gradients = top_fraction x tunable x fp32",
    "not included: CUDA context, cuBLAS workspaces, allocator fragmentation (leave ~5-10% of the card free)",
)


# ---- results -------------------------------------------------------------------------------------

@dataclass
class ModePlan:
    """One way of training: ``peak_bytes`` = sum of ``breakdown`` (bytes per component, see
    ``BREAKDOWN_KEYS``); ``fits``/``max_batch`` (at the same seq) when a device memory was given."""

    mode: str
    peak_bytes: int
    breakdown: dict
    fits: bool | None = None
    max_batch: int | None = None


@dataclass
class MemoryPlan:
    """The plan of one model at ``batch x seq``: ``modes[name]`` for ``"full"`` and each circuit mode.

    ``params``/``tunable_params``: element counts; ``param_bytes``: the weights; ``grad_bytes``: full
    fine-tuning's dense gradients (all alive during its optimizer step); ``activation_bytes``: what
    the forward leaves alive for the backward (what autograd saves, B x T tokens, weights and outputs
    excluded)."""

    model: str
    batch: int
    seq: int
    dtype: str
    device_memory: int | None
    params: int
    tunable_params: int
    param_bytes: int
    grad_bytes: int
    activation_bytes: int
    top_fraction: float
    state_capacity: float | int | None
    optimizer: str
    activation_checkpointing: bool
    modes: dict = field(default_factory=dict)
    assumptions: tuple = ASSUMPTIONS
    fused_loss: bool = False  # every mode (full fine-tuning too) computes the loss without the logits

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown table: one row per mode, peak and components in GiB (MiB below 1 GiB), fit and largest
        batch."""
        keys = [k for k in BREAKDOWN_KEYS if any(m.breakdown.get(k) for m in self.modes.values())]
        unit, scale = ("GiB", 2**30) if max(m.peak_bytes for m in self.modes.values()) >= 2**30 else ("MiB", 2**20)
        fmt = lambda n: f"{n / scale:.2f}"  # noqa: E731
        head = ["mode", f"peak {unit}"] + [k.replace("_", " ") for k in keys]
        if self.device_memory is not None:
            head += [f"fits {self.device_memory / 1e9:.3g} GB", "max batch"]
        rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for m in self.modes.values():
            cells = [m.mode, fmt(m.peak_bytes)] + [fmt(m.breakdown[k]) if k in m.breakdown else "" for k in keys]
            if self.device_memory is not None:
                cells += ["yes" if m.fits else "no", str(m.max_batch)]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def parse_bytes(text) -> int:
    """``"80GB"`` (1e9), ``"80GiB"`` (2**30), ``"512MiB"``, ``"8e10"`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(e[0-9]+)?\s*([a-z]*)\s*", str(text).lower())
    size = float(m.group(1) + (m.group(2) or "")) * units.get(m.group(3), math.nan) if m else math.nan
    if not (math.isfinite(size) and size > 0):
        raise CTFastError(f"cannot read a memory size from {text!r}; write e.g. 80GB, 80GiB or 512MiB")
    return int(size)


# ---- the model on the meta device -----------------------------------------------------------------

def load_config(model_or_config):
    """``(label, config)`` of a name in ``ct_fast.models.shape_config``, a config.json or model directory
    (local only), a transformers config or a model."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        return type(model_or_config).__name__, model_or_config
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__, model_or_config.config
    name = str(model_or_config)
    try:
        return name, shape_config(name)
    except ValueError:
        pass
    if not os.path.exists(name):
        raise CTFastError(f"model {name!r} is neither a known shape ({', '.join(SHAPES)}) nor "
                          "an existing config.json or model directory")
    try:
        return name, AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CTFastError(f"could not read a transformers config from {name!r}: {e}") from e


def meta_model(config, dtype: torch.dtype, activation_checkpointing: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the meta device in train mode (no memory allocated)."""
    import transformers

    transformers.logging.set_verbosity_error()
    with _no_init_weights(), torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied embeddings are one parameter (no_init_weights skips the tying)
    model.train()
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def _no_init_weights():
    """transformers' switch that skips weight initialisation (pointless on meta tensors), if it has one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return _nothing()
    return no_init_weights()


@contextmanager
def _nothing():
    yield


@contextmanager
def _meta_friendly():
    """Make HF models run on meta tensors as they do on a device: attention through the fused kernel
    (meta SDPA would pick the math path and keep [B, H, T, T] probabilities), and no data-dependent
    packed-sequence check (it reads a value)."""
    import torch.nn.functional as F
    from transformers import masking_utils

    sdpa, packed = F.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices

    def fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not q.is_meta:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused_sdpa
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices = sdpa, packed


# ---- live-storage tracking ------------------------------------------------------------------------

class LiveStorages(TorchDispatchMode):
    """Logs every storage created while active (any device, meta included: bytes = shape x element size)
    and when the last tensor viewing it dies: ``events`` (serial >= 0: allocated, ``~serial``: freed),
    ``size[serial]`` bytes, ``live`` serials. Storages an op only aliases (in-place updates of parameters,
    views of inputs) are not counted; a serial per storage keeps a reused address apart."""

    def __init__(self):
        super().__init__()
        self.events: list[int] = []
        self.size: dict[int, int] = {}
        self.live: set[int] = set()
        self._serial_of: dict[int, int] = {}  # storage address (_cdata) -> serial
        self._refs: dict[int, int] = {}  # serial -> live tensors viewing it

    def serial(self, t: torch.Tensor) -> int | None:
        """The serial of a tensor's storage, None if it was created outside the tracker."""
        return self._serial_of.get(t.untyped_storage()._cdata)

    def _track(self, t: torch.Tensor, inputs: set):
        storage = t.untyped_storage()
        key = storage._cdata
        serial = self._serial_of.get(key)
        if serial is None:
            if key in inputs or storage.nbytes() == 0:
                return  # an alias of a storage that existed before tracking
            serial = len(self.size)
            self._serial_of[key], self.size[serial], self._refs[serial] = serial, storage.nbytes(), 0
            self.live.add(serial)
            self.events.append(serial)
        self._refs[serial] += 1
        weakref.finalize(t, self._release, key, serial)

    def _release(self, key: int, serial: int):
        self._refs[serial] -= 1
        if self._refs[serial] == 0:
            del self._refs[serial], self._serial_of[key]
            self.live.discard(serial)
            self.events.append(~serial)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    self._track(t, inputs)
                except (RuntimeError, TypeError, NotImplementedError):  # no storage (sparse, nested)
                    pass
        return out


def replay_peak(events, size: dict, groups: dict) -> dict:
    """The peak of live bytes over ``events`` and its composition: ``{group: bytes}`` for each group of
    serials in ``groups`` plus ``"transients"`` for the rest. ``size``: bytes per serial."""
    live, by_group, peak, at_peak = 0, dict.fromkeys(groups, 0), -1, {}
    group_of = {s: g for g, serials in groups.items() for s in serials}
    for e in events:
        s, sign = (e, 1) if e >= 0 else (~e, -1)
        live += sign * size[s]
        if s in group_of:
            by_group[group_of[s]] += sign * size[s]
        if sign > 0 and live > peak:
            peak, at_peak = live, dict(by_group)
    return {**at_peak, "transients": max(peak, 0) - sum(at_peak.values())}


# ---- one step on the meta device ------------------------------------------------------------------

class _Engine:
    """Stands in for the circuit engine around one meta forward and its backwards (no memory is used).

    Forward: ``Capture`` stores what the scorer reads (as ``AttributionRun`` does) and taps the gradients
    it scores. Backward, as ``EdgeScorer`` does: a layer's tapped gradients are kept until its last tap
    fires (layers left over are scored after the backward); the first scored layer allocates the scoring
    buffers, kept to the end of the backward, and each scored layer its chunk temporaries. With
    ``compacting`` each tunable linear allocates its compact fp32 weight gradient, kept to the end of the
    backward. These allocations are 4-byte placeholders; the replay sizes them from ``scoring`` (serial ->
    scored layer, None for the buffers) and ``compact`` (serial -> weight elements)."""

    def __init__(self, model: nn.Module, graph: ComputationGraph, tracker: LiveStorages):
        from .attribution import SCORE_SPAN, _mlp_residuals, layer_plans
        from .capture import Capture

        stored = {g.capture for g in graph.upstream_groups} | {(g.norm, "input") for g in graph.downstream_groups
                                                               if g.norm}
        if next(model.parameters()).dtype == torch.float32:  # as AttributionRun: whole-MLP outputs of an fp32
            derived = _mlp_residuals(graph)                  # model are residual differences, not captures
            stored -= {graph.upstream_groups[k].capture for k in derived}
            stored |= {key for pair in derived.values() for key in pair}
        taps = {g.tap for g in graph.downstream_groups}
        self.capture = Capture(model, store=stored, taps=taps, on_grad=self._on_grad)
        self.plans, self.tracker = layer_plans(graph, SCORE_SPAN), tracker
        self.layer_of_tap = {tap: plan.layer for plan in self.plans.values() for tap in plan.tap_keys}
        self.pending: dict[int, dict] = {}
        self.kept: list = []  # compact gradients
        self.kept_buffers: list = []  # scoring buffers
        self.scoring: dict[int, int] = {}
        self.compact: dict[int, int] = {}
        self.compacting = False
        self.activations: set = set()  # what the traced forward leaves alive
        self.linear_inputs: dict = {}

    def _placeholder(self) -> tuple[torch.Tensor, int]:
        t = torch.empty(1, device="meta")
        return t, self.tracker.serial(t)

    def _on_grad(self, key, grad: torch.Tensor):
        plan = self.plans[self.layer_of_tap[key]]
        pending = self.pending.setdefault(plan.layer, {})
        pending[key] = grad
        if len(pending) == plan.taps:
            self._score(plan.layer)

    def _score(self, layer: int):
        """The scoring temporaries of ``layer`` while its tapped gradients are alive; then both go."""
        if not self.kept_buffers:
            buffers, serial = self._placeholder()
            self.scoring[serial] = None
            self.kept_buffers.append(buffers)
        _, serial = self._placeholder()
        self.scoring[serial] = layer
        del self.pending[layer]

    def end_backward(self):
        """Score the layers whose taps did not all fire (``EdgeScorer.flush``), then drop the scoring buffers
        and the compact gradients."""
        for layer in sorted(self.pending, reverse=True):
            self._score(layer)
        self.kept.clear()
        self.kept_buffers.clear()

    def linear_hook(self, numel: int):
        """Forward hook of a tunable linear: its backward allocates the compact gradient (``compacting``)."""
        def on_grad(grad):
            if self.compacting:
                t, serial = self._placeholder()
                self.compact[serial] = numel
                self.kept.append(t)

        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(on_grad)
        return hook


class _Forward:
    """One tracked forward of a meta model: its output, the serials it leaves alive for the backward
    (``activations``; outputs excluded) and ``linear_inputs`` (tunable linear name -> serial of its input).
    With an ``engine`` its capture is released after the forward, from event ``mark`` on: what that frees
    is what only the capture kept alive."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, linears: dict, tracker: LiveStorages,
                 engine: _Engine | None = None, fused_loss: bool = False):
        from .fused_loss import causal_lm_loss, traced_chunks

        self.linear_inputs: dict[str, int] = {}
        hooks = [m.register_forward_pre_hook(self._recorder(name, tracker)) for name, m in linears.items()]
        if engine is not None:
            hooks += [m.register_forward_hook(engine.linear_hook(m.weight.numel())) for m in linears.values()]
        try:
            with tracker, (engine.capture if engine is not None else _nothing()):
                batch = {"input_ids": ids, "labels": ids, "use_cache": False}  # as every step runs
                if fused_loss:
                    with traced_chunks(1):  # (the log must not depend on how many chunks the batch makes)
                        self.out = causal_lm_loss(model, batch)
                else:
                    self.out = model(**batch)
                self.mark = len(tracker.events)
                if engine is not None:
                    engine.capture.stored.clear()
        finally:
            for h in hooks:
                h.remove()
        self.activations = tracker.live - {tracker.serial(t) for t in (self.out.logits, self.out.loss)}

    def _recorder(self, name: str, tracker: LiveStorages):
        def hook(module, args):
            self.linear_inputs[name] = tracker.serial(args[0])
        return hook


@dataclass
class StepTrace:
    """Allocation events of one step at ``batch x seq`` (meta device), in order: a forward with the circuit
    engine (to ``marks[0]``), its capture released (to ``marks[1]``; the replays keep it alive instead), an
    activation-only backward retaining the graph with scoring (to ``marks[2]``), one freeing the graph with
    scoring and compact gradients (to ``marks[3]``), then a plain forward and a backward computing every
    dense gradient. ``size``: bytes per serial at ``batch``."""

    batch: int
    seq: int
    events: list
    marks: tuple
    size: dict
    activations: set  # what the first forward leaves alive for the backward
    full_activations: set  # the same for the second forward
    grads: set  # dense gradients of the second backward
    linear_inputs: dict  # tunable linear name -> serial of its input
    scoring: dict  # placeholder serial -> scored layer (None: the scoring buffers)
    compact: dict  # placeholder serial -> elements of the weight


def trace_step(model: nn.Module, graph: ComputationGraph, batch: int, seq: int, circuit: bool = True,
               fused_loss: bool = False) -> StepTrace:
    """Run and log one step of a meta ``model`` at ``batch x seq`` (``circuit=False``: full fine-tuning
    only; ``fused_loss``: the loss of ``ct_fast.causal_lm_loss``, no logits). The cyclic garbage collector is
    paused so that every run frees at the same events."""
    gc.disable()
    try:
        return _trace_step(model, graph, batch, seq, circuit, fused_loss)
    finally:
        gc.enable()


def _trace_step(model: nn.Module, graph: ComputationGraph, batch: int, seq: int, circuit: bool,
                fused_loss: bool) -> StepTrace:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    linears = {n: m for n, m in model.named_modules() if f"{n}.weight" in graph.tunable_params}
    tracker, marks = LiveStorages(), [0, 0, 0, 0]
    engine = _Engine(model, graph, tracker)
    with _meta_friendly():
        if circuit:
            marks = _trace_circuit_backwards(model, ids, linears, tracker, engine, fused_loss)
        fwd = _Forward(model, ids, linears, tracker, fused_loss=fused_loss)
        loss, full_activations = fwd.out.loss, fwd.activations
        with tracker:
            del fwd  # the logits go before the backward, as in ``model(**batch).loss.backward()``
            loss.backward()
            grads = {tracker.serial(p.grad) for p in model.parameters() if p.grad is not None}
            del loss
            model.zero_grad(set_to_none=True)
    return StepTrace(batch, seq, tracker.events, tuple(marks), tracker.size, engine.activations, full_activations,
                     grads, engine.linear_inputs, engine.scoring, engine.compact)


def _trace_circuit_backwards(model, ids, linears: dict, tracker: LiveStorages, engine: _Engine,
                             fused_loss: bool = False) -> list:
    """Log a forward with the circuit engine and its two activation-only backwards (``StepTrace``): both
    differentiate to the capture's anchor, so they run down to the first tap, as the engine's does."""
    fwd = _Forward(model, ids, linears, tracker, engine, fused_loss)
    marks = [fwd.mark, len(tracker.events)]
    engine.activations, engine.linear_inputs = fwd.activations, fwd.linear_inputs
    anchor = engine.capture.anchor
    with tracker:
        torch.autograd.grad(fwd.out.loss, [anchor], retain_graph=True, allow_unused=True)
        engine.end_backward()
        marks.append(len(tracker.events))
        engine.compacting = True
        torch.autograd.grad(fwd.out.loss, [anchor], allow_unused=True)
        engine.end_backward()
        del fwd
    return marks + [len(tracker.events)]


class _ScoringSizes:
    """Bytes ``EdgeScorer`` allocates on a GPU, from its chunking rule (``attribution.scoring_chunks``): per
    layer, token chunks of ``c`` rows such that the stacked gradients G [nodes, c, d] (in the scoring dtype) stay
    within ``GPU_CHUNK_ELEMENTS``, and on the torch scoring path sub-chunks of ``sub`` rows such that the
    contributions of the upstream groups scored together A [nodes', sub, d] do too; G, A and the sources cast
    to the scoring dtype [sub, width] are buffers kept for the whole backward (grown to the largest layer); each
    layer span adds ~4 fp32 [c, d] temporaries or its norms' statistics (an fp32 copy of a norm's input over every
    row), and on the torch residual-gradient path its readers' weights with the norm's weight folded in (in the
    scoring dtype, ``EdgeScorer._fold_norm_weights``) and a buffer of one norm's scaled head rows ``[c, width]``
    (``EdgeScorer._project_run``, kept for the backward). Where a half-precision model's residual vectors
    are stacked (the torch path), the attention output projections are stacked too, once per backward, if they fit
    (``heads`` elements; the head rows they batch are copied per sub-chunk into a buffer ``[sub, <= layers,
    width]``).
    ``score_dtype``: of A and the sources (the model's in bf16/fp16, else fp32); the fused ``score_edges``
    kernels (auto's measured GPU choice for that dtype) make no A."""

    def __init__(self, graph: ComputationGraph, score_dtype: torch.dtype):
        from .attribution import (GPU_CHUNK_ELEMENTS, SCORE_SPAN, batched_head_groups, layer_plans,
                                  residual_vector_groups)
        from .ops import measured

        self.d, self.score_bytes, self.layers = graph.d_model, score_dtype.itemsize, {}
        self.budget = GPU_CHUNK_ELEMENTS
        self.fused = (measured.gpu_order("score_edges", (score_dtype,)) or ("torch",))[0] != "torch"
        fold = (measured.gpu_order("residual_grads", (score_dtype,)) or ("torch",))[0] != "triton"
        # a half-precision model's residual vectors are stacked at capture on the torch path: A holds none of them
        stacked = set() if self.fused or score_dtype == torch.float32 else residual_vector_groups(graph)
        # ... and the attention groups' output projections stacked once per backward where they fit
        attn = [graph.upstream_groups[k].writer for k in batched_head_groups(graph)] if stacked else []
        self.head_row_width = sum(w.n * w.width for w in attn)  # at most every layer's heads
        self.heads = self.head_row_width * graph.d_model
        for layer, plan in layer_plans(graph, SCORE_SPAN).items():
            ups = [graph.upstream_groups[k] for k, _ in plan.ups if k not in stacked]
            width = max(g.writer.n * g.writer.width if g.writer else graph.d_model for g in ups)
            folded = sum(g.reader.n * g.reader.width * graph.d_model for _, _, gs in plan.blocks for g in gs
                         if fold and g.reader is not None and g.norm is not None)
            run_width = {}  # per norm: the rows of its one-projection blocks, scaled side by side (``_project_run``)
            for _, _, gs in plan.blocks:
                if fold and len(gs) == 1 and gs[0].reader is not None and gs[0].norm is not None:
                    run_width[gs[0].norm] = run_width.get(gs[0].norm, 0) + gs[0].reader.n * gs[0].reader.width
            self.layers[layer] = (plan.n_nodes, sum(len(g.names) for g in ups), max(len(g.names) for g in ups), width,
                                  folded, max(run_width.values(), default=0))

    def _chunks(self, nodes: int, seen: int, tokens: int) -> tuple[int, int]:
        """``(G's chunk, a scoring call's sub-chunk)`` rows at ``tokens`` scored rows."""
        from .attribution import scoring_chunks

        return tuple(min(c, tokens) for c in scoring_chunks(nodes, seen, self.d, self.budget, self.fused))

    def bytes(self, layer: int | None, tokens: int) -> int:
        """The buffers (``layer=None``) or one layer's temporaries, at ``tokens`` scored rows."""
        if layer is not None:
            nodes, seen, _, _, folded, _ = self.layers[layer]
            temps = max(4 * 4 * self._chunks(nodes, seen, tokens)[0] * self.d, 4 * tokens * self.d)
            return temps + self.score_bytes * folded
        g = a = rows = head_rows = run_rows = 0
        for nodes, seen, widest, width, _, run_width in self.layers.values():
            c, sub = self._chunks(nodes, seen, tokens)
            together = 0 if self.fused else min(seen, max(widest, self.budget // (sub * self.d)))
            g, a, rows = max(g, nodes * c * self.d), max(a, together * sub * self.d), max(rows, sub * width)
            head_rows, run_rows = max(head_rows, sub * self.head_row_width), max(run_rows, c * run_width)
        return self.score_bytes * (g + a + rows + head_rows + run_rows + self.heads)


@dataclass
class StepModel:
    """Every logged storage's bytes as ``base + slope x batch`` (fitted from two traces with identical
    events, exact since every tensor's size is affine in the batch), replayed at any batch."""

    trace: StepTrace
    base: dict
    slope: dict
    scoring: "_ScoringSizes"

    @classmethod
    def fit(cls, a: StepTrace, b: StepTrace, scoring: "_ScoringSizes") -> "StepModel":
        if a.events != b.events or a.marks != b.marks:
            raise CTFastError("the step's allocations differ between two batch sizes; the memory plan needs a "
                              "model whose forward does not branch on the batch size")
        slope = {s: (b.size[s] - a.size[s]) // (b.batch - a.batch) for s in a.size}
        return cls(a, {s: a.size[s] - slope[s] * a.batch for s in a.size}, slope, scoring)

    def profile(self, batch: int, top_fraction: float) -> dict:
        """Bytes at ``batch``: ``activations`` (what the forward leaves alive for the backward),
        ``linear_inputs`` ({linear: (serial, bytes)}), and the composition of the peak (``{component:
        bytes}``, the rest as ``transients``) of the forward plus:

        - ``full``: a backward computing every dense gradient (``grads``);
        - ``retained``: the scoring backward of two_pass (graph kept for a second backward);
        - ``two_pass_dw``: its second backward, compact gradients (``grads``) of ``top_fraction`` only;
        - ``lagged``: one backward that scores and computes the compact gradients;
        - ``deferred``: one backward that scores (what it keeps for dW: ``circuit_parts``).
        The circuit engine's capture stays alive through these backwards."""
        t = self.trace
        size = {s: self.base[s] + self.slope[s] * batch for s in self.base}
        tokens = batch * t.seq
        scoring = {s: self.scoring.bytes(layer, tokens) for s, layer in t.scoring.items()}
        compact = {s: int(4 * top_fraction * n) for s, n in t.compact.items()}
        ev, (m0, m1, m2, m3) = t.events, t.marks
        groups = {"activations": t.activations, "capture": {~e for e in ev[m0:m1]}, "scoring": set(scoring),
                  "grads": set(compact)}

        def replay(events, score: bool, dw: bool) -> dict:
            sized = {**size, **{s: n if score else 0 for s, n in scoring.items()},
                     **{s: n if dw else 0 for s, n in compact.items()}}
            return replay_peak(events, sized, groups)

        freeing = ev[:m0] + ev[m2:m3]
        return {
            "activations": sum(size[s] for s in t.full_activations),
            "linear_inputs": {n: (s, size[s]) for n, s in t.linear_inputs.items()},
            "retained": replay(ev[:m0] + ev[m1:m2], True, False),
            "two_pass_dw": replay(freeing, False, True),
            "lagged": replay(freeing, True, True),
            "deferred": replay(freeing, True, False),
            "full": replay_peak(ev[m3:], size, {"activations": t.full_activations, "grads": t.grads}),
        }


def optimizer_bytes(model: nn.Module, optimizer: str) -> tuple[int, int]:
    """``(state, step transient)`` bytes of torch's foreach ``optimizer`` training every parameter of a meta
    ``model``: the state after a first step, and what the second step allocates on top of the gradients."""
    params = list(model.parameters())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    else:
        opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9, foreach=True)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()  # allocates the state
    tracker = LiveStorages()
    with tracker:
        opt.step()
    state = {id(v.untyped_storage()): v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)}
    for p in params:
        p.grad = None
    return sum(state.values()), replay_peak(tracker.events, tracker.size, {})["transients"]


# ---- the plan ---------------------------------------------------------------------------------------

@dataclass
class _Shapes:
    """What the circuit-mode formulas need of the model (element counts, bytes, widths)."""

    param_bytes: int
    params: int
    tunable_params: int
    act_bytes: int  # element size of activations (the model dtype)
    linears: dict  # tunable linear name -> (out, in)

    @classmethod
    def of(cls, model: nn.Module, graph: ComputationGraph) -> "_Shapes":
        params = list(model.parameters())
        tunable = [p for n, p in model.named_parameters() if n in graph.tunable_params]
        linears = {n[:-len(".weight")]: _out_in(graph, graph.param_shapes[n]) for n in graph.tunable_params
                   if n.endswith(".weight")}
        return cls(sum(p.nbytes for p in params), sum(p.numel() for p in params), sum(p.numel() for p in tunable),
                   params[0].element_size(), linears)


def _out_in(graph: ComputationGraph, shape) -> tuple[int, int]:
    """(output, input) features of a tunable weight (GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    return (shape[1], shape[0]) if graph.arch == "gpt2" else (shape[0], shape[1])


def circuit_parts(s: _Shapes, batch: int, seq: int, linear_inputs: dict, top_fraction: float) -> dict:
    """The circuit engine's bytes outside the traced backward, at ``batch x seq``:

    - ``grads``: compact fp32 gradients of the circuit rows, ``top_fraction`` x tunable;
    - ``deferred_kept``: what deferred mode keeps to the end of the backward: per tunable linear the
      smaller of ``(x, grad_out)`` (activation dtype; an x shared by q/k/v or by gate/up counted once) and
      its dense fp32 weight gradient [out, in] (the rule of ``MaskedLinears._keep_dense``).
    ``linear_inputs``: {linear: (serial, bytes of its input)} from the traced forward."""
    tokens = batch * seq
    kept, inputs = 0, {}
    for name, (o, i) in s.linears.items():
        if 4 * o * i < tokens * (o + i) * s.act_bytes:
            kept += 4 * o * i
        else:
            kept += tokens * o * s.act_bytes
            serial, nbytes = linear_inputs[name]
            inputs[serial] = nbytes
    return {
        "grads": int(4 * top_fraction * s.tunable_params),
        "deferred_kept": kept + sum(inputs.values()),
    }


def circuit_state_bytes(model: nn.Module, graph: ComputationGraph, optimizer: str, state_capacity) -> int:
    """Bytes of the circuit optimizer's state once every tunable parameter has been selected: its row pools
    (moments, step counts, slot tables), allocated by ``CircuitAdamW``/``CircuitSGD`` itself on the meta
    model. ``state_capacity`` as in those optimizers: None (every row), a fraction or rows per parameter."""
    from .optim import CircuitAdamW, CircuitSGD

    tunable = [p for n, p in model.named_parameters() if n in graph.tunable_params]
    if optimizer == "adamw":
        opt = CircuitAdamW(tunable, lr=1e-5, state_capacity=state_capacity)
    else:
        opt = CircuitSGD(tunable, lr=1e-5, momentum=0.9, state_capacity=state_capacity)
    allocate_pools(opt, model, graph)
    return opt.state_bytes()


def allocate_pools(opt, model: nn.Module, graph: ComputationGraph):
    """Allocate the row pools of circuit optimizer ``opt`` for every tunable parameter it holds, as the tuning
    session sizes them (pools already allocated are kept)."""
    dims = graph.param_dims
    opt.reserve_state({p: dims[name] for name, p in model.named_parameters() if name in dims}, allocate=True)


def _phases(mode: str, s: _Shapes, step: dict, parts: dict, optimizer: tuple[int, int]) -> list[dict]:
    """The moments of one training step that can hold its peak, each as ``{component: bytes}``."""
    P = {"params": s.param_bytes}
    if mode == FULL:  # the backward; then the optimizer step with every gradient
        state, step_transient = optimizer
        return [{**P, "optimizer_state": state, **step["full"]},
                {**P, "optimizer_state": state, "grads": s.param_bytes, "optimizer_step": step_transient}]
    pool = {**P, "optimizer_state": parts["optimizer_state"]}
    if mode == "two_pass":  # scoring backward (graph retained), then the masked-dW backward
        return [{**pool, **step["retained"]}, {**pool, **step["two_pass_dw"]}]
    if mode == "lagged":  # one backward scores and computes dW of the previous circuit
        return [{**pool, **step["lagged"]}]
    if mode == "deferred":  # one backward keeping what dW needs, then the circuit's rows taken from it
        return [{**pool, **step["deferred"]},
                {**pool, "deferred_kept": parts["deferred_kept"], "grads": parts["grads"]}]
    raise CTFastError(f"unknown memory mode {mode!r}; choose from {', '.join(MODES)}")


def _peak(phases: list[dict]) -> dict:
    """The phase with the most bytes (zero components dropped)."""
    top = max(phases, key=lambda p: sum(p.values()))
    return {k: v for k, v in top.items() if v}


def _largest_batch(peak_at, memory: int, guess: int) -> int:
    """The largest batch with ``peak_at(batch) <= memory`` (``peak_at`` increases with the batch): gallop
    up from ``guess``, then bisect. 0 if even one example does not fit."""
    if peak_at(1) > memory:
        return 0
    lo, hi = 1, max(2, guess)
    while peak_at(hi) <= memory:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak_at(mid) <= memory else (lo, mid)
    return lo


def _check(batch, seq, dtype, modes, top_fraction, state_capacity, optimizer, memory=None):
    from .circuit import is_whole_number
    from .optim import check_state_capacity

    for name, value in (("batch", batch), ("seq", seq)):
        if not is_whole_number(value):
            raise CTFastError(f"{name}={value!r} must be a whole number")
    if isinstance(modes, str):
        raise CTFastError(f"modes={modes!r}: give a list of memory modes, e.g. [{modes!r}]")
    if memory is not None and not (isinstance(memory, numbers.Real) and math.isfinite(memory) and memory > 0):
        raise CTFastError(f"device_memory={memory!r} must be a finite number of bytes > 0 (or e.g. '80GB')")
    if optimizer not in OPTIMIZERS:
        raise CTFastError(f"optimizer {optimizer!r} is not one of {OPTIMIZERS}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) and dtype not in DTYPES:
        raise CTFastError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if batch < 1 or seq < 1:
        raise CTFastError(f"batch={batch} and seq={seq} must be >= 1")
    if not 0 < top_fraction <= 1:
        raise CTFastError(f"top_fraction={top_fraction} must be in (0, 1]")
    check_state_capacity(state_capacity)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise CTFastError(f"unknown memory modes {unknown}; choose from {', '.join(MODES)}")


_TRACED: dict = {}  # (config, dtype, seq, checkpointing, optimizer, circuit, fused) -> what _traced returns


def _traced(config, dtype: torch.dtype, seq: int, checkpointing: bool, optimizer: str, circuit: bool,
            fused_loss: bool = False):
    """``(model, graph, shapes, StepModel, full-FT optimizer bytes)`` of a meta model at ``seq`` tokens, traced
    at batches 2 and 3; cached, so that plans at other batches (a sweep, the largest-batch search) replay."""
    key = (config.to_json_string(), str(dtype), seq, checkpointing, optimizer, circuit, fused_loss)
    if key not in _TRACED:
        model = meta_model(config, dtype, checkpointing)
        graph = ComputationGraph.from_model(model)
        traces = [trace_step(model, graph, b, seq, circuit, fused_loss) for b in (2, 3)]
        score_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        if len(_TRACED) >= 8:
            _TRACED.clear()
        _TRACED[key] = (model, graph, _Shapes.of(model, graph),
                        StepModel.fit(*traces, _ScoringSizes(graph, score_dtype)), optimizer_bytes(model, optimizer))
    return _TRACED[key]


def memory_plan(model_or_config, batch: int, seq: int, dtype="bf16", device_memory=None,
                modes=MODES, top_fraction: float = 0.05, state_capacity=None,
                activation_checkpointing: bool = False, optimizer: str = "adamw", fused_loss: bool = False
                ) -> MemoryPlan:
    """Predict the peak memory of one training step at ``batch x seq`` tokens, for full fine-tuning and
    each circuit memory mode, without allocating any weight (meta device; ~20 s for an 8B model on 2 cores).

    ``model_or_config``: a shape name (``tiny``, ``gpt2-small``, ``llama-1B``, ``llama-8B``), a config.json
    or model directory (local), a transformers config or model. ``dtype``: of weights and activations.
    ``device_memory``: bytes or a string such as ``"80GB"``; then each mode says whether it fits and its
    largest batch at this ``seq``. ``top_fraction``: share of the tunable parameters in a circuit (its
    compact gradients); ``state_capacity``: the circuit optimizer's (``CircuitAdamW(state_capacity=...)``:
    None = a state slot for every row, the default; a fraction or rows per parameter), planned for the
    steady state where every tunable parameter has been selected. ``optimizer``: ``"adamw"`` or ``"sgd"``
    (with momentum), for full fine-tuning (torch) and the circuit modes alike. ``fused_loss``: every step,
    full fine-tuning's too, computes its loss with ``ct_fast.causal_lm_loss`` (no ``[B, T, vocab]`` logits).
    """
    memory = parse_bytes(device_memory) if isinstance(device_memory, str) else device_memory
    _check(batch, seq, dtype, modes, top_fraction, state_capacity, optimizer, memory)
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    label, config = load_config(model_or_config)
    check_positions(config, seq, "seq", label)
    model, graph, shapes, step, opt = _traced(config, torch_dtype, seq, activation_checkpointing, optimizer,
                                              bool(modes), fused_loss)
    pool = circuit_state_bytes(model, graph, optimizer, state_capacity) if modes else 0
    profile_at = functools.lru_cache(maxsize=None)(lambda b: step.profile(b, top_fraction))

    def breakdown(mode: str, b: int) -> dict:
        profile = profile_at(b)
        parts = {} if mode == FULL else {"optimizer_state": pool, **circuit_parts(
            shapes, b, seq, profile["linear_inputs"], top_fraction)}
        return _peak(_phases(mode, shapes, profile, parts, opt))

    plans = {}
    for mode in (FULL, *modes):
        parts = breakdown(mode, batch)
        plan = ModePlan(mode, sum(parts.values()), parts)
        if memory is not None:
            plan.fits = plan.peak_bytes <= memory
            plan.max_batch = _largest_batch(lambda b: sum(breakdown(mode, b).values()), memory, batch)
        plans[mode] = plan
    return MemoryPlan(label, batch, seq, str(torch_dtype).replace("torch.", ""), memory, shapes.params,
                      shapes.tunable_params, shapes.param_bytes, shapes.param_bytes,
                      profile_at(batch)["activations"],
                      top_fraction, state_capacity, optimizer, activation_checkpointing, plans,
                      fused_loss=fused_loss)
