"""Circuits: selection of the top-N edges, the parameters a circuit owns, schedules for N.

A ``Circuit`` is a set of edges with scores; its nodes are the edges' endpoints, and its parameters are
the union of the nodes' slices (docs/design.md section 1). Per parameter the slices are rows (or columns) of
one axis, kept as a ``ParamSelection`` so optimizers touch only those rows.

Example::

    circuit = ct_fast.attribute(model, batch).top_n(100)
    masks = circuit.param_masks(model)        # {param name: bool tensor}, True on circuit slices
    circuit.fraction, Circuit.from_json(circuit.to_json(), graph)
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CTFastError
from .graph import ComputationGraph

SELECTION_METHODS = ("edges", "nodes")


@dataclass(frozen=True)
class ParamSelection:
    """The selected index ranges ``[(start, stop), ...]`` (sorted, disjoint) along axis ``dim`` of one
    parameter of ``size`` rows on that axis."""

    dim: int
    size: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def full(self) -> bool:
        return self.ranges == ((0, self.size),)

    def index(self, device=None) -> torch.Tensor:
        """The selected rows as a long tensor ``[count]``."""
        if not self.ranges:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.ranges])

    def positions_of(self, sub: "ParamSelection") -> "ParamSelection":
        """Where the rows of ``sub`` (a subset of this selection) sit in this selection's compact order (row k
        of a compact ``[count, ...]`` tensor is this selection's k-th row): a selection of ``count`` rows."""
        starts, offset = [], 0  # (start, stop, offset of start in the compact order) of each range
        for a, b in self.ranges:
            starts.append((a, b, offset))
            offset += b - a
        out, i = [], 0
        for sa, sb in sub.ranges:
            while i < len(starts) and starts[i][1] <= sa:
                i += 1
            if i == len(starts) or not starts[i][0] <= sa < sb <= starts[i][1]:
                raise AssertionError(f"rows {sa}:{sb} are not inside the selection {self.ranges}")
            a, _, off = starts[i]
            out.append((off + sa - a, off + sb - a))
        return _merge(0, self.count, out)

    def mask(self, shape, device=None) -> torch.Tensor:
        """Element mask of the parameter: bool ``shape``, True on the selected rows."""
        rows = torch.zeros(self.size, dtype=torch.bool, device=device)
        for a, b in self.ranges:
            rows[a:b] = True
        view = [1] * len(shape)
        view[self.dim] = self.size
        return rows.view(view).expand(shape).clone()

    @staticmethod
    def from_mask(mask: torch.Tensor) -> "ParamSelection":
        """The row (or column) selection that an element mask describes; raises if it is unstructured."""
        m = mask.bool()
        if m.dim() == 0:
            m = m.view(1)
        for dim in range(m.dim()):
            rows = m.movedim(dim, 0).reshape(m.shape[dim], -1)
            sel = rows.any(1)
            if torch.equal(rows, sel[:, None].expand_as(rows)):
                return ParamSelection(dim, m.shape[dim], _ranges(sel))
        raise CTFastError(
            f"a parameter mask of shape {tuple(mask.shape)} selects neither whole rows nor whole columns; "
            "circuit optimizers update row/column slices — build masks with Circuit.param_masks"
        )


def _ranges(sel: torch.Tensor) -> tuple[tuple[int, int], ...]:
    idx = sel.nonzero().flatten().tolist()
    out = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def _merge(dim: int, size: int, spans) -> ParamSelection:
    spans = sorted(spans)
    out = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return ParamSelection(dim, size, tuple((a, b) for a, b in out))


