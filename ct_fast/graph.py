"""The computational graph of a Hugging Face causal LM, read off the unmodified model.

Residual-stream order: ``embed``, then for each layer L the attention heads of L, then the MLP of L, then
``logits``. Upstream nodes write the residual stream, downstream nodes read it (docs/design.md section 1):

    upstream:   embed, attn.L.h, mlp.L (or mlp.L.j with ``mlp_head_dim``)
    downstream: attn.L.h.q, attn.L.g.k, attn.L.g.v (g: key/value head), mlp.L (or mlp.L.j), logits

Each node maps to the parameter slices that implement it (``ParamSlice``). One adapter per architecture
family names the modules; everything else is generic.

Example::

    graph = ComputationGraph.from_model(model)          # GPT-2, Llama, Mistral, Qwen2, Qwen3
    graph.upstream_nodes[:3], graph.edge_mask.shape      # ['embed', 'attn.0.0', ...], (n_up, n_down)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CTFastError, UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ParamSlice:
    """Rows ``[start, stop)`` of parameter ``param`` along axis ``dim`` (the whole tensor if it spans it)."""

    param: str
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Projection:
    """``n`` heads of width ``width`` of a linear map between the residual stream and a head space.

    ``role="reader"``: residual (d_model) -> heads (q/k/v, MLP input); ``role="writer"``: heads -> residual
    (attention output, MLP down projection). ``layout`` is ``"linear"`` (``nn.Linear``, weight
    ``[out, in]``) or ``"conv1d"`` (GPT-2 ``Conv1D``, weight ``[in, out]``). The heads start at
    ``offset`` on the head axis (GPT-2's fused ``c_attn`` holds q, k and v at offsets 0, d, 2d).
    """

    module: str
    role: str
    layout: str
    offset: int
    n: int
    width: int
    has_bias: bool

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias(self) -> str:
        return f"{self.module}.bias"

    @property
    def head_axis(self) -> int:
        """The weight axis that indexes head units (the other one is d_model)."""
        reads_rows = (self.role == "reader") == (self.layout == "linear")
        return 0 if reads_rows else 1

    def heads_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as ``[n, width, d_model]``: head j's map is ``heads_weight[j]`` (a view when possible).

        reader: ``d(normed input) = sum_i d(out)[j, i] * W[j, i, :]``;
        writer: ``head output = sum_i z[j, i] * W[j, i, :]``.
        """
        w = weight.narrow(self.head_axis, self.offset, self.n * self.width).movedim(self.head_axis, 0)
        return w.reshape(self.n, self.width, w.shape[-1])

    def head_slices(self, j: int) -> list[ParamSlice]:
        """Parameters of head j alone: its weight rows/columns, and its bias slice for a reader."""
        start = self.offset + j * self.width
        out = [ParamSlice(self.weight, self.head_axis, start, start + self.width)]
        if self.has_bias and self.role == "reader":
            out.append(ParamSlice(self.bias, 0, start, start + self.width))
        return out


@dataclass
class UpstreamGroup:
    """Upstream nodes of one kind in one layer, scored from one compact captured tensor.

    ``capture`` is ``(module, "input"|"output")``: the compact tensor (per-head z, MLP activations, MLP
    output, or the embedding = input of layer 0's attention norm). ``writer`` maps it to each node's
    residual contribution; ``None`` means the captured tensor *is* the single node's contribution.
    ``params[j]`` are node j's parameter slices.
    """

    kind: str
    layer: int
    names: list[str]
    capture: tuple[str, str]
    writer: Projection | None
    write_pos: int
    params: list[list[ParamSlice]]
    first: int = 0


@dataclass
class DownstreamGroup:
    """Downstream nodes of one kind in one layer, scored from one gradient tap.

    The gradient of the tapped tensor (``tap = (module, "input"|"output")``) is mapped through the
    ``reader`` (``None`` = identity: the tap already is the normed input) to the gradient of d's normed
    input, then through the backward of ``norm`` at the residual that norm reads (``norm=None``: the
    tapped tensor is the residual itself, as for ``logits``). Several groups may share node names (a
    split MLP head reads through both gate and up projections): their gradients add up.
    ``params[j]`` are node j's parameter slices.
    """

    kind: str
    layer: int
    names: list[str]
    tap: tuple[str, str]
    reader: Projection | None
    norm: str | None
    read_pos: int
    params: list[list[ParamSlice]]
    first: int = 0  # column of the first node in the graph's downstream order
    index: int = 0  # position in graph.downstream_groups


@dataclass
class ComputationGraph:
    """Nodes, edges and node -> parameter slices of one model (see module docstring)."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_mlp: int
    mlp_head_dim: int | None
    upstream_groups: list[UpstreamGroup]
    downstream_groups: list[DownstreamGroup]
    upstream_nodes: list[str] = field(init=False)
    downstream_nodes: list[str] = field(init=False)
    edge_mask: torch.Tensor = field(init=False)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    upstream_params: dict[str, list[ParamSlice]] = field(init=False)
    downstream_params: dict[str, list[ParamSlice]] = field(init=False)
    _masks_on: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.upstream_nodes, self.downstream_nodes = [], []
        self.upstream_params, self.downstream_params = {}, {}
        for g in self.upstream_groups:
            g.first = len(self.upstream_nodes)
            self.upstream_nodes += g.names
            self.upstream_params.update(zip(g.names, g.params))
        write, read = [], []
        for g in self.upstream_groups:
            write += [g.write_pos] * len(g.names)
        for i, g in enumerate(self.downstream_groups):
            g.index = i
            if g.names[0] in self.downstream_params:  # a second tap of the same nodes
                g.first = self.downstream_nodes.index(g.names[0])
                for name, extra in zip(g.names, g.params):
                    self.downstream_params[name] = self.downstream_params[name] + extra
                continue
            g.first = len(self.downstream_nodes)
            self.downstream_nodes += g.names
            self.downstream_params.update(zip(g.names, g.params))
            read += [g.read_pos] * len(g.names)
        write, read = torch.tensor(write), torch.tensor(read)
        self.edge_mask = write[:, None] < read[None, :]
        self.up_index = {n: i for i, n in enumerate(self.upstream_nodes)}
        self.down_index = {n: i for i, n in enumerate(self.downstream_nodes)}

    @property
    def tunable_params(self) -> set[str]:
        """Names of the parameters that some node owns (what a circuit can ever update)."""
        return set(self.param_dims)

    @property
    def param_dims(self) -> dict[str, int]:
        """``{parameter name: the axis its nodes slice}`` of every tunable parameter."""
        return {s.param: s.dim for slices in (*self.upstream_params.values(), *self.downstream_params.values())
                for s in slices}

    @property
    def n_edges(self) -> int:
        """Edges of the graph (``edge_mask``'s true entries): counted once per mask (a host sum over
        ``n_up x n_down`` entries — 2.6M on Llama-3-8B — at every selection otherwise)."""
        counted = self.__dict__.get("_n_edges")
        if counted is None or counted[0] is not self.edge_mask:
            counted = self.__dict__["_n_edges"] = (self.edge_mask, int(self.edge_mask.sum()))
        return counted[1]

    def edge_mask_on(self, device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``edge_mask`` on ``device`` in ``dtype``, copied once and kept (read only): a host-to-device copy per step
        would be a host sync per step on a GPU."""
        key = (str(device), dtype)
        kept = self._masks_on.get(key)
        if kept is None or kept[0] is not self.edge_mask:  # (made again if the mask is replaced)
            kept = self._masks_on[key] = (self.edge_mask, self.edge_mask.to(device, dtype))
        return kept[1]

    @classmethod
    def from_model(cls, model: nn.Module, mlp_head_dim: int | None = None) -> "ComputationGraph":
        """Build the graph of a supported causal LM (GPT-2, Llama, Mistral, Qwen2, Qwen3).

        ``mlp_head_dim=w`` splits every MLP into ``d_mlp / w`` "MLP heads" of w hidden units.
        """
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {type(model).__name__} (model_type={model_type!r}); ct_fast "
                f"supports the causal LMs of {', '.join(SUPPORTED_MODEL_TYPES)} — load one of those with "
                "AutoModelForCausalLM, or add an adapter in ct_fast/graph.py"
            )
        spec = _gpt2_spec(model) if model_type == "gpt2" else _llama_spec(model)
        from .circuit import is_whole_number

        if mlp_head_dim is not None and (not is_whole_number(mlp_head_dim) or mlp_head_dim <= 0
                                         or spec["d_mlp"] % mlp_head_dim):
            raise CTFastError(
                f"mlp_head_dim={mlp_head_dim} must be a positive divisor of the MLP width {spec['d_mlp']}"
            )
        graph = _build(model_type, spec, None if mlp_head_dim is None else int(mlp_head_dim))
        graph.param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        return graph

    # the fields of describe() that fix the graph's shape (what a graph or a saved circuit must agree on)
    SHAPE_FIELDS = ("arch", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "d_mlp", "mlp_head_dim")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a graph built from another model (``graph=``): its shape (architecture, layers, heads, widths) and
        the shapes of the parameters its nodes own must be ``model``'s — else scores and circuits would be silently
        wrong (nodes reading a part of the model, parameters no circuit can reach)."""
        built = ComputationGraph.from_model(model)  # (whole MLPs: the fields compared do not depend on the split)
        fix = "build the graph from this model: ComputationGraph.from_model(model)"
        for key in (k for k in self.SHAPE_FIELDS if k != "mlp_head_dim"):  # (built with whole MLPs: not compared)
            if getattr(self, key) != getattr(built, key):
                raise CTFastError(f"the graph does not describe this model: {key} is {getattr(self, key)} in the "
                                  f"graph, {getattr(built, key)} in the model; {fix}")
        for name in sorted(self.tunable_params | built.tunable_params):  # (a bias only the model has: untrained)
            ours = self.param_shapes.get(name) if name in self.tunable_params else None
            theirs = built.param_shapes.get(name) if name in built.tunable_params else None
            if ours != theirs:
                raise CTFastError(f"the graph does not describe this model: parameter {name} is "
                                  f"{ours or 'absent'} in the graph, {theirs or 'absent'} in the model; {fix}")

    @property
    def total_params(self) -> int:
        """Number of parameter elements of the model (tied weights counted once)."""
        return sum(math.prod(s) for s in self.param_shapes.values())

    # ---- convenience ---------------------------------------------------------------------------
    def param_slices(self, upstream=(), downstream=()) -> list[ParamSlice]:
        """All parameter slices of the given upstream and downstream node names (with shared biases)."""
        out = [s for n in upstream for s in self.upstream_params[n]]
        out += [s for n in downstream for s in self.downstream_params[n]]
        return out

    def describe(self) -> dict:
        """Plain-data summary (for JSON and logs)."""
        return {
            "arch": self.arch, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "d_model": self.d_model,
            "d_mlp": self.d_mlp, "mlp_head_dim": self.mlp_head_dim,
            "n_upstream": len(self.upstream_nodes), "n_downstream": len(self.downstream_nodes),
            "n_edges": self.n_edges,
        }


# ---- adapters: module names per architecture family ------------------------------------------------

def _gpt2_spec(model) -> dict:
    c = model.config
    if not hasattr(model, "transformer"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: expected a GPT2LMHeadModel (with .transformer and .lm_head)"
        )
    d = c.n_embd
    return dict(
        n_layers=c.n_layer, n_heads=c.n_head, n_kv_heads=c.n_head, head_dim=d // c.n_head, d_model=d,
        d_mlp=c.n_inner or 4 * d, layout="conv1d", prefix="transformer.h", final_norm="transformer.ln_f",
        attn_norm="ln_1", mlp_norm="ln_2", mlp="mlp",
        q=("attn.c_attn", 0), k=("attn.c_attn", d), v=("attn.c_attn", 2 * d), qkv_bias=True,
        o="attn.c_proj", o_bias=True, mlp_in=["mlp.c_fc"], mlp_out="mlp.c_proj", mlp_bias=True,
    )


def _llama_spec(model) -> dict:
    c = model.config
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: expected a *ForCausalLM model with .model.layers"
        )
    attn = model.model.layers[0].self_attn
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    mlp = model.model.layers[0].mlp
    return dict(
        n_layers=c.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
        d_model=c.hidden_size, d_mlp=c.intermediate_size, layout="linear", prefix="model.layers",
        final_norm="model.norm", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
        mlp="mlp", q=("self_attn.q_proj", 0), k=("self_attn.k_proj", 0), v=("self_attn.v_proj", 0),
        qkv_bias=attn.q_proj.bias is not None, o="self_attn.o_proj", o_bias=attn.o_proj.bias is not None,
        mlp_in=["mlp.gate_proj", "mlp.up_proj"], mlp_out="mlp.down_proj",
        mlp_bias=mlp.down_proj.bias is not None,
    )


def _whole(name: str, dim: int, size: int) -> ParamSlice:
    return ParamSlice(name, dim, 0, size)


def _build(arch: str, s: dict, mlp_head_dim: int | None) -> ComputationGraph:
    H, KV, dh, d, d_mlp = s["n_heads"], s["n_kv_heads"], s["head_dim"], s["d_model"], s["d_mlp"]
    layout, split = s["layout"], mlp_head_dim is not None
    n_mlp, w_mlp = (d_mlp // mlp_head_dim, mlp_head_dim) if split else (1, d_mlp)
    ups = [UpstreamGroup("embed", -1, ["embed"], (f"{s['prefix']}.0.{s['attn_norm']}", "input"), None, -1,
                         [[]])]  # embeddings are frozen (docs/design.md section 1)
    downs = []
    for L in range(s["n_layers"]):
        p = f"{s['prefix']}.{L}"
        attn_norm, mlp_norm = f"{p}.{s['attn_norm']}", f"{p}.{s['mlp_norm']}"
        # downstream: q/k/v heads read the residual before the layer's attention
        for kind, n in (("q", H), ("k", KV), ("v", KV)):
            mod, off = s[kind]
            r = Projection(f"{p}.{mod}", "reader", layout, off, n, dh, s["qkv_bias"])
            downs.append(DownstreamGroup(kind, L, [f"attn.{L}.{h}.{kind}" for h in range(n)],
                                         (r.module, "output"), r, attn_norm, 2 * L,
                                         [r.head_slices(h) for h in range(n)]))
        # downstream: the MLP (or its heads) reads the residual after the attention
        readers = [Projection(f"{p}.{m}", "reader", layout, 0, n_mlp, w_mlp, s["mlp_bias"]) for m in s["mlp_in"]]
        if split:  # one tap per input projection; head j reads through rows j*w..(j+1)*w of each
            names = [f"mlp.{L}.{j}" for j in range(n_mlp)]
            for r in readers:
                downs.append(DownstreamGroup("mlp", L, names, (r.module, "output"), r, mlp_norm, 2 * L + 1,
                                             [r.head_slices(j) for j in range(n_mlp)]))
        else:  # the tapped MLP input already is the gradient of d's normed input
            whole = [sl for r in readers for sl in r.head_slices(0)]
            downs.append(DownstreamGroup("mlp", L, [f"mlp.{L}"], (f"{p}.{s['mlp']}", "input"), None,
                                         mlp_norm, 2 * L + 1, [whole]))
        # upstream: attention heads write through their slice of the output projection
        o = Projection(f"{p}.{s['o']}", "writer", layout, 0, H, dh, s["o_bias"])
        o_bias = [_whole(o.bias, 0, d)] if o.has_bias else []
        ups.append(UpstreamGroup("attn", L, [f"attn.{L}.{h}" for h in range(H)], (o.module, "input"), o, 2 * L,
                                 [o.head_slices(h) + o_bias for h in range(H)]))
        # upstream: the MLP output (bias included), or per MLP head act[:, slice] @ W_down[slice]
        down = Projection(f"{p}.{s['mlp_out']}", "writer", layout, 0, n_mlp, w_mlp, s["mlp_bias"])
        down_bias = [_whole(down.bias, 0, d)] if down.has_bias else []
        if split:
            ups.append(UpstreamGroup("mlp", L, [f"mlp.{L}.{j}" for j in range(n_mlp)], (down.module, "input"),
                                     down, 2 * L + 1, [down.head_slices(j) + down_bias for j in range(n_mlp)]))
        else:
            ups.append(UpstreamGroup("mlp", L, [f"mlp.{L}"], (f"{p}.{s['mlp']}", "output"), None, 2 * L + 1,
                                     [down.head_slices(0) + down_bias]))
    n = s["n_layers"]
    downs.append(DownstreamGroup("logits", n, ["logits"], (s["final_norm"], "input"), None, None, 2 * n, [[]]))
    return ComputationGraph(arch, n, H, KV, dh, d, d_mlp, mlp_head_dim, ups, downs)
