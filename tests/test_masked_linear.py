"""The masked weight-gradient autograd layer: compact dW of selected rows/columns equals the dense
gradient's slice, input gradients and outputs are unchanged, and frozen parameters get no gradient."""

import pytest
import torch

from ct_fast import ComputationGraph, ParamSelection, ops
from ct_fast.masked_linear import MaskedLinears
from ct_fast.circuit import selections_by_param
from ct_fast.testing import assert_close, random_batch, tiny_model

SHAPES = [(1, 1, 1), (5, 3, 7), (33, 17, 9), (64, 48, 40)]


@pytest.mark.parametrize("n,d_in,d_out", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("out_features", [True, False])
@pytest.mark.parametrize("which", ["empty", "one", "some", "all"])
def test_masked_weight_grad_matches_dense_slice(n, d_in, d_out, out_features, which):
    g = torch.Generator().manual_seed(n * 31 + d_in)
    x, go = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    size = d_out if out_features else d_in
    index = {"empty": torch.zeros(0, dtype=torch.long), "one": torch.tensor([size - 1]),
             "some": torch.arange(0, size, 2), "all": None}[which]
    dense = go.t() @ x  # [out, in]
    want = dense if index is None else (dense[index] if out_features else dense[:, index].t())
    if index is None and not out_features:
        want = dense.t()
    got = ops.masked_weight_grad(x, go, index, out_features)
    assert got.dtype == torch.float32
    assert_close(got, want)
    bias = ops.masked_bias_grad(go, index if out_features else None)
    assert_close(bias, go.sum(0) if not out_features or index is None else go.sum(0)[index])


@pytest.mark.parametrize("deferred", [False, True])
def test_masked_linears_on_a_model(arch, deferred):
    model = tiny_model(arch)
    graph = ComputationGraph.from_model(model, mlp_head_dim=8)
    batch = random_batch(37)
    # dense reference
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    names = [n for n, _ in model.named_parameters()]
    dense = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    # a selection touching rows, columns, whole tensors and biases
    from ct_fast import EdgeScores
    S = torch.zeros(graph.edge_mask.shape)
    S[graph.up_index["attn.1.1"], graph.down_index["mlp.1.2"]] = 1
    S[graph.up_index["mlp.0.3"], graph.down_index["attn.1.0.v"]] = 1
    S[graph.up_index["embed"], graph.down_index["attn.0.1.q"]] = 1
    circuit = EdgeScores(S, graph).top_n(3)
    named = circuit.param_selections()
    sel = selections_by_param(model, named)
    with MaskedLinears(model, graph) as masked:
        masked.selection = None if deferred else sel
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        assert_close(out.loss, loss.detach())
        torch.autograd.grad(out.loss, [masked.anchor], allow_unused=True)
        if deferred:
            masked.finish(sel)
        grads = masked.take_grad_rows()
    assert all(p.grad is None for p in model.parameters())  # nothing dense was written
    params = dict(model.named_parameters())
    assert {id(p) for p in grads} == {id(params[n]) for n in named}
    for name, s in named.items():
        d = dense[name]
        want = d.movedim(s.dim, 0)[s.index()]
        assert_close(grads[params[name]], want, name=name)
    for m in dict(model.named_modules()).values():
        assert "forward" not in vars(m)  # the class's forward is back


def test_set_grad_rows_feeds_the_optimizer():
    from ct_fast import CircuitAdamW
    p = torch.randn(6, 4, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    sel = ParamSelection(1, 4, ((1, 3),))
    a, b = CircuitAdamW([p], lr=0.1), CircuitAdamW([q], lr=0.1)
    a.set_circuit({p: sel})
    b.set_circuit({q: sel})
    grad = torch.randn(6, 4)
    a.set_grad_rows({p: grad[:, 1:3].t().contiguous()})
    q.grad = grad
    a.step()
    b.step()
    assert torch.equal(p, q)
    a.set_grad_rows({p: torch.zeros(3, 6)})
    with pytest.raises(Exception, match="does not match"):
        a.step()


def test_selection_indices_are_built_once_per_selection_value():
    """A selection's row index is built once per value (a reused circuit, or the parameters a new circuit selects as
    before, build none) and matches the selected rows; whole selections need none; the cache stays bounded."""
    model = tiny_model("llama")
    masked = MaskedLinears(model, ComputationGraph.from_model(model))
    sel = ParamSelection(0, 40, ((2, 5), (9, 10), (30, 33)))
    index = masked._index(sel, torch.device("cpu"))
    assert index.tolist() == [2, 3, 4, 9, 30, 31, 32]
    assert masked._index(ParamSelection(0, 40, ((2, 5), (9, 10), (30, 33))), torch.device("cpu")) is index
    assert masked._index(ParamSelection(0, 40, ((2, 5), (9, 11), (30, 33))), torch.device("cpu")) is not index
    assert masked._index(ParamSelection(0, 40, ((0, 40),)), torch.device("cpu")) is None
    for start in range(8 * len(masked.modules) + 5):
        masked._index(ParamSelection(0, 10 ** 6, ((start, start + 1),)), torch.device("cpu"))
    assert len(masked._indexed) <= 8 * len(masked.modules)
