"""Edge attribution patching (EAP): exact edge scores of a batch, computed layer by layer in backward.

    score(u -> d) = | (1/B) * sum_b sum_{t in P_b} (a_u[b,t] - a~_u[b,t]) . dM/dx_d[b,t] |

``a_u`` is never materialised per node: the forward keeps compact per-layer tensors (per-head z, MLP
activations or output, embeddings, the residual read by each norm), and the backward taps hand each
layer's downstream gradients to ``EdgeScorer``, which scores them against every earlier upstream group
in token chunks and drops them (docs/design.md sections 2-3).

Example::

    scores = ct_fast.attribute(model, batch, metric="loss", ablation="mean")
    circuit = scores.top_n(200)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .capture import Capture
from .distributed import full, is_dtensor
from .errors import CTFastError, NonFiniteError
from .graph import ComputationGraph
from .profiling import PhaseTimer

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "token_type_ids")
ABLATIONS = ("mean", "zero", "corrupted")
CHUNK_ELEMENTS = 1 << 25  # elements of one [nodes, chunk, d_model] scoring block on CPU (128 MiB in fp32)


def _whole_number_setting(name: str, default: int, minimum: int, expected: str) -> int:
    """The environment variable ``name`` as a whole number >= ``minimum`` (``default`` unset); anything else raises,
    naming the variable and ``expected``."""
    raw = os.environ.get(name, str(default))
    if not raw.strip().isdigit() or int(raw) < minimum:
        raise CTFastError(f"{name}={raw!r}: expected {expected}")
    return int(raw)


def _gpu_chunk_elements() -> int:
    """Elements of one scoring block on a GPU: ``CT_FAST_SCORE_CHUNK_ELEMENTS``, default 2^28 (512 MiB bf16 / 1 GiB
    fp32 blocks). Each token chunk costs launches per upstream group scored, so short chunks make the scoring
    host-bound: a llama-1B refresh-1 step at 8 x 512 tokens on an H100 ran 44k launches with 128-row chunks (kernels
    busy ~350 of 1920 ms, bench/results/profile_gpu_llama-1B.json). 4x the default takes a llama-1B deferred step
    from ~4.0k to ~2.7k launches (``bench/count_launches.py``) for ~4x the scoring blocks' memory: the GPU check times
    it (read at import; the memory plan reads the same value)."""
    return _whole_number_setting("CT_FAST_SCORE_CHUNK_ELEMENTS", 1 << 28, 1 << 20,
                                 f"a whole number of elements >= 2^20 = {1 << 20} (default 2^28 = {1 << 28})")


GPU_CHUNK_ELEMENTS = _gpu_chunk_elements()


def _score_span() -> int:
    """Layers scored together (counted from the last): each upstream contribution is then produced once per span, not
    once per layer. 2 took the scoring of an 8-layer Llama (d 512, T 2048) from 2.0 to 1.4 s on CPU; 3 and more
    gained little more there, while holding more layers' gradients. On a GPU, where writing and reading the torch
    path's contribution blocks costs as much as their FLOPs, a span of 4 would move ~40% fewer of their bytes at
    llama-1B: ``CT_FAST_SCORE_SPAN`` (read at import) sets it, and the GPU check times a faithful step at 4."""
    return _whole_number_setting("CT_FAST_SCORE_SPAN", 2, 1, "a whole number of layers >= 1 (default 2)")


SCORE_SPAN = _score_span()
MIN_CHUNK_ROWS = 128  # deep graphs: keep token chunks at least this long, batch fewer upstream groups instead
# the torch path makes the contributions of several layers' attention heads in one batched GEMM per token chunk when
# their output projections, stacked (kept for the backward), fit in this many elements: Llama-3.2-1B's 16 layers
# (67M; ~1000 fewer launches a step at 8 x 512 tokens); not an 8B model's 32 x 4096^2 (a GiB more in bf16)
HEAD_WEIGHTS_ELEMENTS = 1 << 27


def chunk_elements(device: torch.device) -> int:
    """Elements of one scoring block on ``device`` (``CHUNK_ELEMENTS``, ``GPU_CHUNK_ELEMENTS`` on CUDA)."""
    return GPU_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CHUNK_ELEMENTS


def scoring_chunk(nodes: int, seen: int, d: int, budget: int, fused: bool) -> int:
    """Token rows per scoring chunk of a layer span with ``nodes`` downstream nodes reading ``seen`` upstream
    nodes, within ``budget`` elements per block. The stacked gradients G ``[nodes, c, d]`` always exist; on
    the torch path the contributions of the upstream groups scored together ``[<= seen, c, d]`` too (the
    fused ``score_edges`` kernels make them on chip): there deep graphs keep ``MIN_CHUNK_ROWS`` rows and batch
    fewer groups instead."""
    if fused:
        return max(1, budget // (nodes * d))
    return max(1, budget // (max(nodes, seen) * d), min(MIN_CHUNK_ROWS, budget // (nodes * d)))


def scoring_chunks(nodes: int, seen: int, d: int, budget: int, fused: bool, split: int = 1) -> tuple[int, int]:
    """``(chunk, sub)``: token rows per chunk of the stacked gradients G, and per scoring call within it. G's chunk
    is the fused path's on every path (the residual gradients and the per-chunk bookkeeping run on as few, long
    chunks as the budget allows); the torch path scores it in sub-chunks its contribution block fits — a whole
    number of them per chunk, so the scoring calls see the same token boundaries as with chunks of ``sub`` — and,
    where its products are split over ``split`` token blocks (``ops.score_edges_into``), a multiple of ``split``
    rows (when it has that many)."""
    sub = scoring_chunk(nodes, seen, d, budget, fused)
    if not fused and sub > split > 1:
        sub -= sub % split
    return max(sub, scoring_chunk(nodes, seen, d, budget, True) // sub * sub), sub


def _input_ids(batch: dict) -> torch.Tensor:
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CTFastError(f"the batch has no 'input_ids' tensor (keys: {keys}); pass a tokenized HF batch")
    return batch["input_ids"]


def model_inputs(batch: dict) -> dict:
    """The keys of ``batch`` that go to the model (task fields such as answer ids stay out), and
    ``use_cache=False``: a training forward needs no KV cache (HF builds one by default: a copy of every layer's
    keys and values, two launches per layer, held as long as the output)."""
    _input_ids(batch)
    return {**{k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and v is not None}, "use_cache": False}


def valid_tokens(batch: dict) -> torch.Tensor:
    """Bool ``[B, T]``: the non-padding tokens (``attention_mask``, or all)."""
    ids = _input_ids(batch)
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if mask.shape != ids.shape:
        raise CTFastError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}: ct_fast takes "
                          "the 2-D [B, T] padding mask tokenizers give (1: token, 0: padding); 4-D masks (custom "
                          "attention patterns) are not supported")
    return mask.bool()


# ---- metrics ------------------------------------------------------------------------------------

def _answer_logits(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    for key in ("target_pos", "answer", "wrong_answer"):
        if key not in batch:
            raise CTFastError(
                f"this metric needs batch[{key!r}] ([B] long): 'target_pos' is the position whose logits "
                "predict the answer, 'answer'/'wrong_answer' the correct and incorrect token ids"
            )
    target = check_target_pos(batch)
    rows = torch.arange(logits.shape[0], device=logits.device)
    at = logits[rows, target.to(logits.device)].float()
    return at, rows


def check_target_pos(batch: dict) -> torch.Tensor:
    """``batch["target_pos"]`` as a ``[B]`` long tensor; on the host (no device read) also checked to point at a
    non-padding token of each example — a negative or padded position would silently read another logit."""
    ids = _input_ids(batch)
    target = torch.as_tensor(batch["target_pos"])
    if target.shape != ids.shape[:1] or target.is_floating_point() or target.dtype == torch.bool:
        raise CTFastError(f"target_pos has shape {tuple(target.shape)} and dtype {target.dtype}: expected one "
                          f"integer position per example ([{ids.shape[0]}] long)")
    if target.device.type == "cpu":
        bad = ((target < 0) | (target >= ids.shape[1])).nonzero().flatten().tolist()
        mask = batch.get("attention_mask")
        if not bad and mask is not None and mask.device.type == "cpu":
            bad = (mask[torch.arange(ids.shape[0]), target] == 0).nonzero().flatten().tolist()
        if bad:
            raise CTFastError(f"target_pos of examples {bad[:8]} ({target[bad[:8]].tolist()}) is not a token of "
                              f"its example (positions 0..{ids.shape[1] - 1}, not padding)")
    return target.long()


def logit_diff(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean over the batch of ``logit[answer] - logit[wrong_answer]`` at ``target_pos`` (to maximise)."""
    at, rows = _answer_logits(logits, batch)
    return (at[rows, batch["answer"]] - at[rows, batch["wrong_answer"]]).mean()


