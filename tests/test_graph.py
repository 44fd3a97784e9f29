"""Graph: node names, edges, and node -> parameter slices, checked against what the modules compute."""

import pytest
import torch
import transformers

from ct_fast import ComputationGraph, CTFastError, UnsupportedArchitectureError
from ct_fast.testing import tiny_config, tiny_model


def test_node_names_and_counts(arch, model):
    c = tiny_config(arch)
    g = ComputationGraph.from_model(model)
    L = g.n_layers
    H, KV = g.n_heads, g.n_kv_heads
    assert g.upstream_nodes[0] == "embed" and g.downstream_nodes[-1] == "logits"
    assert len(g.upstream_nodes) == 1 + L * (H + 1)
    assert len(g.downstream_nodes) == L * (H + 2 * KV + 1) + 1
    assert g.upstream_nodes[1:H + 2] == [f"attn.0.{h}" for h in range(H)] + ["mlp.0"]
    assert g.downstream_nodes[:H] == [f"attn.0.{h}.q" for h in range(H)]
    assert g.downstream_nodes[H:H + KV] == [f"attn.0.{h}.k" for h in range(KV)]
    assert "attn.1.1.v" in g.downstream_nodes and f"attn.0.{KV}.k" not in g.downstream_nodes
    if arch != "gpt2":
        assert KV < H  # GQA
        assert g.head_dim == c.head_dim


def test_edge_mask_is_residual_order(model):
    g = ComputationGraph.from_model(model)
    m = g.edge_mask
    up, down = g.up_index, g.down_index
    assert m.dtype == torch.bool and m.shape == (len(g.upstream_nodes), len(g.downstream_nodes))
    assert m[up["embed"]].all()  # the embedding feeds every reader
    assert not m[up["attn.0.1"], down["attn.0.0.q"]]  # no same-layer attention edges
    assert m[up["attn.0.1"], down["mlp.0"]]  # heads of L feed the MLP of L
    assert not m[up["mlp.0"], down["mlp.0"]]
    assert m[up["mlp.0"], down["attn.1.0.k"]] and m[up["mlp.1"], down["logits"]]
    assert not m[up["attn.1.0"], down["attn.0.0.q"]]
    # count: every (write position < read position) pair
    L, H, KV = g.n_layers, g.n_heads, g.n_kv_heads
    per_layer_down = H + 2 * KV
    expected = 0
    for l_up in range(-1, L):
        ups = 1 if l_up < 0 else H + 1
        for l_down in range(L):
            if l_up < 0:
                expected += per_layer_down + 1
            elif l_up < l_down:
                expected += ups * (per_layer_down + 1)
            elif l_up == l_down:
                expected += H  # heads of L -> mlp of L
        expected += ups  # -> logits
    assert g.n_edges == expected
    # the per-step readers' copy: made once per (device, dtype), again only if the mask itself is replaced
    on = g.edge_mask_on("cpu", torch.float32)
    assert on.dtype == torch.float32 and torch.equal(on.bool(), m) and g.edge_mask_on("cpu", torch.float32) is on
    g.edge_mask = m.clone()
    assert g.edge_mask_on("cpu", torch.float32) is not on


def test_unsupported_architecture_is_named():
    cfg = transformers.GPTNeoXConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                     intermediate_size=32, vocab_size=20)
    model = transformers.GPTNeoXForCausalLM(cfg)
    with pytest.raises(UnsupportedArchitectureError, match=r"GPTNeoXForCausalLM.*gpt2, llama"):
        ComputationGraph.from_model(model)


def test_mlp_head_dim_must_divide(model):
    for bad in (7, True, 8.0):  # (True read as width 1, 8.0 as a TypeError)
        with pytest.raises(CTFastError, match=f"mlp_head_dim={bad}"):
            ComputationGraph.from_model(model, mlp_head_dim=bad)
    import numpy as np

    graph = ComputationGraph.from_model(model, mlp_head_dim=np.int64(8))
    assert type(graph.mlp_head_dim) is int and graph.describe()["mlp_head_dim"] == 8


def test_a_graph_of_another_model_is_refused():
    """graph= built from another model (other heads, MLP width, biases) is refused by attribute, the tuner and the
    drop-in optimizer alike, naming what differs; the model's own graph (any MLP split) is accepted."""
    from ct_fast import CircuitAdamW, CircuitTuner, attribute
    from ct_fast.testing import random_batch

    model = tiny_model("llama")
    batch = random_batch(model.config.vocab_size)
    cfg = tiny_config("llama")
    others = {"n_heads": tiny_model("llama", num_attention_heads=cfg.num_attention_heads // 2,
                                    head_dim=2 * cfg.head_dim if getattr(cfg, "head_dim", None) else None),
              "d_mlp": tiny_model("llama", intermediate_size=cfg.intermediate_size + 8),
              "proj.bias is .* absent in the model": tiny_model("llama", attention_bias=True)}
    for what, other in others.items():
        graph = ComputationGraph.from_model(other)
        for use in (lambda: attribute(model, batch, graph=graph),
                    lambda: CircuitTuner(model, CircuitAdamW(model.parameters()), top_n=5, graph=graph),
                    lambda: CircuitAdamW(model.parameters(), model=model, top_n=5, graph=graph)):
            with pytest.raises(CTFastError, match=f"the graph does not describe this model: .*{what}"):
                use()
    for own in (ComputationGraph.from_model(model), ComputationGraph.from_model(model, mlp_head_dim=8)):
        own.check_model(model)
    # the other way round: a bias-free model's graph for a model with biases would leave them untrained
    with pytest.raises(CTFastError, match="proj.bias is absent in the graph"):
        ComputationGraph.from_model(model).check_model(tiny_model("llama", attention_bias=True))


