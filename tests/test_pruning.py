"""Exact candidate pruning (ct_fast.pruning): a deferred step of one backward computes the weight gradient of the
rows that can still enter the circuit only, and selects and updates exactly what it did without pruning."""

import pytest
import torch

from ct_fast import CircuitAdamW, CircuitTuner, ComputationGraph, CTFastError
from ct_fast.circuit import ParamSelection
from ct_fast.masked_linear import MaskedLinears
from ct_fast.testing import assert_close, random_batch, tiny_model


def _batches(n=3, batch=3, seq=7):
    return [random_batch(37, batch=batch, seq=seq, seed=s) for s in range(n)]


@pytest.fixture
def pruned_rows(monkeypatch):
    """Per finished deferred step: (candidate rows, all rows) over the linears the pruner resolved."""
    seen = []
    finish = MaskedLinears.finish

    def recording(self, selection):
        if self.pruner is not None:  # the last scored span's decisions, as finish applies them first
            self.pruner.settle()
        cand = total = 0
        for name, candidates in self.candidates.items():
            w = self.weight[name]
            total += w.numel()
            sel = candidates.get(w)
            cand += 0 if sel is None else sel.count * (w.numel() // sel.size)
        seen.append((cand, total, self.pruner is not None))
        return finish(self, selection)

    monkeypatch.setattr(MaskedLinears, "finish", recording)
    return seen


def _run(model, batches, prune: bool, **kw):
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), memory_mode="deferred", **kw)
    tuner.session.prune = prune
    return [tuner.step(b) for b in batches]


@pytest.mark.parametrize("top_n,threshold,mlp_head_dim", [(1, 0.0, None), (25, 0.0, None), (25, 0.0, 8),
                                                           ("all", 0.0, None), (40, 1e-3, 8)])
def test_pruned_deferred_equals_unpruned(arch, top_n, threshold, mlp_head_dim, pruned_rows):
    """Same circuits, same updates (fp32-close: the candidate rows' GEMM sums as the dense one), and the rows of
    no circuit bit-identical to the initial model; the pruner resolved every linear and skipped rows."""
    a, b, init = tiny_model(arch), tiny_model(arch), tiny_model(arch)
    if top_n == "all":
        top_n = ComputationGraph.from_model(a).n_edges
    kw = dict(top_n=top_n, threshold=threshold, mlp_head_dim=mlp_head_dim)
    ra, rb = _run(a, _batches(), True, **kw), _run(b, _batches(), False, **kw)
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
        assert x.loss == pytest.approx(y.loss, rel=1e-6)  # (the earlier steps' updates are fp32-close, not equal)
    touched = {}
    for r in ra:
        for name, mask in r.circuit.param_masks(a).items():
            touched[name] = touched.get(name, torch.zeros_like(mask)) | mask
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), init.parameters()):
        assert_close(p, q, name=name)
        assert torch.equal(p[~touched[name]], p0[~touched[name]]), name
    pruned = pruned_rows[:3]  # the pruned run came first
    assert all(on for _, _, on in pruned) and not any(on for _, _, on in pruned_rows[3:])
    for (cand, total, _), r in zip(pruned, ra):
        assert (cand > 0) == (r.tuned_params > 0)
        assert cand < total or threshold == 0 and top_n == len(r.circuit), pruned


@pytest.mark.parametrize("span", [1, 3])
def test_pruned_deferred_equals_unpruned_at_other_spans(span, monkeypatch):
    """``CT_FAST_SCORE_SPAN`` (``attribution.SCORE_SPAN``): the pruner follows the scorer's spans — the same circuits
    and updates as without pruning when 1 or 3 layers are scored together (3: a partial first span)."""
    from ct_fast import attribution

    monkeypatch.setattr(attribution, "SCORE_SPAN", span)
    a, b = tiny_model("llama", num_hidden_layers=4), tiny_model("llama", num_hidden_layers=4)
    ra, rb = _run(a, _batches(2), True, top_n=25), _run(b, _batches(2), False, top_n=25)
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(p, q, name=name)


def test_top_n_zero_computes_no_weight_gradient(pruned_rows):
    model = tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    _run(model, _batches(1), True, top_n=0)
    assert pruned_rows[0][0] == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("case", ["micro_batches", "nodes"])
def test_pruning_only_where_exact(case, pruned_rows):
    """Several micro-batches (scores change until the last) or selection by nodes (ranked by row and column sums):
    no pruner, and the step equals two_pass as before."""
    model = tiny_model("llama")
    batches = _batches(2)
    if case == "micro_batches":
        batches = [[{k: v[:1] for k, v in b.items()}, {k: v[1:] for k, v in b.items()}] for b in batches]
    _run(model, batches, True, top_n=25, selection="nodes" if case == "nodes" else "edges")
    assert pruned_rows and not any(on for _, _, on in pruned_rows)