def logprob_diff(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean over the batch of ``log p(answer) - log p(wrong_answer)`` at ``target_pos`` (to maximise)."""
    at, rows = _answer_logits(logits, batch)
    lp = at.log_softmax(-1)
    return (lp[rows, batch["answer"]] - lp[rows, batch["wrong_answer"]]).mean()


METRICS = {"logit_diff": logit_diff, "logprob_diff": logprob_diff}


def evaluate_metric(metric, output, batch: dict) -> torch.Tensor:
    """The scalar metric of a model output: ``"loss"`` (needs labels), a name in METRICS, or a callable."""
    if metric == "loss":
        if output.loss is None:
            raise CTFastError("metric='loss' needs 'labels' in the batch (e.g. labels = input_ids with -100 on padding)")
        return output.loss
    fn = METRICS.get(metric, metric) if isinstance(metric, str) else metric
    if not callable(fn):
        raise CTFastError(f"unknown metric {metric!r}: use 'loss', one of {sorted(METRICS)} or a callable (logits, batch) -> scalar")
    value = fn(output.logits, batch)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise CTFastError(f"the metric must return a scalar tensor, got {type(value).__name__}")
    return value.reshape(())


# ---- token rows (positions, pooling) -----------------------------------------------------------

class TokenRows:
    """Maps ``[B, T, w]`` tensors to the rows that are scored: the positions P (``[n_P, w]``), or with
    ``pool=True`` their per-example means (``[B, w]``)."""

    def __init__(self, positions: torch.Tensor, pool: bool):
        self.pool = pool
        self.flat = positions.reshape(-1).nonzero().squeeze(1)  # [n_P] flat token indices
        self.every = self.flat.numel() == positions.numel()  # every token is scored: rows are views, not copies
        counts = positions.sum(1)
        self.example = self.flat // positions.shape[1]  # [n_P] example of each row
        self.weight = (1.0 / counts.float())[self.example]  # [n_P] pooling weights
        self.batch_size = positions.shape[0]

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, w]`` -> ``[n_P, w]`` (the tokens at the positions; a view when every token is scored)."""
        rows = x.reshape(-1, x.shape[-1])
        return rows if self.every else rows.index_select(0, self.flat.to(x.device))

    def pool_rows(self, rows: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``[..., c, w]`` rows ``start..start+c`` of the selection -> per-example means ``[..., B, w]``."""
        c = rows.shape[-2]
        ex = self.example[start:start + c].to(rows.device)
        wt = self.weight[start:start + c].to(rows.device, torch.float32)
        out = rows.new_zeros(*rows.shape[:-2], self.batch_size, rows.shape[-1], dtype=torch.float32)
        return out.index_add_(-2, ex, rows.float() * wt[:, None])

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x [B, T, w]`` as scored: selected, then pooled when pooling."""
        rows = self.select(x)
        return self.pool_rows(rows) if self.pool else rows


def check_token_budget(token_budget, pool: bool):
    """``token_budget``: None, or a whole number >= 1 of positions to score (not with ``pool``)."""
    if token_budget is None:
        return
    from .circuit import is_whole_number

    if not is_whole_number(token_budget) or token_budget < 1:
        raise CTFastError(f"token_budget must be None or a whole number >= 1 of positions, got {token_budget!r}")
    if pool:
        raise CTFastError("token_budget cannot be combined with pool=True (pooled scoring reads every target position)")


def resolve_positions(batch: dict, positions) -> torch.Tensor:
    """Bool ``[B, T]`` of scored positions: ``positions`` (a mask, a batch key, a callable, or None for all
    non-padding tokens) restricted to non-padding tokens; every example must keep at least one."""
    valid = valid_tokens(batch)
    if positions is None:
        pos = valid
    else:
        if isinstance(positions, str):
            if positions not in batch:
                raise CTFastError(f"positions={positions!r} names no batch key (keys: {sorted(batch)})")
            positions = batch[positions]
        elif callable(positions):
            positions = positions(batch)
        positions = torch.as_tensor(positions, device=valid.device)
        if positions.shape != valid.shape:
            raise CTFastError(
                f"positions has shape {tuple(positions.shape)} but the batch is {tuple(valid.shape)}; pass a "
                "bool [B, T] mask (True at the positions to score)"
            )
        if positions.is_floating_point() or positions.is_complex():  # (0.3 would read as True)
            raise CTFastError(f"positions is a {positions.dtype} tensor; pass a bool [B, T] mask (True at the "
                              "positions to score)")
        pos = positions.bool() & valid
    empty = (~pos.any(1)).nonzero().flatten().tolist()
    if empty:
        raise CTFastError(
            f"examples {empty[:8]} have no valid (non-padding) token among the positions; every example needs "
            "at least one position to score — check the positions mask against the attention_mask"
        )
    return pos


# ---- scores ------------------------------------------------------------------------------------

def _no_autocast(method):
    """Run a scoring method (of an object with ``raw``, the scores' buffer) outside any autocast the caller's forward
    or backward runs under: its products run in the dtypes scoring chooses (fp32 on the exact path) — autocast made
    them bf16, and the mean-ablation centring magnified that rounding (8% of the top score on GPT-2)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        device = self.raw.device.type
        if not torch.is_autocast_enabled(device):
            return method(self, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return method(self, *args, **kwargs)
    return run


@dataclass
class EdgeScores:
    """Edge scores ``[n_up, n_down]`` (float32, exactly 0 on non-edges) with the graph naming its axes."""

    scores: torch.Tensor
    graph: ComputationGraph

    def top_n(self, n: int, method: str = "edges", threshold: float = 0.0):
        """The circuit of the top ``n`` edges (``method="nodes"``: ranked by ``|S| * rowsum * colsum``)."""
        from .circuit import select_circuit
        return select_circuit(self, n, method=method, threshold=threshold)

    def edge(self, upstream: str, downstream: str) -> float:
        return float(self.scores[self.graph.up_index[upstream], self.graph.down_index[downstream]])


@dataclass
class LayerPlan:
    """How one downstream layer (or a span of consecutive layers scored together) is scored, fixed per graph
    (host data only, built once).

    The span's downstream nodes occupy graph columns ``col0 .. col0 + n_nodes`` (the rows of the stacked
    gradient block ``G [n_nodes, c, d]``). ``blocks``: ``(offset, n, groups)`` node ranges of G, each
    filled by one or more taps (a split MLP head reads through gate and up: their gradients are summed
    before the norm backward). ``norms``: ``(norm, a, b)`` G rows that one norm's backward maps to the
    residual. ``ups``: ``(k, a)`` — upstream group k is read by G rows ``a:`` (a suffix: nodes are in
    residual order, so a writer is seen by a tail of the span's readers). ``layer``: the span's first layer;
    ``edges``: the graph edges into its nodes.
    """

    layer: int
    col0: int
    n_nodes: int
    blocks: list
    norms: list
    ups: list
    taps: int
    edges: int

    @property
    def tap_keys(self) -> set:
        return {g.tap for _, _, gs in self.blocks for g in gs}


def layer_plans(graph: ComputationGraph, span: int = 1) -> dict[int, LayerPlan]:
    """``{first layer: LayerPlan}`` of every downstream layer, or of every ``span`` consecutive layers counted
    from the last (scored together: each upstream contribution is produced once per span instead of once per
    layer, while the span's gradients are held). Cached on the graph."""
    cache = graph.__dict__.setdefault("_layer_plans", {})
    if span in cache:
        return cache[span]
    plans = {}
    layers = sorted({g.layer for g in graph.downstream_groups}, reverse=True)
    for i in range(0, len(layers), span):
        these = set(layers[i:i + span])
        layer = min(these)
        groups = [g for g in graph.downstream_groups if g.layer in these]
        col0 = min(g.first for g in groups)
        by_first: dict[int, list] = {}
        for g in groups:
            by_first.setdefault(g.first, []).append(g)
        blocks = [(first - col0, len(gs[0].names), gs) for first, gs in sorted(by_first.items())]
        n_nodes = sum(n for _, n, _ in blocks)
        if sorted(by_first) != [col0 + off for off, _, _ in blocks] or any(
                off != sum(n for _, n, _ in blocks[:i]) for i, (off, _, _) in enumerate(blocks)):
            raise AssertionError(f"downstream nodes of layers {sorted(these)} are not contiguous columns")
        norms: list = []
        for off, n, gs in blocks:
            if norms and norms[-1][0] == gs[0].norm:
                norms[-1][2] = off + n
            else:
                norms.append([gs[0].norm, off, off + n])
        read = [gs[0].read_pos for _, n, gs in blocks for _ in range(n)]
        ups = []
        for k, ug in enumerate(graph.upstream_groups):
            seen = [r > ug.write_pos for r in read]
            if any(seen):
                a = seen.index(True)
                if not all(seen[a:]):
                    raise AssertionError("a writer must be seen by a suffix of a layer's readers")
                ups.append((k, a))
        taps = len({g.tap for g in groups})  # GPT-2's q, k and v share one tap (the fused c_attn output)
        edges = int(graph.edge_mask[:, col0:col0 + n_nodes].sum())
        plans[layer] = LayerPlan(layer, col0, n_nodes, blocks, [tuple(x) for x in norms], ups, taps, edges)
    cache[span] = plans
    return plans


class EdgeScorer:
    """Accumulates signed edge sums ``sum (a_u - a~_u) . g_d`` from the backward taps, layer by layer.

    ``sources[k]`` are the scored rows of upstream group k's compact tensor (a view of what the forward
    produced whenever every token is scored), scored as they are; with mean ablation ``node_means``
    (``[n_up, d]``: each upstream node's mean contribution in residual space) centres them afterwards, once
    per scored span: ``sum_t (a_t - m) . g_t = sum_t a_t . g_t - m . sum_t g_t``, and ``sum_t g_t`` is summed
    anyway (``grad_sum``) — no centred copy and no subtraction per chunk and group. ``resid`` the rows of the
    residual each norm reads. Gradients of one layer are buffered until all its taps have fired, scored against
    every earlier upstream group in token chunks, and dropped; a source, a residual and a cast weight are
    dropped as soon as the last layer that reads them is scored. The per-layer work (``layer_plans``) is
    fixed per graph: the scoring loop issues kernels only, no host synchronisation.
    ``score_dtype``: fp32 (exact) or bf16/fp16 (tensor-core operands, fp32 accumulation). ``on_scored(plan)``:
    called after each layer is scored (``ct_fast.pruning``). ``stack``: ``(rows [S, n_rows, d], {group: slot})``,
    the residual-vector sources captured into one buffer (``AttributionRun._stack_keys``): on the torch path they
    are scored straight from it (``_accumulate_stacked``), the other groups through the contributions block, each
    span's sums gathered in a block whose rows put the stacked sources last (``_rows``), folded into ``raw`` once.
    With stacked sources the attention groups' rows follow on too, and consecutive layers' heads scored together
    are one batch (``_head_runs``: their rows of a sub-chunk copied side by side, one launch, their output
    projections stacked once per backward) instead of a GEMM per layer (``head_slots``, ``HEAD_WEIGHTS_ELEMENTS``).
    """

    def __init__(self, model: nn.Module, graph: ComputationGraph, rows: TokenRows, sources: list,
                 node_means: torch.Tensor | None, resid: dict, raw: torch.Tensor, factor: float = 1.0,
                 score_dtype: torch.dtype = torch.float32, timer: PhaseTimer | None = None, on_scored=None,
                 stack: tuple | None = None, modules: dict | None = None):
        self.graph, self.rows, self.sources, self.resid, self.raw = graph, rows, sources, resid, raw
        self.node_means = node_means
        self.edge_mask = graph.edge_mask_on(raw.device, torch.float32) if node_means is not None else None
        self.factor, self.score_dtype, self.timer, self.on_scored = factor, score_dtype, timer, on_scored
        self.plans = layer_plans(graph, SCORE_SPAN)
        self.modules = modules = modules if modules is not None else dict(model.named_modules())
        self.norms = {g.norm: modules[g.norm] for g in graph.downstream_groups if g.norm}
        self.up_weight: dict[int, torch.Tensor | None] = {}  # cast once per step, dropped after the last reader
        self.layer_of_tap = {tap: plan.layer for plan in self.plans.values() for tap in plan.tap_keys}
        self.readers_left = [0] * len(graph.upstream_groups)
        for plan in self.plans.values():
            for k, _ in plan.ups:
                self.readers_left[k] += 1
        self.pending: dict[int, dict] = {}
        self.layers_left = len(self.plans)
        self.scored: set[int] = set()  # layers whose gradients have been scored (each forward's backward once)
        self._buffers: dict = {}
        self.budget = chunk_elements(raw.device)
        # the kernels of this backward, chosen once: fused scoring (contributions made on chip), and the fused
        # residual-gradient kernel (Triton; not with pooled positions)
        self.fused = ops.choose_backend("score_edges", raw.device, (score_dtype,)) != "torch"
        self.fused_residual = not rows.pool and ops.choose_backend("residual_grads", raw.device,
                                                                   (score_dtype,)) == "triton"
        # the torch path's score products: split over token blocks where measured faster (one GEMM elsewhere)
        self.product_split = 1 if self.fused else ops.measured.product_split(score_dtype, raw.device)
        # sum over scored rows of each downstream node's gradient [n_down, d]: corrects per-micro-batch means
        self.grad_sum = raw.new_zeros(raw.shape[1], graph.d_model)
        self.stack, self.slots = stack if stack is not None else (None, {})  # (begin() stacks on the torch path only)
        self._rows, self._fold = _stacked_order(graph, self.slots, raw.device)
        self.head_slots = _head_slots(graph, self.modules) if self.slots and not self.fused else {}
        self._head_groups = sorted(self.head_slots, key=self.head_slots.get)
        self._stacked_weights: torch.Tensor | None = None  # [S * heads, w, d]: their writers (_head_weights)

    @_no_autocast
    def on_grad(self, key, grad: torch.Tensor):
        """Tap callback: keep the scored rows of this gradient; score the layer once it is complete."""
        layer = self.layer_of_tap[key]
        if layer in self.scored:
            raise CTFastError(
                "a second backward through one recorded forward (retain_graph=True, or two losses of one forward "
                "backwarded one by one): attribution scores each forward's backward once, and this forward's "
                "activations are gone — backward the sum of the losses instead ((loss_a + loss_b).backward()), "
                "or run a forward per backward")
        with self._span():
            self.pending.setdefault(layer, {})[key] = self.rows.select(grad.detach())
            complete = len(self.pending[layer]) == self.plans[layer].taps
            if complete:
                self._score_layer(self.plans[layer], self.pending.pop(layer))
        if complete and self.on_scored is not None:
            self.on_scored(self.plans[layer])

    @_no_autocast
    def flush(self):
        """Score layers whose taps did not all fire (their missing gradients are zero)."""
        for layer in sorted(self.pending, reverse=True):
            with self._span():
                self._score_layer(self.plans[layer], self.pending.pop(layer))
            if self.on_scored is not None:
                self.on_scored(self.plans[layer])

    def _span(self):
        return self.timer.span("attribution") if self.timer is not None else contextlib.nullcontext()

    def _weight(self, projection, dtype) -> torch.Tensor | None:
        if projection is None:
            return None
        return projection.heads_weight(current_weight(self.modules, projection.weight)).to(dtype)

    def _buffer(self, name: str, shape, dtype) -> torch.Tensor:
        """A ``shape`` view of a scratch buffer kept for the whole backward (grown, never shrunk): large fresh
        allocations cost page faults on CPU; the chunked scoring loop reuses a few buffers instead."""
        n = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(name, dtype)] = torch.empty(n, dtype=dtype, device=self.raw.device)
        return buf[:n].view(shape)

    def _score_layer(self, plan: LayerPlan, grads: dict):
        """Score ``plan``'s layer against all earlier writers, in token chunks, then drop what is done.

        Per chunk the residual gradients of all the layer's nodes are stacked once (``[n, c, d]``); each
        upstream group's contributions are then produced once and dotted with every node that reads it."""
        sdt = self.score_dtype
        for k, _ in plan.ups:
            if k not in self.up_weight and k not in self.head_slots:
                self.up_weight[k] = self._weight(self.graph.upstream_groups[k].writer, sdt)
        down_weight = {g.index: self._weight(g.reader, sdt) for _, _, gs in plan.blocks for g in gs}
        stats = {}  # each norm's per-row statistics over all scored rows, made once per span (``_norm_stats``)
        folded, runs = self._fold_norm_weights(plan, down_weight, stats)
        n_rows = next(iter(grads.values())).shape[0]
        seen = sum(len(self.graph.upstream_groups[k].names) for k, _ in plan.ups if k not in self.slots)
        chunk, sub = scoring_chunks(plan.n_nodes, seen, self.graph.d_model, self.budget, self.fused,
                                    self.product_split)
        cols = slice(plan.col0, plan.col0 + plan.n_nodes)
        if self.stack is not None:  # this span's sums, rows in the stacked order (see the class)
            self._sums = self._buffer("sums", (self.raw.shape[0], plan.n_nodes), torch.float32).zero_()
        pooled = []
        for start in range(0, n_rows, chunk):
            stop = min(n_rows, start + chunk)
            G, sums = self._residual_grads(plan, grads, down_weight, start, stop, stats, folded, runs)
            if self.rows.pool:
                pooled.append(self.rows.pool_rows(G, start))
            else:
                for a in range(start, stop, sub):
                    self._accumulate(plan, G[:, a - start:min(stop, a + sub) - start], a, min(stop, a + sub))
                if self.stack is not None:
                    self._accumulate_stacked(plan, G, start, stop)
                self.grad_sum[cols].add_(G.sum(1, dtype=torch.float32) if sums is None else sums)  # (no setitem copy)
        if self.stack is not None:
            self.raw[:, cols].add_(self._sums.index_select(0, self._fold))
        if self.rows.pool:
            G = torch.stack(pooled).sum(0)
            self._accumulate(plan, G, 0, G.shape[1])
            self.grad_sum[cols].add_(G.sum(1))
        if self.node_means is not None:  # centre: raw[u, d] -= factor * m_u . sum_t g_d (on the span's edges)
            self.raw[:, cols].addcmul_(self.node_means @ self.grad_sum[cols].t(), self.edge_mask[:, cols],
                                       value=-self.factor)
        for norm, _, _ in plan.norms:
            self.resid.pop(norm, None)
        for k, _ in plan.ups:
            self.readers_left[k] -= 1
            if self.readers_left[k] == 0:  # no later layer reads this writer: drop its rows and weight
                self.sources[k] = self.up_weight[k] = None
        self.layers_left -= 1
        self.scored.add(plan.layer)
        if self.layers_left == 0:  # the backward has scored every layer: free the scratch buffers now
            self._buffers.clear()
            # the stacked sources are freed together, with the last span (not source by source)
            self.stack = self._stacked_weights = None

    def _fold_norm_weights(self, plan: LayerPlan, down_weight: dict, stats: dict) -> tuple[dict, dict]:
        """``({norm: kind}, runs)``: the span's LayerNorm/RMSNorm norms whose backward the torch path runs folded
        (``_residual_grads``), their weight ``gamma`` multiplied into the projections reading through them
        (``down_weight``, in place), once per span: then the projection writes ``rstd * g`` and the norm backward is
        one reduction and one pass over it. ``runs``: ``{offset: (blocks, W)}`` for each run of consecutive
        one-projection blocks read through one folded norm with heads of one width (a layer's query, key and value
        heads): their folded weights are written side by side into ``W [sum n, w, d]`` (``down_weight`` holds views
        of it), so ``_residual_grads`` makes the run's rows of G with one batched product."""
        if self.fused_residual:
            return {}, {}
        kinds = {norm: ops.reference.norm_kind(self.norms[norm]) for norm, _, _ in plan.norms if norm is not None}
        folded = {norm: kind for norm, kind in kinds.items() if kind != "generic"}
        runs, run = {}, []
        for block in plan.blocks + [(None, 0, ())]:  # (a sentinel ends the last run)
            off, n, groups = block
            w = down_weight[groups[0].index] if len(groups) == 1 else None
            if run and not (w is not None and groups[0].norm == run[0][2][0].norm and off == run[-1][0] + run[-1][1]
                            and w.shape[1:] == down_weight[run[0][2][0].index].shape[1:]):
                if len(run) > 1:
                    runs[run[0][0]] = (run, self._fold_run(run, down_weight, stats))
                run = []
            if w is not None and groups[0].norm in folded:
                run.append(block)
        in_runs = {groups[0].index for blocks, _ in runs.values() for _, _, groups in blocks}
        for _, _, groups in plan.blocks:  # the rest one by one
            for g in groups:
                w = down_weight[g.index]
                if g.norm in folded and w is not None and g.index not in in_runs:
                    down_weight[g.index] = ops.reference.fold_norm_weight(w, self._norm_stats(g.norm, stats)[2])
        return folded, runs

    def _fold_run(self, run: list, down_weight: dict, stats: dict) -> torch.Tensor:
        """The folded weights of ``run``'s blocks (one projection each, one norm) side by side, ``[sum n, w, d]``;
        each block's ``down_weight`` becomes its view."""
        weights = [down_weight[groups[0].index] for _, _, groups in run]
        gamma = self._norm_stats(run[0][2][0].norm, stats)[2]
        W = torch.empty((sum(w.shape[0] for w in weights), *weights[0].shape[1:]), dtype=weights[0].dtype,
                        device=weights[0].device)
        r = 0
        for (_, _, groups), w in zip(run, weights):
            down_weight[groups[0].index] = ops.reference.fold_norm_weight(w, gamma, out=W[r:r + w.shape[0]])
            r += w.shape[0]
        return W

    def _norm_stats(self, norm: str, stats: dict):
        """``norm``'s ``(mean, rstd, gamma)`` over every scored row (``ops.reference.norm_stats``; None for a
        generic norm), made on first use per span: row-wise, so a chunk's are a slice."""
        if norm not in stats:
            module = self.norms[norm]
            generic = ops.reference.norm_kind(module) == "generic"
            stats[norm] = None if generic else ops.reference.norm_stats(module, self.resid[norm])
        return stats[norm]

    def _residual_grads(self, plan: LayerPlan, grads: dict, down_weight: dict, start: int, stop: int,
                        stats: dict, folded: dict, runs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(G, sums)``: ``G [n_nodes, c, d]`` d metric / d x_d of the layer's nodes for scored rows ``start..stop``
        in the scoring dtype, and (fused path) ``sums [n_nodes, d] = G.sum(1)`` in fp32, made while G is written
        (else None).

        Torch path: each block's rows, scaled by the norm's ``rstd`` per row, go through the projections with the
        norm's weight folded in (``folded``: ``_fold_norm_weights``), written straight into G — the norm backward is
        then ``ops.reference.norm_vjp_scaled_`` on each norm's rows (a reduction and one in-place pass; generic
        norms: ``norm_vjp_``). With the fused kernel (``residual_grads`` on Triton, not with pooled positions) each
        block is built through its norm in one kernel pair. The norms' per-row statistics come from ``stats``
        (``_norm_stats``)."""
        sdt, shape, fused = self.score_dtype, (plan.n_nodes, stop - start, self.graph.d_model), self.fused_residual
        G = self._buffer("G", shape, sdt)
        sums = self._buffer("G_sums", (plan.n_nodes, self.graph.d_model), torch.float32) if fused else None
        run = []  # fused: consecutive blocks read through one norm, built together (``_norm_backward``)
        in_run = 0  # torch path: blocks left of a run of folded projections made together (``_project_run``)
        for off, n, groups in plan.blocks:
            if off in runs:
                in_run = len(runs[off][0])
                self._project_run(*runs[off], grads, G, start, stop, stats)
            if in_run:
                in_run -= 1
                continue
            out, terms = G[off:off + n], []
            for g in groups:
                rows = grads.get(g.tap)
                if rows is None:
                    continue
                rows = rows[start:stop]
                w = down_weight[g.index]
                if w is not None:
                    rows = rows[:, g.reader.offset:g.reader.offset + w.shape[0] * w.shape[1]]
                terms.append((rows, w))
            if not terms:
                out.zero_()
                if fused:
                    sums[off:off + n].zero_()
            elif fused:
                norm, single = groups[0].norm, len(terms) == 1 and terms[0][1] is not None  # one projection
                if run and not (single and run[-1][3] and run[0][2] == norm and run[-1][0] + run[-1][1] == off):
                    self._norm_backward(run, G, sums, start, stop, stats)
                    run = []
                run.append((off, n, norm, single, terms))
            else:
                norm = groups[0].norm
                if norm in folded:  # rstd * g, the weights carrying gamma
                    _, rstd, gamma = self._norm_stats(norm, stats)
                    ops.reference.project_scaled(terms, out, rstd[start:stop], gamma, weights_folded=True)
                else:
                    for i, (rows, w) in enumerate(terms):
                        ops.heads_to_residual(rows, w, out=out, accumulate=i > 0, dtype=sdt)
        if run:
            self._norm_backward(run, G, sums, start, stop, stats)
        if not fused:
            for norm, a, b in plan.norms:
                if norm in folded:
                    mean, rstd, _ = self._norm_stats(norm, stats)
                    x_hat = ops.reference.norm_input_hat(
                        self.resid[norm][start:stop], None if mean is None else mean[start:stop], rstd[start:stop],
                        out=self._buffer("x_hat", (stop - start, self.graph.d_model), sdt))
                    ops.reference.norm_vjp_scaled_(G[a:b], x_hat, folded[norm])
                elif norm is not None:
                    ops.norm_vjp_(self.norms[norm], self.resid[norm][start:stop], G[a:b])
        return G, sums

    def _project_run(self, blocks: list, W: torch.Tensor, grads: dict, G: torch.Tensor, start: int, stop: int,
                     stats: dict):
        """The torch path's ``rstd * g`` rows of G for a run of folded one-projection blocks (``_fold_norm_weights``):
        each block's gradient rows scaled by the norm's ``rstd`` into one scratch ``[c, sum n * w]`` (a missing tap:
        zeros), then one batched product with the run's folded weights ``W`` into G's consecutive rows."""
        rstd = self._norm_stats(blocks[0][2][0].norm, stats)[1][start:stop]
        w = W.shape[1]
        rows = self._buffer("run rows", (stop - start, W.shape[0] * w), self.score_dtype)
        col = 0
        for _, n, (g,) in blocks:
            part = rows[:, col:col + n * w]
            tap = grads.get(g.tap)
            if tap is None:
                part.zero_()
            else:
                ops.reference.scale_rows(tap[start:stop, g.reader.offset:g.reader.offset + n * w], rstd, None, out=part)
            col += n * w
        off = blocks[0][0]
        ops.heads_to_residual(rows, W, out=G[off:off + W.shape[0]], dtype=self.score_dtype)

    def _norm_backward(self, run: list, G: torch.Tensor, sums: torch.Tensor, start: int, stop: int, stats: dict):
        """The fused residual gradients of ``run``: consecutive blocks ``(offset, n, norm, single, terms)`` of G read
        through one norm — one ``ops.residual_grads`` call for a block of several projections (an MLP's gate and up),
        one ``ops.residual_grads_blocks`` call (a launch for up to three blocks) for blocks of one projection each
        (a layer's query, key and value heads) — and their rows of ``sums`` (``G.sum(1)``)."""
        norm = run[0][2]
        module, x = (self.norms[norm], self.resid[norm][start:stop]) if norm else (None, None)
        chunk_stats = self._norm_stats(norm, stats) if norm else None
        if chunk_stats is not None:
            mean, rstd, gamma = chunk_stats
            chunk_stats = (None if mean is None else mean[start:stop], rstd[start:stop], gamma)
        rows = slice(run[0][0], run[-1][0] + run[-1][1])
        if len(run) == 1:
            ops.residual_grads(run[0][4], G[rows], module, x, chunk_stats, sums[rows])
        else:
            ops.residual_grads_blocks([terms[0] for *_, terms in run], G[rows], module, x, chunk_stats, sums[rows])

    def _accumulate(self, plan: LayerPlan, G: torch.Tensor, start: int, stop: int):
        """``raw[u, cols] += factor * sum_c dA_u[c] . G[:, c]`` for every upstream group the layer reads.

        On the torch path the contributions of several upstream groups are written into one block and dotted
        with G in one GEMM (G is read once per batch of groups, not once per group); with the fused kernels every
        run of consecutive groups read by the same G rows is one ``score_edges_into`` call (a kernel per group,
        one reduction into ``raw``)."""
        sdt = self.score_dtype
        Gs = G.to(sdt)  # (a no-op but for pooled gradients, fp32)
        per_batch = None if self.fused else max(1, self.budget // (G.shape[1] * self.graph.d_model))  # nodes at once
        batch, nodes, end = [], 0, None
        for k, a in plan.ups:  # consecutive groups read by the same G rows, up to per_batch nodes
            if k in self.slots:  # scored from the stack
                continue
            n = len(self.graph.upstream_groups[k].names)
            full = per_batch is not None and nodes + n > per_batch
            if batch and (batch[0][1] != a or full or self._rows[k] != end):  # score rows must follow on
                self._score_batch(plan, batch, nodes, Gs, start, stop)
                batch, nodes = [], 0
            batch.append((k, a))
            nodes, end = nodes + n, self._rows[k] + n
        if batch:
            self._score_batch(plan, batch, nodes, Gs, start, stop)

    def _out(self, plan: LayerPlan, row: int, nodes: int, a: int) -> torch.Tensor:
        """Where the sums of ``nodes`` upstream nodes from score row ``row`` (``_rows``) with the span's G rows ``a:``
        go: ``raw``'s block, or with stacked sources the span's sums block."""
        if self.stack is not None:
            return self._sums[row:row + nodes, a:]
        return self.raw[row:row + nodes, plan.col0 + a:plan.col0 + plan.n_nodes]

    def _accumulate_stacked(self, plan: LayerPlan, G: torch.Tensor, start: int, stop: int):
        """The stacked residual-vector sources against G (rows ``start..stop``): each run of consecutive slots read
        by the same G rows is one GEMM straight from the stack buffer (a strided ``[n, c * d]`` matrix; split over
        token blocks as ``product_split`` says), its sums added to consecutive rows of the span's block."""
        sdt, s = self.score_dtype, self.product_split
        split = s > 1 and (stop - start) % s == 0  # K over token blocks, as the contributions' products
        G2 = G.reshape(G.shape[0], s, -1) if split else G.flatten(1)  # (in the scoring dtype)
        for k, slot, n, a in _stacked_runs(plan, self.slots):
            R = self.stack[slot:slot + n, start:stop].to(sdt)
            product = (ops.gemm.split_mm(R.reshape(n, s, -1), G2[a:]) if split else
                       ops.gemm.mm(R.flatten(1), G2[a:].t()))
            self._out(plan, self._rows[k], n, a).add_(product, alpha=self.factor)

    def _source(self, k: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start..stop`` of upstream group k's source, in the scoring dtype (uncentred: see the class)."""
        rows = self.sources[k][start:stop]
        return rows if rows.dtype == self.score_dtype else rows.to(self.score_dtype)

    def _score_batch(self, plan: LayerPlan, batch: list, nodes: int, Gs: torch.Tensor, start: int, stop: int):
        """Score upstream groups ``batch`` (all read by G rows ``a:``, their raw rows following on) against the
        layer's gradients: one ``score_edges_into`` call (on the torch path its contributions go to a scratch
        buffer kept for the backward)."""
        a = batch[0][1]
        workspace = None if self.fused else self._buffer("contributions", (nodes, stop - start, self.graph.d_model),
                                                         self.score_dtype)
        sources = [(self._source(k, start, stop), self.up_weight[k]) if slot is None else
                   self._head_run(k, slot, n, start, stop) for k, slot, n in self._head_runs(batch)]
        ops.score_edges_into(self._out(plan, self._rows[batch[0][0]], nodes, a), sources, Gs[a:],
                             alpha=self.factor, workspace=workspace, split=self.product_split)

    def _head_runs(self, batch: list) -> list[tuple[int, int | None, int]]:
        """``(group, slot, n)`` per source of a batch: a run of ``n`` attention groups in consecutive slots from
        ``group``'s (their rows follow on, as a batch's groups do), else ``(group, None, 1)``."""
        return [run[:3] for run in _slot_runs([(k, self.head_slots.get(k), None) for k, _ in batch])]

    def _head_run(self, k: int, slot: int, n: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [n * heads, c, w], W [n * heads, w, d])`` of the attention groups in slots ``slot .. slot + n`` (from
        group k) at rows ``start..stop``: their rows copied side by side (one launch), seen as one batch of heads
        (head j of group i at column ``(i * heads + j) * w``: one stride), and their stacked writer weights."""
        W = self._head_weights()
        heads, w = W.shape[0] // len(self.head_slots), W.shape[1]
        if n == 1:  # one layer's heads: its rows as they are
            return self._source(k, start, stop), W[slot * heads:(slot + 1) * heads]
        rows = [self.sources[g][start:stop] for g in self._head_groups[slot:slot + n]]
        z = torch.stack(rows, 1, out=self._buffer("head rows", (stop - start, n, heads * w), self.score_dtype))
        return z.as_strided((n * heads, stop - start, w), (w, n * heads * w, 1)), W[slot * heads:(slot + n) * heads]

    def _head_weights(self) -> torch.Tensor:
        """The attention groups' writer weights ``[S * heads, w, d]`` in the scoring dtype, slot-major, made at the
        first use and kept for the backward (the weights do not change inside it)."""
        if self._stacked_weights is None:
            weights = [self._weight(self.graph.upstream_groups[k].writer, self.score_dtype) for k in self._head_groups]
            self._stacked_weights = torch.cat(weights)
        return self._stacked_weights


class AttributionRun:
    """One attribution over one or more (micro-)batches: forward with capture, backward with taps.

    Example (what ``attribute`` does)::

        run = AttributionRun(model, graph, ablation="mean")
        metric = run.forward(batch, metric="loss")
        run.backward(metric)               # activations-only backward; params=... also returns dW
        edge_scores = run.scores()
    """

    def __init__(self, model: nn.Module, graph: ComputationGraph, ablation: str = "mean",
                 positions=None, pool: bool = False, token_budget: int | None = None, budget_seed: int = 0,
                 score_dtype: torch.dtype | None = None, timer: PhaseTimer | None = None):
        if ablation not in ABLATIONS:
            raise CTFastError(f"ablation={ablation!r} is not one of {ABLATIONS}")
        check_token_budget(token_budget, pool)
        self.token_budget, self._budget_calls = token_budget, 1000003 * budget_seed
        self.model, self.graph, self.ablation, self.positions, self.pool = model, graph, ablation, positions, pool
        self.raw = torch.zeros(len(graph.upstream_nodes), len(graph.downstream_nodes), dtype=torch.float32,
                               device=next(model.parameters()).device)
        self.batch_size = 0
        self.score_dtype = score_dtype or scoring_dtype(next(model.parameters()))
        self.timer = timer
        self.on_layer_scored = None  # called with each LayerPlan once scored (ct_fast.pruning.CandidatePruner)
        self.max_backwards: int | None = None  # refuse a backward beyond this many (its driver promised so)
        self.refused: str | None = None  # why a backward was refused: the step is refused too (until reset)
        # mean ablation over several micro-batches: per micro-batch (node means [n_up, d], tokens, budget factor,
        # gradient sums [n_down, d]) so that scores() can re-centre every micro-batch on the global mean
        self._means: list = []
        self._modules = dict(model.named_modules())
        self._committed: list = []  # recordings whose backward has begun
        self._recording = None  # forward()'s recording, for backward()
        self.closed = False
        self.up_keys = [g.capture for g in graph.upstream_groups]
        self.resid_keys = sorted({(g.norm, "input") for g in graph.downstream_groups if g.norm})
        self.mlp_residuals = _mlp_residuals(graph)
        self.tap_keys = sorted({g.tap for g in graph.downstream_groups})

    def forward(self, batch: dict, metric="loss", corrupted_batch: dict | None = None):
        """Run the model on ``batch`` with capture and taps; return ``(output, metric value)``."""
        recording = self.begin(batch, corrupted_batch)
        try:
            output = self.model(**model_inputs(batch))
        finally:
            self.end(recording)
        self._recording = recording
        return output, evaluate_metric(metric, output, batch)

    def begin(self, batch: dict, corrupted_batch: dict | None = None, anchor: torch.Tensor | None = None):
        """Start recording the model's next forward on ``batch`` (its capture and taps are installed until
        ``end``); the forward may be the caller's own. Returns the ``Recording``; it counts in this run
        (examples, ablation mean, scores) from the moment its backward reaches a tap."""
        pos = resolve_positions(batch, self.positions)
        pos, factor = self._budget(pos)
        rows = TokenRows(pos, self.pool)
        baseline = self._baseline(batch, corrupted_batch)
        # whole-MLP outputs of an fp32 model are read as residual differences (no capture of their own)
        derived = {} if (rows.pool or baseline is not None or next(self.model.parameters()).dtype != torch.float32
                         ) else self.mlp_residuals
        store = {k for i, k in enumerate(self.up_keys) if i not in derived} | set(self.resid_keys)
        store |= {key for pair in derived.values() for key in pair}
        stack = self._stack_keys(derived) if not rows.pool and baseline is None else []
        capture = Capture(self.model, store=store, taps=self.tap_keys, anchor=anchor, stack=stack,
                          modules=self._modules)
        capture.__enter__()
        return Recording(self, capture, rows, derived, baseline, factor, valid_tokens(batch).reshape(-1))

    @_no_autocast
    def end(self, recording: "Recording"):
        """The recorded forward is done: remove its hooks and prepare the scorer its backward feeds."""
        cap, rows, derived, baseline = recording.capture, recording.rows, recording.derived, recording.baseline
        cap.__exit__(None, None, None)
        stored = cap.stored
        if not stored:  # the forward did not run (it raised)
            return
        missing = set(self.tap_keys) - cap.tapped
        if missing:  # their gradients would never come: scored as zeros
            raise CTFastError(f"{len(missing)} attribution taps saw no autograd during the forward (e.g. "
                              f"{sorted(missing)[0][0]}): reentrant activation checkpointing runs layers under "
                              "no_grad — use ct_fast.enable_activation_checkpointing(model) or "
                              "gradient_checkpointing_kwargs={'use_reentrant': False}")
        valid = recording.valid
        stack = _stack_rows(cap, rows, self.up_keys)
        cap.stack_buffer = None  # what is scored holds it (a view), or its gathered rows (a subset of positions)
        sources = []
        if self.ablation == "mean":  # each source's mean (a derived one: the difference of its two tensors')
            parts = [derived[i] if i in derived else (key,) for i, key in enumerate(self.up_keys)]
            means = iter(self._token_means([stored[k] for keys in parts for k in keys], valid))
            shifts = [next(means) - next(means) if len(keys) == 2 else next(means) for keys in parts]
        for i, key in enumerate(self.up_keys):
            if i in derived:
                after, before = (stored[k] for k in derived[i])
                sources.append(_Difference(rows.select(after), rows.select(before)))
                continue
            if stack is not None and i in stack[1]:
                sources.append(stack[0][stack[1][i]])
                continue
            sources.append(rows.compact(stored[key] if baseline is None else stored[key] - baseline[key]))
        node_means = None
        if self.ablation == "mean":
            recording.means = self._node_means(shifts)
            if rows.pool:  # pooled rows are per-example means: centre them now (they are small)
                sources = [s - m for s, m in zip(sources, shifts)]
            else:  # the scorer centres its sums once per span
                node_means = recording.means
        resid = {k[0]: rows.select(stored[k]) for k in self.resid_keys}
        stored.clear()
        recording.baseline = None
        recording.scorer = EdgeScorer(self.model, self.graph, rows, sources, node_means, resid, self.raw,
                                      recording.factor, self.score_dtype, self.timer, self.on_layer_scored, stack,
                                      self._modules)
        cap.on_grad = recording.on_grad  # the taps call it through the capture

    def _stack_keys(self, derived: dict) -> list:
        """The capture keys of the residual-vector sources (embeddings, whole-MLP outputs: no writer weight) to stack
        in one buffer — on the torch scoring path, which then scores them straight from it, one GEMM per run of them
        and token chunk, instead of copying each into the contributions block per sub-chunk (a launch per source and
        sub-chunk). At least two, or none."""
        if ops.choose_backend("score_edges", self.raw.device, (self.score_dtype,)) != "torch":
            return []
        keys = [self.up_keys[k] for k in sorted(residual_vector_groups(self.graph)) if k not in derived]
        return keys if len(keys) >= 2 and len(set(keys)) == len(keys) else []

    def _commit(self, recording: "Recording"):
        """A recorded forward's backward has begun: count its examples and tokens, keep its scorer to flush."""
        if self.max_backwards is not None and len(self._committed) >= self.max_backwards:
            self.refused = (
                f"backwards_per_step={self.max_backwards}, but backward {len(self._committed) + 1} began before the "
                "optimizer's step() (gradient accumulation?): the weight gradients this step already pruned cannot "
                "serve it, so the step is refused (zero_grad() starts it over). Pass backwards_per_step=None (or "
                "your number of backwards per step) when building the optimizer")
            raise CTFastError(self.refused)
        self.batch_size += recording.rows.batch_size
        if self.ablation == "mean":
            self._means.append([recording.means, int(recording.valid.sum()), recording.factor,
                                recording.scorer.grad_sum])
        self._committed.append(recording)

    def reset(self):
        """Forget every counted backward (``zero_grad``): scores, examples, ablation means. Forwards whose
        backward has not begun yet still count when it does."""
        self.raw.zero_()
        self.batch_size = 0
        self._means.clear()
        self._committed.clear()
        self.refused = None

    def close(self):
        """Stop scoring: later backwards through recorded forwards (a retained graph) reach inert taps."""
        self.closed = True

    @property
    def committed(self) -> int:
        """Recorded forwards whose backward has begun (``observe``d batches not included)."""
        return len(self._committed)

    def observe(self, batch: dict):
        """Count a micro-batch whose metric has no gradient (e.g. no label token of the training loss): its
        examples join the ``1/B`` normalisation and its tokens the mean ablation, as in one whole batch; it
        adds nothing to the signed sums (a no-grad forward, no backward)."""
        pos = resolve_positions(batch, self.positions)
        cap = Capture(self.model, store=set(self.up_keys), modules=self._modules)
        with cap, torch.no_grad():
            self.model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"})
        if self.ablation == "mean":
            valid = valid_tokens(batch).reshape(-1)
            means = self._node_means(self._token_means([cap.stored[k] for k in self.up_keys], valid))
            self._means.append([means, int(valid.sum()), 1.0, self.raw.new_zeros(self.raw.shape[1], self.graph.d_model)])
        self.batch_size += pos.shape[0]

    def backward(self, metric: torch.Tensor, params=(), scale: float = 1.0, retain_graph: bool = False):
        """Backward of ``scale * metric`` through the taps; returns the gradients of ``params`` (if any).

        With no ``params`` no weight gradient is computed (only what reaches the taps). After it the taps
        are inert, so a second backward over a retained graph (the training loss) scores nothing."""
        recording, self._recording = self._recording, None
        if recording is None:
            raise CTFastError("AttributionRun.backward() needs a forward() first (one backward per forward)")
        if not metric.requires_grad:
            raise CTFastError("the metric does not depend on the model's output (no gradient reaches it): a metric "
                              "callable must compute its value from the logits it is given")
        if not torch.isfinite(metric.detach()).all():
            raise NonFiniteError(f"the metric is {metric.item()} (non-finite): the step is refused, "
                                 "the model is untouched — check the inputs, labels (all -100: no loss to score) and "
                                 "learning rate")
        params = list(params)
        try:
            grads = torch.autograd.grad(scale * metric, [recording.capture.anchor] + params, allow_unused=True,
                                        retain_graph=retain_graph)
            self.flush()
        finally:
            recording.capture.on_grad = None
        return list(grads[1:])

    def flush(self):
        """Finish the backwards that have run: score layers whose taps did not all fire (zero gradients)."""
        for recording in self._committed:
            recording.scorer.flush()

    @_no_autocast
    def scores(self, data_parallel=None) -> EdgeScores:
        """``|raw / B|`` on edges, exactly 0 elsewhere; refuses non-finite scores.

        With mean ablation over several micro-batches, each was scored against its own mean m_i; since
        ``sum_t (a - m) . g = sum_t (a - m_i) . g + (m_i - m) . sum_t g``, adding the second term re-centres
        them all on the mean of the whole batch, as if it had been one batch. ``data_parallel``
        (``ct_fast.distributed.DataParallel``): the scores of the global batch over all ranks."""
        self.flush()
        raw, batch_size = self.raw, self.batch_size
        done = self._means
        if data_parallel is not None:
            raw, batch_size = data_parallel.reduce_scores(raw, batch_size, done if self.ablation == "mean" else None)
        elif len(done) > 1:
            total = sum(n for _, n, _, _ in done)
            mean = sum(means * n for means, n, _, _ in done) / total
            raw = raw.clone()
            for means, _, factor, grad_sum in done:
                raw += factor * (means - mean) @ grad_sum.t()
        s = (raw / max(1, batch_size)).abs() * self.graph.edge_mask_on(self.raw.device)
        if not torch.isfinite(s).all():
            raise NonFiniteError("edge scores are non-finite (NaN/inf activations or gradients); check the "
                                 "model's weights and inputs — the step is refused")
        return EdgeScores(s, self.graph)

    def _budget(self, pos: torch.Tensor) -> tuple[torch.Tensor, float]:
        """At most ``token_budget`` scored positions: a seeded uniform subset, its sum rescaled by
        ``n_positions / budget`` so the scores stay an unbiased estimate (attribution cost is then bounded)."""
        n = int(pos.sum())
        if self.token_budget is None or n <= self.token_budget:
            return pos, 1.0
        flat = pos.reshape(-1).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(self._budget_calls)
        self._budget_calls += 1
        keep = flat[torch.randperm(n, generator=g)[:self.token_budget].to(flat.device)]
        out = torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)
        out[keep] = True
        return out.view_as(pos), n / self.token_budget

    # ---- ablation ----
    def _baseline(self, batch, corrupted_batch):
        if self.ablation != "corrupted":
            if corrupted_batch is not None:
                raise CTFastError(f"corrupted_batch was given but ablation={self.ablation!r}; use ablation='corrupted'")
            return None
        if corrupted_batch is None:
            raise CTFastError("ablation='corrupted' needs corrupted_batch (the paired corrupted inputs)")
        a, b = batch["input_ids"].shape, corrupted_batch["input_ids"].shape
        if a != b:
            raise CTFastError(f"corrupted_batch has shape {tuple(b)} but the batch has {tuple(a)}; pair every "
                              "example with a corrupted one of the same length (pad both alike)")
        unpaired = (valid_tokens(batch) & ~valid_tokens(corrupted_batch)).any(1).nonzero().flatten().tolist()
        if unpaired:  # (their tokens would be scored against the activations of padding)
            raise CTFastError(f"examples {unpaired[:8]} of corrupted_batch are padding where the batch has tokens; "
                              "pair every example with a corrupted one of the same length (pad both alike)")
        cap = Capture(self.model, store=set(self.up_keys), modules=self._modules)
        with cap, torch.no_grad():
            self.model(**{k: v for k, v in model_inputs(corrupted_batch).items() if k != "labels"})
        return cap.stored

    @staticmethod
    def _token_means(tensors: list, valid: torch.Tensor) -> list:
        """``[w]`` fp32 mean of each ``a [B, T, w]`` over the valid tokens: the padding rows zeroed (a 0/1 factor:
        exact in any dtype), summed in fp32 inside the reduction (no fp32 copy), in row chunks — three launches a
        tensor, the token count made once."""
        if not tensors:
            return []
        device = tensors[0].device
        flat = valid.reshape(-1, 1).to(device)
        count = flat.sum(dtype=torch.float32)
        keep = {}
        out = []
        for a in tensors:
            rows = a.reshape(-1, a.shape[-1])
            if rows.dtype not in keep:
                keep[rows.dtype] = flat.to(rows.dtype)
            step = max(1, chunk_elements(rows.device) // rows.shape[1])
            total = None
            for i in range(0, rows.shape[0], step):
                part = (rows[i:i + step] * keep[rows.dtype][i:i + step]).sum(0, dtype=torch.float32)
                total = part if total is None else total.add_(part)
            if total is None:  # no rows at all
                total = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
            out.append(total / count)
        return out

    def _node_means(self, shifts: list) -> torch.Tensor:
        """``[n_up, d]``: every upstream node's mean contribution over the batch's non-padding tokens."""
        out = []
        for g, mean in zip(self.graph.upstream_groups, shifts):
            w = None if g.writer is None else g.writer.heads_weight(current_weight(self._modules, g.writer.weight))
            out.append(ops.heads_to_residual(mean[None], w)[:, 0])
        return torch.cat(out)


class Recording:
    """One recorded forward of an ``AttributionRun``: its capture, then the scorer its backward feeds.

    It joins the run's counts when its backward first reaches a tap; a forward that is never backpropagated
    (its graph dropped) never counts, and nothing keeps it alive but that graph."""

    def __init__(self, run: AttributionRun, capture: Capture, rows: TokenRows, derived: dict, baseline, factor: float,
                 valid: torch.Tensor):
        self.run, self.capture, self.rows, self.derived, self.baseline = run, capture, rows, derived, baseline
        self.factor, self.valid = factor, valid
        self.means = None
        self.scorer: EdgeScorer | None = None
        self.committed = False

    def on_grad(self, key, grad: torch.Tensor):
        if self.run.closed:
            return
        if not self.committed:
            self.committed = True
            self.run._commit(self)
        self.scorer.on_grad(key, grad)


class _Difference:
    """Rows of ``after - before`` computed chunk by chunk when sliced: an MLP's output as the difference of the
    residual stream after and before it (both kept anyway), instead of a capture of its own."""

    def __init__(self, after: torch.Tensor, before: torch.Tensor):
        self.after, self.before = after, before

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.after[rows] - self.before[rows]


def residual_vector_groups(graph: ComputationGraph) -> set[int]:
    """The upstream groups that are single residual vectors (no writer weight: embeddings, whole-MLP outputs)."""
    return {k for k, g in enumerate(graph.upstream_groups) if g.writer is None and len(g.names) == 1}


def _stacked_order(graph: ComputationGraph, slots: dict, device: torch.device) -> tuple[list, torch.Tensor | None]:
    """``(rows, fold)``: each upstream group's first row in a span's sums block — the graph's rows without stacked
    sources; else the other groups' nodes first (graph order), then the stacked ones (slot order), so that both
    kinds are scored into consecutive rows — and ``fold`` (long ``[n_up]`` on ``device``, None without stacked
    sources): the block row of each graph row (``raw[:, cols] += sums[fold]``). Cached on the graph."""
    groups = graph.upstream_groups
    if not slots:
        return [g.first for g in groups], None
    cache = graph.__dict__.setdefault("_stacked_order", {})
    key = (tuple(sorted(slots.items())), str(device))
    if key in cache:
        return cache[key]
    rows, row = [0] * len(groups), 0
    for k, g in enumerate(groups):
        if k not in slots:
            rows[k], row = row, row + len(g.names)
    for k, slot in slots.items():
        rows[k] = row + slot
    fold = torch.empty(len(graph.upstream_nodes), dtype=torch.long)
    for k, g in enumerate(groups):
        fold[g.first:g.first + len(g.names)] = torch.arange(rows[k], rows[k] + len(g.names))
    cache[key] = rows, fold.to(device)
    return cache[key]


def _stacked_runs(plan: LayerPlan, slots: dict) -> list[tuple[int, int, int, int]]:
    """``(group, slot, n, a)`` per run of stacked sources the span reads: ``n`` consecutive slots from ``group``'s
    (one node each), all read by G rows ``a:``. Cached on the plan."""
    cache = plan.__dict__.setdefault("_stacked_runs", {})
    key = tuple(sorted(slots.items()))
    if key not in cache:
        cache[key] = _slot_runs([(k, slots[k], a) for k, a in plan.ups if k in slots])
    return cache[key]


def _slot_runs(items: list) -> list[tuple]:
    """``(key, slot, n, tag)`` per run of ``(key, slot, tag)`` items whose slots follow on (slot, slot + 1, ...)
    under one tag; an item without a slot (None) is a run of its own."""
    runs: list = []
    for key, slot, tag in items:
        last = runs[-1] if runs else None
        if slot is not None and last is not None and last[1] is not None and last[3] == tag and \
                last[1] + last[2] == slot:
            last[2] += 1
        else:
            runs.append([key, slot, 1, tag])
    return [tuple(r) for r in runs]


def _stack_rows(capture: Capture, rows: TokenRows, up_keys: list) -> tuple[torch.Tensor, dict] | None:
    """``(rows [S, n_rows, d], {upstream group: slot})`` of the capture's stacked sources (the scored rows: a view
    when every token is scored, else one gather for all of them), or None when nothing (or not everything) was
    stacked."""
    buf = capture.stack_buffer
    if buf is None or capture.stacked != set(capture.stack_keys):
        return None
    flat = buf.view(buf.shape[0], -1, buf.shape[-1])
    if not rows.every:
        flat = flat.index_select(1, rows.flat.to(flat.device))
    return flat, {i: capture.stack_keys[key] for i, key in enumerate(up_keys) if key in capture.stack_keys}


def batched_head_groups(graph: ComputationGraph) -> list[int]:
    """The attention groups whose contributions the torch path makes several layers at once (``EdgeScorer._head_run``,
    with stacked residual vectors): at least two, one writer shape, their stacked weights within
    ``HEAD_WEIGHTS_ELEMENTS``; else none. (The memory plan counts their stack by the same rule.)"""
    groups = [k for k, g in enumerate(graph.upstream_groups) if g.kind == "attn" and g.writer is not None]
    writers = [graph.upstream_groups[k].writer for k in groups]
    if len(groups) < 2 or len({(w.n, w.width) for w in writers}) != 1:
        return []
    return groups if len(groups) * writers[0].n * writers[0].width * graph.d_model <= HEAD_WEIGHTS_ELEMENTS else []


def _head_slots(graph: ComputationGraph, modules: dict) -> dict[int, int]:
    """``{upstream group: slot}`` of ``batched_head_groups``, none where sharded (FSDP2: the stack would hold every
    layer's whole matrix)."""
    groups = batched_head_groups(graph)
    if any(is_dtensor(modules[graph.upstream_groups[k].writer.module].weight) for k in groups):
        return {}
    return {k: i for i, k in enumerate(groups)}


def _mlp_residuals(graph: ComputationGraph) -> dict[int, tuple]:
    """``{upstream group: (key of the residual after the MLP, key of the residual before it)}`` for whole-MLP
    nodes: the next layer's attention-norm input (or the final norm's) and this layer's MLP-norm input."""
    before = {g.layer: (g.norm, "input") for g in graph.downstream_groups if g.kind == "mlp" and g.norm}
    after = {g.layer - 1: (g.norm, "input") for g in graph.downstream_groups if g.kind == "q" and g.norm}
    after.update({g.layer - 1: g.tap for g in graph.downstream_groups if g.kind == "logits"})
    return {k: (after[g.layer], before[g.layer]) for k, g in enumerate(graph.upstream_groups)
            if g.kind == "mlp" and g.writer is None and g.layer in after and g.layer in before}


def current_weight(modules: dict, name: str) -> torch.Tensor:
    """The parameter ``name`` as its module holds it now, detached and whole (FSDP2: the unsharded tensor inside
    the module's forward/backward, else an all-gather of the shard)."""
    module, attr = name.rsplit(".", 1)
    return full(getattr(modules[module], attr)).detach()


def scoring_dtype(param: torch.Tensor) -> torch.dtype:
    """The precision policy of scoring: bf16/fp16 operands with fp32 accumulation (tensor cores) for a bf16/fp16
    model on a GPU; fp32 otherwise (the exact path, and always on CPU)."""
    if param.device.type == "cuda" and param.dtype in (torch.bfloat16, torch.float16):
        return param.dtype
    return torch.float32


def attribute(model: nn.Module, batch: dict, metric="loss", ablation: str = "mean", positions=None,
              pool: bool = False, graph: ComputationGraph | None = None,
              corrupted_batch: dict | None = None, score_dtype: torch.dtype | None = None) -> EdgeScores:
    """Exact EAP edge scores of ``batch`` (see module docstring).

    ``metric``: ``"loss"``, ``"logit_diff"``, ``"logprob_diff"`` or a callable ``(logits, batch) -> scalar``;
    ``ablation``: ``"mean"`` (over the batch's non-padding tokens), ``"zero"`` or ``"corrupted"``
    (with ``corrupted_batch``); ``positions``: None (all non-padding tokens), a bool ``[B, T]`` mask, a
    batch key or a callable; ``pool``: average activations and gradients over the positions first;
    ``score_dtype``: the scoring precision (default ``scoring_dtype``: bf16/fp16 operands for such a model on
    a GPU, else fp32 — the exact path).

    Example::

        scores = attribute(model, {"input_ids": ids, "labels": ids})
        scores.scores.shape   # [n_upstream, n_downstream]
    """
    if not torch.is_grad_enabled():
        raise CTFastError("attribute() runs a backward: it was called under torch.no_grad() / inference_mode(); "
                          "call it outside (it computes no weight gradient and leaves the model untouched)")
    if graph is None:
        graph = ComputationGraph.from_model(model)
    else:
        graph.check_model(model)
    run = AttributionRun(model, graph, ablation=ablation, positions=positions, pool=pool, score_dtype=score_dtype)
    _, value = run.forward(batch, metric=metric, corrupted_batch=corrupted_batch)
    run.backward(value)
    return run.scores()
