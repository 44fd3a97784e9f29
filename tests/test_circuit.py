"""Selection, parameter masks and sizes, JSON round-trip, schedules."""

import math

import pytest
import torch

from ct_fast import Circuit, ComputationGraph, CTFastError, EdgeScores, TopNSchedule, attribute


@pytest.fixture
def scores(model, batch):
    return attribute(model, batch)


def test_top_n_edges_is_the_sorted_top(scores):
    g = scores.graph
    c = scores.top_n(17)
    assert len(c) == 17
    s = scores.scores[g.edge_mask]
    kth = s.sort(descending=True).values[16]
    assert all(v >= kth for _, _, v in c.edges)
    assert all(g.edge_mask[g.up_index[u], g.down_index[d]] for u, d, _ in c.edges)
    assert [v for *_, v in c.edges] == sorted((v for *_, v in c.edges), reverse=True)
    assert set(c.nodes) == {u for u, _, _ in c.edges} | {d for _, d, _ in c.edges}


def test_node_weighted_selection(scores):
    S = scores.scores
    w = S * S.sum(1, keepdim=True) * S.sum(0, keepdim=True)
    w[~scores.graph.edge_mask] = -1
    c = scores.top_n(9, method="nodes")
    g = scores.graph
    picked = {(g.up_index[u], g.down_index[d]) for u, d, _ in c.edges}
    best = w.flatten().topk(9).indices
    assert picked == {(int(i) // S.shape[1], int(i) % S.shape[1]) for i in best}


def test_threshold_and_bounds(scores):
    g = scores.graph
    t = float(scores.scores[g.edge_mask].median())
    c = scores.top_n(g.n_edges, threshold=t)
    assert 0 < len(c) < g.n_edges and all(v > t for *_, v in c.edges)
    assert len(scores.top_n(0)) == 0
    with pytest.raises(CTFastError, match=rf"top_n={g.n_edges + 1} is larger than the {g.n_edges} edges"):
        scores.top_n(g.n_edges + 1)
    with pytest.raises(CTFastError, match="not one of"):
        scores.top_n(3, method="heads")


def test_param_masks_are_exactly_the_node_slices(model, batch):
    g = ComputationGraph.from_model(model, mlp_head_dim=8)
    S = torch.zeros(g.edge_mask.shape)
    up, down = g.up_index, g.down_index
    edges = [("attn.0.1", "attn.1.0.k"), ("embed", "mlp.0.2"), ("mlp.1.3", "logits"), ("attn.1.2", "mlp.1.0")]
    for u, d in edges:
        S[up[u], down[d]] = 1.0
    c = EdgeScores(S, g).top_n(4)
    masks = c.param_masks(model)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    for s in g.param_slices(["attn.0.1", "embed", "mlp.1.3", "attn.1.2"], ["attn.1.0.k", "mlp.0.2", "logits", "mlp.1.0"]):
        expected[s.param].narrow(s.dim, s.start, s.stop - s.start).fill_(True)
    assert masks.keys() == expected.keys()
    for n in masks:
        assert torch.equal(masks[n], expected[n]), n
    assert c.num_params == sum(int(m.sum()) for m in masks.values())
    assert math.isclose(c.fraction, c.num_params / sum(p.numel() for p in model.parameters()))
    # embeddings, norms and the unembedding stay frozen
    assert not any(masks[n].any() for n in masks if "norm" in n or "ln_" in n or "embed" in n or "wte" in n)


def test_json_round_trip(scores, tmp_path):
    c = scores.top_n(11)
    back = Circuit.from_json(c.to_json(), scores.graph)
    assert back.edges == c.edges and back.num_params == c.num_params
    c.save(tmp_path / "c.json")
    again = Circuit.load(tmp_path / "c.json", scores.graph)
    assert again.edges == c.edges
    with pytest.raises(CTFastError, match="not edges of this model"):
        Circuit.from_dict({"edges": [["mlp.9", "logits", 1.0]]}, scores.graph)
    g = scores.graph  # a later writer into an earlier reader: both nodes exist, the pair is no edge
    late, early = g.upstream_nodes[-1], g.downstream_nodes[0]
    with pytest.raises(CTFastError, match="not edges of this model"):
        Circuit.from_dict({"edges": [[late, early, 1.0]]}, g)
    with pytest.raises(CTFastError, match="listed more than once"):
        Circuit.from_dict({"edges": [list(c.edges[0])] * 2}, g)
    other = dict(c.to_dict(), graph=dict(c.to_dict()["graph"], d_model=g.d_model * 2))
    with pytest.raises(CTFastError, match="saved for another graph: d_model"):
        Circuit.from_dict(other, g)


def test_schedules():
    assert [TopNSchedule(5)(s) for s in (0, 10)] == [5, 5]
    lin = TopNSchedule(100, 20, steps=4, kind="linear")
    assert [lin(s) for s in range(6)] == [100, 80, 60, 40, 20, 20]
    cos = TopNSchedule(100, 0, steps=2, kind="cosine")
    assert [cos(s) for s in range(4)] == [100, 50, 0, 0]
    with pytest.raises(CTFastError):
        TopNSchedule(1, kind="step")