def test_positions_of():
    cand = ParamSelection(0, 20, ((2, 5), (8, 12), (15, 16)))
    assert cand.positions_of(ParamSelection(0, 20, ((3, 5), (9, 11), (15, 16)))).ranges == ((1, 3), (4, 6), (7, 8))
    assert cand.positions_of(cand).full
    for outside in [((5, 6),), ((4, 9),), ((16, 17),)]:
        with pytest.raises(AssertionError, match="not inside"):
            cand.positions_of(ParamSelection(0, 20, outside))


def _loop(model, opt, steps):
    for micro in steps:
        for b in micro if isinstance(micro, list) else [micro]:
            model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        opt.step()
        yield opt.last_step
        opt.zero_grad()


def test_dropin_with_one_backward_per_step_prunes_and_equals_the_tuner(pruned_rows):
    a, b = tiny_model("qwen3"), tiny_model("qwen3")
    batches = _batches(3)
    want = _run(a, batches, True, top_n=25)
    opt = CircuitAdamW(b.parameters(), lr=1e-2, model=b, top_n=25, memory_mode="deferred", backwards_per_step=1)
    got = list(_loop(b, opt, batches))
    for x, y in zip(want, got):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)
    assert len(pruned_rows) == 6 and all(on and cand > 0 for cand, _, on in pruned_rows)


def test_decisions_are_applied_one_span_late(monkeypatch):
    """A scored span's decisions are applied as the next span is scored (on a GPU their copy to the host is long
    done by then: the host never drains the queue for them), the last span's as the gradients are finished; every
    span is decided once and every linear resolved."""
    from ct_fast.pruning import CandidatePruner

    events, resolved = [], set()
    for name in ("on_scored", "_decided"):
        real = getattr(CandidatePruner, name)
        monkeypatch.setattr(CandidatePruner, name,
                            lambda self, *a, _n=name, _r=real: (events.append(_n), _r(self, *a))[1])
    real_resolve, real_finish = CandidatePruner._resolve, MaskedLinears.finish
    monkeypatch.setattr(CandidatePruner, "_resolve", lambda self, m: (resolved.add(m), real_resolve(self, m))[1])
    monkeypatch.setattr(MaskedLinears, "finish", lambda self, sel: (events.append("finish"), real_finish(self, sel))[1])
    model = tiny_model("llama")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=25, memory_mode="deferred")
    tuner.step(_batches(1)[0])
    events = events[events.index("on_scored"):]  # (start() decides the writers nobody reads at once)
    scored = [i for i, e in enumerate(events) if e == "on_scored"]
    assert len(scored) >= 2 and events[1] != "_decided"  # the first span's flags are not read as they are made
    assert all(events[i + 1] == "_decided" for i in scored[1:])  # each earlier span's: as the next is scored
    assert events[-2:] == ["finish", "_decided"] and events.count("_decided") == len(scored)
    assert resolved == set(tuner.session.masked.modules)


def test_zero_grad_between_backwards_restarts_the_pruner():
    """backward, zero_grad, backward, step (backwards_per_step=1): the step is the second backward's alone."""
    a, b = tiny_model("llama"), tiny_model("llama")
    first, second = _batches(2)
    want = _run(a, [second], True, top_n=25)
    opt = CircuitAdamW(b.parameters(), lr=1e-2, model=b, top_n=25, memory_mode="deferred", backwards_per_step=1)
    inputs = lambda x: {k: x[k] for k in ("input_ids", "attention_mask", "labels")}  # noqa: E731
    b(**inputs(first)).loss.backward()
    opt.zero_grad()
    b(**inputs(second)).loss.backward()
    opt.step()
    assert [e[:2] for e in opt.last_step.circuit.edges] == [e[:2] for e in want[0].circuit.edges]
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


def test_a_second_backward_is_refused_with_the_fix():
    model = tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25, memory_mode="deferred",
                       backwards_per_step=1)
    with pytest.raises(CTFastError, match="backwards_per_step=1, but backward 2 began"):
        list(_loop(model, opt, [_batches(2)]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # a caught refusal does not make a step of the first backward: step() refuses it too, nothing is applied
    inputs = lambda x: {k: x[k] for k in ("input_ids", "attention_mask", "labels")}  # noqa: E731
    with pytest.raises(CTFastError, match="backward 2 began"):
        model(**inputs(_batches(1)[0])).loss.backward()
    with pytest.raises(CTFastError, match="backward 2 began"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and opt.last_step is None
    opt.zero_grad()  # and the loop carries on
    model(**inputs(_batches(1)[0])).loss.backward()
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(CTFastError, match="backwards_per_step must be None or an int"):
        CircuitAdamW(model.parameters(), model=tiny_model("llama"), top_n=25, backwards_per_step=0)


def test_pruning_with_activation_checkpointing(pruned_rows):
    """Checkpointed layers recompute their linears' inputs in the backward; the pruned step is the same."""
    from ct_fast import enable_activation_checkpointing

    a, b = tiny_model("llama"), tiny_model("llama")
    enable_activation_checkpointing(b)
    ra, rb = _run(a, _batches(2), True, top_n=25), _run(b, _batches(2), True, top_n=25)
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)
    assert all(on and cand > 0 for cand, _, on in pruned_rows)