def _perturbed(model, slices, scale=1.0):
    """A copy of the model whose parameters in ``slices`` got random noise."""
    import copy
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for s in slices:
            params[s.param].narrow(s.dim, s.start, s.stop - s.start).add_(torch.randn_like(
                params[s.param].narrow(s.dim, s.start, s.stop - s.start)) * scale)
    return m


@pytest.mark.parametrize("mlp_head_dim", [None, 8])
def test_reader_slices_change_only_their_head(model, mlp_head_dim):
    """Perturbing a downstream node's slices changes exactly that node's columns of each projection output."""
    g = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
    modules = dict(model.named_modules())
    x = torch.randn(2, 5, g.d_model)
    for grp in g.downstream_groups:
        if grp.reader is None:
            continue
        r, mod = grp.reader, modules[grp.reader.module]
        for j, name in enumerate(grp.names):
            pm = _perturbed(model, [s for s in g.downstream_params[name] if s.param.startswith(r.module + ".")])
            diff = (dict(pm.named_modules())[r.module](x) - mod(x)).abs().amax((0, 1)) > 0
            cols = torch.zeros_like(diff)
            cols[r.offset + j * r.width: r.offset + (j + 1) * r.width] = True
            assert torch.equal(diff, cols), name


@pytest.mark.parametrize("mlp_head_dim", [None, 8])
def test_writer_slices_reproduce_node_outputs(model, mlp_head_dim):
    """An upstream node's weight slice applied to its own input columns gives its share of the output:
    the shares of all nodes plus the shared bias sum to the module output."""
    g = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for grp in g.upstream_groups:
        if grp.writer is None:
            continue
        w = grp.writer
        z = torch.randn(4, w.n * w.width)
        total = 0
        for j, name in enumerate(grp.names):
            (ws,) = [s for s in g.upstream_params[name] if s.param == w.weight]
            W = params[w.weight].narrow(ws.dim, ws.start, ws.stop - ws.start)
            zj = z[:, ws.start:ws.stop]
            total = total + (zj @ W.T if w.layout == "linear" else zj @ W)
        if w.has_bias:
            total = total + params[w.bias]
            assert all(any(s.param == w.bias and s.stop - s.start == g.d_model for s in g.upstream_params[n])
                       for n in grp.names)
        torch.testing.assert_close(total, modules[w.module](z))


def test_gpt2_fused_c_attn_slices():
    g = ComputationGraph.from_model(tiny_model("gpt2"))
    d, dh = g.d_model, g.head_dim
    (w, b) = g.downstream_params["attn.1.2.k"]
    assert (w.param, w.dim, w.start, w.stop) == ("transformer.h.1.attn.c_attn.weight", 1, d + 2 * dh, d + 3 * dh)
    assert (b.param, b.dim, b.start, b.stop) == ("transformer.h.1.attn.c_attn.bias", 0, d + 2 * dh, d + 3 * dh)
    (w, b) = g.upstream_params["attn.0.1"]
    assert (w.param, w.dim, w.start, w.stop) == ("transformer.h.0.attn.c_proj.weight", 0, dh, 2 * dh)
    assert (b.param, b.start, b.stop) == ("transformer.h.0.attn.c_proj.bias", 0, d)


def test_llama_gqa_slices():
    g = ComputationGraph.from_model(tiny_model("qwen2"), mlp_head_dim=10)
    dh = g.head_dim
    names = [(s.param, s.dim, s.start, s.stop) for s in g.downstream_params["attn.0.1.v"]]
    assert names == [("model.layers.0.self_attn.v_proj.weight", 0, dh, 2 * dh),
                     ("model.layers.0.self_attn.v_proj.bias", 0, dh, 2 * dh)]
    names = [(s.param, s.dim, s.start, s.stop) for s in g.downstream_params["mlp.1.3"]]
    assert names == [("model.layers.1.mlp.gate_proj.weight", 0, 30, 40), ("model.layers.1.mlp.up_proj.weight", 0, 30, 40)]
    assert [(s.param, s.dim, s.start, s.stop) for s in g.upstream_params["mlp.1.0"]] == [
        ("model.layers.1.mlp.down_proj.weight", 1, 0, 10)]
    assert [(s.param, s.dim) for s in g.upstream_params["attn.1.3"]] == [("model.layers.1.self_attn.o_proj.weight", 1)]
