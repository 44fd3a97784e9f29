"""Exact candidate pruning: the weight gradients a faithful one-backward step can skip.

In ``deferred`` mode the circuit (the top-N edges) is chosen only after the backward, so every linear used to
keep its dense fp32 dW (or its ``(x, grad_out)``) until selection: the whole weight gradient of full
fine-tuning, for a circuit of a few percent. But a node's own edges are final long before the end:

- a downstream node's edges are all scored when its layer is scored (every earlier writer is held from the
  forward);
- an upstream node's, when the last layer that reads it is scored;
- and the N-th largest score among the edges scored so far is a lower bound ``tau`` of the final N-th largest
  (scoring more edges can only raise it).

So a node whose best edge scores below ``tau`` (or not above ``threshold``) is in no circuit the rest of the
backward can produce. ``CandidatePruner`` follows the scored layers (``EdgeScorer``'s ``on_scored``) and, as
soon as every node owning rows of a linear is decided, hands ``MaskedLinears.resolve`` that linear's
*candidate* rows: from then on the linear's weight gradient is computed for those rows only, in the backward,
and selection later picks the circuit's rows out of them (``ParamSelection.positions_of``). A linear whose
nodes are not decided yet keeps its ``(x, grad_out)`` until they are — until the end of its scoring span
(``attribution.SCORE_SPAN`` layers).

Exact (the same circuit and rows as without pruning) when an edge's score is final once scored: one backward
(one micro-batch), one process, selection by ``"edges"``. The decided nodes' flags of a scored span are read on the
host one span later (a copy to pinned memory and an event, on a GPU): by then the next span's work is queued, so
waiting for the copy (if the device has not reached it yet) never drains the device's queue — a read per span was
17 syncs in the middle of a 32-layer model's backward. A linear's ``(x, grad_out)`` is kept that one span longer.
"""

from __future__ import annotations

import torch

from . import attribution
from .attribution import AttributionRun, LayerPlan, layer_plans
from .circuit import node_selections
from .graph import ComputationGraph
from .masked_linear import MaskedLinears