@dataclass
class Circuit:
    """A set of edges ``(upstream, downstream, score)`` of a graph; its nodes are the edge endpoints."""

    edges: list[tuple[str, str, float]]
    graph: ComputationGraph | None = field(default=None, repr=False, compare=False)

    @property
    def upstream(self) -> list[str]:
        """Upstream endpoints, in first-seen order."""
        return list(dict.fromkeys(u for u, _, _ in self.edges))

    @property
    def downstream(self) -> list[str]:
        return list(dict.fromkeys(d for _, d, _ in self.edges))

    @property
    def nodes(self) -> list[str]:
        """All endpoint names (a name such as ``mlp.3`` may be both an upstream and a downstream node)."""
        return list(dict.fromkeys(self.upstream + self.downstream))

    def __len__(self) -> int:
        return len(self.edges)

    def _graph(self, graph=None) -> ComputationGraph:
        g = graph or self.graph
        if g is None:
            raise CTFastError("this circuit has no graph: pass graph=ComputationGraph.from_model(model)")
        return g

    def param_selections(self, graph: ComputationGraph | None = None) -> dict[str, ParamSelection]:
        """Per parameter name, the rows/columns that belong to the circuit's nodes."""
        return node_selections(self._graph(graph), self.upstream, self.downstream)

    def param_masks(self, model: nn.Module, graph: ComputationGraph | None = None) -> dict[str, torch.Tensor]:
        """Bool mask per named parameter of ``model`` (all of them), True exactly on circuit slices."""
        g = graph or self.graph or ComputationGraph.from_model(model)
        sel = self.param_selections(g)
        out = {}
        for name, p in model.named_parameters():
            out[name] = sel[name].mask(p.shape, p.device) if name in sel else torch.zeros_like(p, dtype=torch.bool)
        return out

    @property
    def num_params(self) -> int:
        """Number of parameter elements the circuit tunes."""
        g = self._graph()
        return sum(s.count * math.prod(g.param_shapes[p]) // max(1, s.size)
                   for p, s in self.param_selections(g).items())

    @property
    def fraction(self) -> float:
        """``num_params`` over all parameters of the model."""
        return self.num_params / max(1, self._graph().total_params)

    # ---- serialisation ----
    def to_dict(self) -> dict:
        out = {"edges": [[u, d, float(s)] for u, d, s in self.edges], "nodes": self.nodes}
        if self.graph is not None:
            out["graph"] = self.graph.describe()
            out["num_params"], out["fraction"] = self.num_params, self.fraction
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict, graph: ComputationGraph | None = None) -> "Circuit":
        edges = [(u, d, float(s)) for u, d, s in data["edges"]]
        pairs = [(u, d) for u, d, _ in edges]
        if len(set(pairs)) != len(pairs):
            twice = sorted({p for p in pairs if pairs.count(p) > 1})
            raise CTFastError(f"circuit edges {twice[:3]} are listed more than once")
        if graph is not None:
            saved = data.get("graph") or {}
            mine = graph.describe()
            differ = [k for k in graph.SHAPE_FIELDS if k in saved and saved[k] != mine[k]]
            if differ:
                raise CTFastError(f"the circuit was saved for another graph: {differ[0]} is {saved[differ[0]]} there, "
                                  f"{mine[differ[0]]} here; load it with the graph of the model it was found on")
            mask = graph.edge_mask
            unknown = [e for e in edges if e[0] not in graph.up_index or e[1] not in graph.down_index
                       or not bool(mask[graph.up_index[e[0]], graph.down_index[e[1]]])]
            if unknown:
                raise CTFastError(f"circuit edges {unknown[:3]} are not edges of this model's graph")
        return cls(edges, graph)

    @classmethod
    def from_json(cls, text: str, graph: ComputationGraph | None = None) -> "Circuit":
        return cls.from_dict(json.loads(text), graph)

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.to_json(indent=1))

    @classmethod
    def load(cls, path, graph: ComputationGraph | None = None) -> "Circuit":
        with open(path) as f:
            return cls.from_json(f.read(), graph)