class CandidatePruner:
    """Decides, layer by layer during a deferred backward, which nodes may still enter the top-``top_n`` circuit
    and tells ``masked`` the candidate rows of every linear whose nodes are all decided (see module docstring).

    Built once per session (what depends on the graph alone); ``start(run, top_n)`` follows one step's
    ``AttributionRun`` (its ``raw`` signed sums and ``batch_size``, as ``scores()`` reads them).
    ``threshold``: selection keeps only edges scoring above it.
    """

    def __init__(self, graph: ComputationGraph, masked: MaskedLinears, threshold: float = 0.0):
        self.graph, self.masked, self.threshold = graph, masked, threshold
        self.plans = layer_plans(graph, attribution.SCORE_SPAN)  # (the scorer's: read when built)
        self.readers = [0] * len(graph.upstream_groups)  # per upstream group: the plans that read it
        for plan in self.plans.values():
            for k, _ in plan.ups:
                self.readers[k] += 1
        # per linear module: its owning nodes ("up"/"down", name); per node: the linears it owns rows of
        self.owners: dict[str, set] = {}
        self.linears_of: dict[tuple, set] = {}
        for role, params in (("up", graph.upstream_params), ("down", graph.downstream_params)):
            for node, slices in params.items():
                for s in slices:
                    module = s.param.rsplit(".", 1)[0]
                    if module in masked.modules:
                        self.owners.setdefault(module, set()).add((role, node))
                        self.linears_of.setdefault((role, node), set()).add(module)
        self.run: AttributionRun | None = None
        self.top_n, self.mask = 0, graph.edge_mask
        self._pending = None

    def start(self, run: AttributionRun, top_n: int):
        """Follow a new step: its attribution ``run`` and circuit size ``top_n``."""
        self.run, self.top_n = run, top_n
        self.mask = self.graph.edge_mask_on(run.raw.device)
        self.reset()

    def reset(self):
        """Forget what was decided (a new step, or the run's scores were reset: ``zero_grad``)."""
        self._pending = None  # (nodes, host flags, event or None): the last scored span's decisions, in flight
        self.best = self.run.raw.new_zeros(0)  # the largest scores seen so far (at most top_n of them)
        self.scored_edges = 0
        self.readers_left = list(self.readers)
        self.undecided = {m: len(nodes) for m, nodes in self.owners.items()}
        self.candidates: set = set()  # decided nodes that may be in the circuit
        for k, g in enumerate(self.graph.upstream_groups):  # a writer no layer reads has no edge: never selected
            if self.readers_left[k] == 0:
                self._decided([("up", name) for name in g.names], [False] * len(g.names))

    def on_scored(self, plan: LayerPlan):
        """``plan``'s layer has been scored: decide its nodes and the writers it was the last reader of (on the
        device; applied by the next ``settle``, at the next span or before the gradients are finished)."""
        self.settle()
        g, raw = self.graph, self.run.raw
        cols = slice(plan.col0, plan.col0 + plan.n_nodes)
        batch = max(1, self.run.batch_size)
        scores = (raw[:, cols] / batch).abs() * self.mask[:, cols]  # bit for bit what scores() will compute
        self.scored_edges += plan.edges
        n = self.top_n
        if n > 0:
            pool = torch.cat([self.best, scores.flatten()])
            self.best = pool.topk(min(n, pool.numel())).values
        # edges scored so far >= n: their n-th largest bounds the final one from below (non-edges add zeros, which
        # only lower it); fewer: any scored edge may still make it
        tau = self.best[n - 1] if 0 < n <= self.scored_edges else raw.new_full((), 0.0 if n else float("inf"))
        nodes = [("down", name) for name in g.downstream_nodes[cols]]
        done = []  # score rows [first, stop) of the writers whose every edge is scored now, consecutive ones merged
        for k, _ in plan.ups:
            self.readers_left[k] -= 1
            if self.readers_left[k] == 0:
                ug = g.upstream_groups[k]
                if done and done[-1][1] == ug.first:
                    done[-1][1] += len(ug.names)
                else:
                    done.append([ug.first, ug.first + len(ug.names)])
                nodes += [("up", name) for name in ug.names]
        # one reduction per run of writer rows (a span's writers are consecutive: 4 launches, not 4 per writer)
        best = torch.cat([scores.amax(0)] + [((raw[a:b] / batch).abs() * self.mask[a:b]).amax(1) for a, b in done])
        self._pending = (nodes, *_to_host((best >= tau) & (best > self.threshold)))

    def settle(self):
        """Apply the decisions of the last scored span: its flags' copy was queued then, so this waits (if at all)
        for that copy, not for the work queued since."""
        if self._pending is None:
            return
        nodes, flags, copied = self._pending
        self._pending = None
        if copied is not None:
            copied.synchronize()
        self._decided(nodes, flags.tolist())

    def _decided(self, nodes: list, flags: list):
        for node, keep in zip(nodes, flags):
            if keep:
                self.candidates.add(node)
            for module in self.linears_of.get(node, ()):
                self.undecided[module] -= 1
                if self.undecided[module] == 0:
                    self._resolve(module)

    def _resolve(self, module: str):
        keep = [node for node in self.owners[module] if node in self.candidates]
        names = {f"{module}.weight", f"{module}.bias"}
        by_name = node_selections(self.graph, [n for r, n in keep if r == "up"], [n for r, n in keep if r == "down"],
                                  params=names)
        params = {"weight": self.masked.weight[module], "bias": self.masked.bias[module]}
        self.masked.resolve(module, {params[name.rsplit(".", 1)[1]]: sel for name, sel in by_name.items()})


def _to_host(flags: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``(host copy, event)`` of a CUDA tensor (pinned memory, non-blocking: the event marks the copy done), or
    ``(flags, None)`` where it is on the host already."""
    if flags.device.type != "cuda":
        return flags, None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()  # on the stream the copy went to: the flags' GPU's (the current GPU may be another)
    event.record(torch.cuda.current_stream(flags.device))
    return host, event