def node_selections(graph: ComputationGraph, upstream, downstream, params=None) -> dict[str, ParamSelection]:
    """Per parameter name (all, or those in ``params``), the rows/columns of the given upstream and downstream
    nodes (each node owns its role's slices: a writer's columns, a reader's rows)."""
    spans: dict[str, list] = {}
    dims: dict[str, int] = {}
    for s in graph.param_slices(upstream, downstream):
        if params is not None and s.param not in params:
            continue
        if dims.setdefault(s.param, s.dim) != s.dim:
            raise CTFastError(f"{s.param} is sliced along two axes; the graph adapter is inconsistent")
        spans.setdefault(s.param, []).append((s.start, s.stop))
    return {p: _merge(dims[p], graph.param_shapes[p][dims[p]] if graph.param_shapes[p] else 1, sp)
            for p, sp in spans.items()}


def selections_by_param(model: nn.Module, selections: dict[str, ParamSelection]) -> dict:
    """``{name: ParamSelection}`` -> ``{parameter: ParamSelection}``."""
    params = dict(model.named_parameters())
    return {params[n]: s for n, s in selections.items()}


def select_circuit(edge_scores, n: int, method: str = "edges", threshold: float = 0.0) -> Circuit:
    """The top ``n`` edges by score (``method="nodes"``: by ``|S| * rowsum|S| * colsum|S|``), keeping only
    those with score ``> threshold``. Ranking happens on the scores' device, without Python edge loops."""
    graph, S = edge_scores.graph, edge_scores.scores
    n_edges = graph.n_edges
    if not is_whole_number(n) or n < 0:
        raise CTFastError(f"top_n must be a non-negative int, got {n!r}")
    n = int(n)
    if n > n_edges:
        raise CTFastError(f"top_n={n} is larger than the {n_edges} edges of the graph; choose top_n <= {n_edges}")
    if method not in SELECTION_METHODS:
        raise CTFastError(f"selection method {method!r} is not one of {SELECTION_METHODS}")
    mask = graph.edge_mask_on(S.device)
    rank = S if method == "edges" else S * S.sum(1, keepdim=True) * S.sum(0, keepdim=True)
    rank = rank.masked_fill(~mask, -math.inf).flatten()
    top = rank.topk(n).indices
    top = top[S.flatten()[top] > threshold]
    n_down = S.shape[1]
    ups, downs, vals = (top // n_down).tolist(), (top % n_down).tolist(), S.flatten()[top].tolist()
    return Circuit([(graph.upstream_nodes[u], graph.downstream_nodes[d], v) for u, d, v in zip(ups, downs, vals)],
                   graph)


def is_whole_number(value) -> bool:
    """An int (numpy's too), not a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class TopNSchedule:
    """Circuit size over steps: ``constant`` (``start``), or ``linear``/``cosine`` from ``start`` at step 0 to
    ``end`` at step ``steps`` (and ``end`` after)."""

    start: int
    end: int | None = None
    steps: int = 1
    kind: str = "constant"

    def __post_init__(self):
        for name in ("start", "end", "steps"):
            value = getattr(self, name)
            if not (value is None and name == "end" or is_whole_number(value)):
                what = "top_n" if name == "start" and self.kind == "constant" else f"TopNSchedule {name}"
                hint = " (a share of the edges? top_n=round(share * graph.n_edges))" if isinstance(value, float) else ""
                raise CTFastError(f"{what}={value!r}: expected a whole number of edges{hint}" if name != "steps" else
                                  f"TopNSchedule steps={value!r}: expected a whole number of steps")
            setattr(self, name, None if value is None else int(value))
        if self.kind not in ("constant", "linear", "cosine"):
            raise CTFastError(f"TopNSchedule kind {self.kind!r} is not 'constant', 'linear' or 'cosine'")
        if self.kind != "constant" and self.end is None:
            raise CTFastError(f"a {self.kind} TopNSchedule needs end=")

    def __call__(self, step: int) -> int:
        if self.kind == "constant":
            return self.start
        p = min(max(step, 0) / max(1, self.steps), 1.0)
        if self.kind == "cosine":
            p = (1 - math.cos(math.pi * p)) / 2
        return int(round(self.start + (self.end - self.start) * p))
