"""The tuner step: faithful circuit, exact masked update, accumulation, refresh, errors."""

import copy

import pytest
import torch

import ct_fast
from ct_fast import CircuitAdamW, CircuitSGD, CircuitTuner, CTFastError, NonFiniteError, TopNSchedule, attribute
from ct_fast.testing import assert_close, random_batch, tiny_model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("metric", ["loss", "logit_diff"])
def test_faithful_step_updates_exactly_the_circuit(arch, model, batch, metric):
    batch = dict(batch, target_pos=torch.tensor([5, 4, 3]), answer=torch.tensor([1, 2, 3]),
                 wrong_answer=torch.tensor([4, 5, 6]))
    twin = copy.deepcopy(model)
    expected_circuit = attribute(twin, batch, metric=metric).top_n(25)
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=25, metric=metric)
    before = _snapshot(model)
    result = tuner.step(batch)
    assert result.circuit.edges == expected_circuit.edges
    # the reference update: full training-loss gradient, torch AdamW on the circuit slices only
    loss = twin(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    loss.backward()
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    ref.step()
    masks = result.circuit.param_masks(model)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        m = masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{n} changed outside the circuit"
        assert_close(p.detach()[m], q.detach()[m], name=n)
        if m.any():
            assert not torch.equal(p.detach()[m], before[n][m])
    assert result.tuned_params == result.circuit.num_params > 0
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert set(result.timings) == {"forward", "attribution", "selection", "backward", "optimizer", "total"}
    # on the CPU the host's phase times are the phase times (the totals differ by the final device wait: none here)
    assert set(result.host_timings) == set(result.timings)
    assert all(result.host_timings[k] == result.timings[k] for k in result.timings if k != "total")
    assert 0 < result.host_timings["total"] <= result.timings["total"]
    assert all(p.grad is None for p in model.parameters())


def test_outcome_metric_over_a_micro_batch_without_label_tokens():
    """An outcome metric scores every micro-batch, one without label tokens too (it weighs 0 in the training
    loss, whose NaN there is not the step's): the step equals the whole batch's (it was refused as non-finite)."""
    b = random_batch(37, batch=4, seq=8)
    b = dict(b, target_pos=torch.tensor([5, 4, 3, 2]), answer=torch.tensor([1, 2, 3, 4]),
             wrong_answer=torch.tensor([4, 5, 6, 7]))
    b["labels"] = b["labels"].clone()
    b["labels"][2:] = -100
    halves = [{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}]
    results, models = [], []
    for given in (b, halves):
        model = tiny_model("llama")
        results.append(CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=10,
                                    metric="logit_diff").step(given))
        models.append(model)
    assert [e[:2] for e in results[1].circuit.edges] == [e[:2] for e in results[0].circuit.edges]
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-5)
    assert results[1].metric == pytest.approx(results[0].metric, rel=1e-4, abs=1e-6)
    for p, q in zip(*(m.parameters() for m in models)):
        assert_close(q, p)


def test_tuner_state_dict_resumes_exactly():
    """tuner.state_dict() (step count, newest circuit) with the model's and optimizer's: a resume with
    refresh_every=2 refreshes and reuses as the uninterrupted run (a fresh tuner refreshed at once)."""
    import io

    batches = [random_batch(37, seed=s) for s in range(5)]

    def build(model):
        return CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20, refresh_every=2)

    a = tiny_model("llama")
    ta = build(a)
    want = [ta.step(b) for b in batches]
    b_model = tiny_model("llama")
    tb = build(b_model)
    for batch in batches[:3]:
        tb.step(batch)
    buf = io.BytesIO()
    torch.save({"model": b_model.state_dict(), "opt": tb.optimizer.state_dict(), "tuner": tb.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = tiny_model("llama", seed=5)
    c.load_state_dict(saved["model"])
    tc = build(c)
    tc.optimizer.load_state_dict(saved["opt"])
    tc.load_state_dict(saved["tuner"])
    got = [tc.step(batch) for batch in batches[3:]]
    assert [r.refreshed for r in got] == [r.refreshed for r in want[3:]] == [False, True]
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_micro_batches_equal_the_whole_batch(batch, ablation):
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    ta = CircuitTuner(a, CircuitSGD(a.parameters(), lr=0.1, momentum=0.9), top_n=30, ablation=ablation)
    tb = CircuitTuner(b, CircuitSGD(b.parameters(), lr=0.1, momentum=0.9), top_n=30, ablation=ablation)
    ra = ta.step(batch)
    rb = tb.step([{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}])
    assert [e[:2] for e in ra.circuit.edges] == [e[:2] for e in rb.circuit.edges]
    assert rb.loss == pytest.approx(ra.loss, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q)


@pytest.mark.parametrize("mode", ["deferred", "two_pass"])
def test_micro_batch_without_label_tokens_weighs_zero(batch, mode):
    """A micro-batch whose labels are all -100 adds no loss and no gradient, but its examples and tokens count
    as in the same data given as one batch (1/B, mean ablation): same circuit, same update."""
    labels = batch["labels"].clone()
    labels[2] = -100
    whole_batch = dict(batch, labels=labels)
    a, b = tiny_model("llama"), tiny_model("llama")
    ta = CircuitTuner(a, CircuitAdamW(a.parameters(), lr=1e-2), top_n=20, memory_mode=mode)
    tb = CircuitTuner(b, CircuitAdamW(b.parameters(), lr=1e-2), top_n=20, memory_mode=mode)
    ra = ta.step(whole_batch)
    rb = tb.step([{k: v[:2] for k, v in whole_batch.items()}, {k: v[2:] for k, v in whole_batch.items()}])
    assert [e[:2] for e in ra.circuit.edges] == [e[:2] for e in rb.circuit.edges]
    assert rb.loss == pytest.approx(ra.loss, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)
    with pytest.raises(CTFastError, match="no micro-batch has a label token"):
        ta.step([{k: v[2:] for k, v in whole_batch.items()}])


def test_refresh_every_and_schedule(model, batch):
    sched = TopNSchedule(40, 10, steps=2, kind="linear")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3), top_n=sched, refresh_every=2)
    results = [tuner.step(random_batch(37, seed=s)) for s in range(4)]
    assert [r.refreshed for r in results] == [True, False, True, False]
    assert [r.memory_mode for r in results] == ["deferred", "reused", "deferred", "reused"]
    assert results[1].circuit is results[0].circuit and results[3].circuit is results[2].circuit
    assert [r.top_n for r in results] == [40, 40, 10, 10]  # a reused circuit keeps its size, and reports it
    assert [len(r.circuit) for r in results] == [40, 40, 10, 10]
    assert results[1].timings["attribution"] == 0.0


def test_steps_between_refreshes_reuse_the_optimizers_step_layout():
    """Between refreshes the session hands the optimizer the same selection, so its steps reuse the layout planned at
    the refresh (no per-parameter planning); the parameters equal those of the same steps each planned afresh."""
    runs = []
    for fresh in (False, True):
        model = tiny_model("llama")
        opt = CircuitAdamW(model.parameters(), lr=1e-2)
        tuner = CircuitTuner(model, opt, top_n=20, refresh_every=3)
        plan, planned = opt._plan, []
        opt._plan = lambda gi, group, plan=plan, planned=planned: planned.append(1) or plan(gi, group)
        steps = []
        for s in range(6):
            if fresh:
                opt._layouts = None
            n = len(planned)
            tuner.step(random_batch(37, seed=s))
            steps.append(len(planned) > n)
        runs.append((model, steps))
    (model, steps), (fresh_model, fresh_steps) = runs
    assert steps == [True, False, False, True, False, False] and all(fresh_steps)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("arch,mode", [("llama", "reused"), ("gpt2", "reused"), ("llama", "lagged")])
def test_linears_outside_a_known_circuit_run_plain(arch, mode, monkeypatch):
    """With the circuit known before the forward (steps between refreshes, lagged), the linears it gives no rows run
    plain (no autograd function; between refreshes no graph at all before the circuit's first linear, so no
    backward there): same circuits and parameter bits as with the function on every linear (GPT-2: Conv1D)."""
    from ct_fast.masked_linear import MaskedLinears

    def run(plain: bool):
        if not plain:
            monkeypatch.setattr(MaskedLinears, "plain_outside", lambda self, selection: None)
        model = tiny_model(arch, num_hidden_layers=4)
        kw = dict(refresh_every=3) if mode == "reused" else dict(memory_mode="lagged")
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=3, **kw)
        masked = tuner.session.masked
        fn_calls, calls = [], []  # names the function ran for; (name, output requires grad) in forward order
        apply = ct_fast.masked_linear._MaskedLinearFn.apply
        monkeypatch.setattr(ct_fast.masked_linear._MaskedLinearFn, "apply",
                            lambda *a: fn_calls.append(a[5]) or apply(*a))
        for name, m in masked.modules.items():
            m.register_forward_hook(lambda m, a, out, name=name: calls.append((name, out.requires_grad)))
        circuits, seen = [], []
        for s in range(3):
            fn_calls.clear()
            calls.clear()
            circuits.append(tuner.step(random_batch(37, seed=s)).circuit.edges)
            seen.append((list(fn_calls), list(calls), set(masked._plain)))
        monkeypatch.undo()
        return model, circuits, seen

    model, circuits, seen = run(True)
    ref_model, ref_circuits, ref_seen = run(False)
    assert circuits == ref_circuits
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    for step, ((called, calls, plain), (ref_called, ref_calls, ref_plain)) in enumerate(zip(seen, ref_seen)):
        assert not ref_plain and ref_called == [n for n, _ in ref_calls]
        if step == 0:  # a refresh step (lagged: no previous circuit): none known before its forward
            assert not plain
            continue
        assert plain and called == [n for n, _ in calls if n not in plain] and not set(called) & plain
        first = next(i for i, (n, _) in enumerate(calls) if n not in plain)
        assert all(requires for _, requires in calls[first:])
        if mode == "reused":  # (lagged: its scoring taps need gradients everywhere)
            assert first > 0 and not any(requires for _, requires in calls[:first])


def test_corrupted_ablation_step(model, batch):
    corrupted = dict(batch, input_ids=torch.randint(1, 37, batch["input_ids"].shape))
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3), top_n=12, ablation="corrupted")
    want = attribute(copy.deepcopy(model), batch, ablation="corrupted", corrupted_batch=corrupted).top_n(12)
    r = tuner.step(batch, corrupted_batch=corrupted)
    assert r.circuit.edges == want.edges
    with pytest.raises(CTFastError, match="corrupted_batch has shape"):
        tuner.step(batch, corrupted_batch={k: v[:2] for k, v in corrupted.items()})
    mask = corrupted["attention_mask"].clone()
    mask[0, -1] = 0  # padded elsewhere: that token would be scored against a padding activation
    with pytest.raises(CTFastError, match=r"examples \[0\] of corrupted_batch are padding"):
        tuner.step(batch, corrupted_batch=dict(corrupted, attention_mask=mask))


def test_bad_input_leaves_model_untouched(model, batch):
    opt = CircuitAdamW(model.parameters(), lr=1e-2)
    tuner = CircuitTuner(model, opt, top_n=10)
    before = _snapshot(model)
    with pytest.raises(CTFastError, match="labels"):
        tuner.step({"input_ids": batch["input_ids"]})
    with pytest.raises(CTFastError, match="positions"):
        CircuitTuner(model, opt, top_n=10, positions=torch.ones(2, 2, dtype=torch.bool)).step(batch)
    with pytest.raises(CTFastError, match="out of range"):
        CircuitTuner(model, opt, top_n=10 ** 9)
    for bad in (0.05, 2.7, True, "10"):  # not silently 0, 2, 1 or 10 edges
        with pytest.raises(CTFastError, match=f"top_n={bad!r}: expected a whole number of edges"):
            CircuitTuner(model, opt, top_n=bad)
    with pytest.raises(CTFastError, match=r"top_n=0.05: .*a share of the edges\? top_n=round"):
        CircuitAdamW(model.parameters(), model=model, top_n=0.05)
    with pytest.raises(CTFastError, match="TopNSchedule end=7.5"):
        TopNSchedule(10, 7.5, 3, "linear")
    with pytest.raises(CTFastError, match="CircuitAdamW or CircuitSGD"):
        CircuitTuner(model, torch.optim.AdamW(model.parameters()), top_n=10)
    for option, match in (({"threshold": float("nan")}, "threshold must be a finite number"),  # (0-edge circuits)
                          ({"threshold": None}, "threshold must be"),  # (a TypeError after the backward)
                          ({"token_budget": 2.5}, "token_budget must be None or a whole number"),
                          ({"token_budget": 0}, "token_budget must be"),
                          ({"token_budget": 4, "pool": True}, "cannot be combined with pool"),
                          ({"selection": "node"}, "selection='node' is not one of"),
                          ({"refresh_every": True}, "refresh_every must be")):
        with pytest.raises(CTFastError, match=match):  # at construction, before any step
            CircuitTuner(model, opt, top_n=10, **option)
    nan_metric = CircuitTuner(model, opt, top_n=10, metric=lambda logits, b: logits.mean() * float("nan"))
    with pytest.raises(NonFiniteError):
        nan_metric.step(batch)
    with torch.no_grad():  # NaN in a weight: the loss is NaN, the step is refused
        w = next(p for n, p in model.named_parameters() if "embed" in n or "wte" in n)
        saved = w[3].clone()
        w[3] = float("nan")
        with pytest.raises(NonFiniteError, match="refused"):
            tuner.step(dict(batch, input_ids=torch.full_like(batch["input_ids"], 3)))
        w[3] = saved
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert opt.state_bytes() == 0  # no optimizer state was allocated
    tuner.step(batch)  # still usable afterwards


@pytest.mark.parametrize("mode", ["deferred", "two_pass"])
def test_positions_name_task_fields_as_in_attribute(batch, mode):
    """positions= as a batch key or a callable of the whole batch (task fields beside the model's inputs), as
    ``attribute`` takes them: the tuner's circuit is attribute's, also over micro-batches."""
    batch = dict(batch, target_pos=torch.tensor([5, 4, 3]), answer=torch.tensor([1, 2, 3]),
                 wrong_answer=torch.tensor([4, 5, 6]))
    batch["where"] = torch.nn.functional.one_hot(batch["target_pos"], batch["input_ids"].shape[1]).bool()
    at_target = lambda b: torch.nn.functional.one_hot(b["target_pos"], b["input_ids"].shape[1]).bool()  # noqa: E731
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    for positions in ("where", at_target):
        model = tiny_model("llama")
        want = attribute(copy.deepcopy(model), batch, metric="logit_diff", positions=positions).top_n(15)
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=15, metric="logit_diff",
                             positions=positions, memory_mode=mode)
        assert tuner.step(batch).circuit.edges == want.edges
        model = tiny_model("llama")
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=15, metric="logit_diff",
                             positions=positions, memory_mode=mode)
        assert [e[:2] for e in tuner.step(halves).circuit.edges] == [e[:2] for e in want.edges]


@pytest.mark.parametrize("last_unlabelled", [False, True])
@pytest.mark.parametrize("arch,dropout", [("llama", {"attention_dropout": 0.3}),
                                          ("gpt2", {"resid_pdrop": 0.3, "attn_pdrop": 0.3, "embd_pdrop": 0.3})])
def test_dropout_two_pass_equals_deferred_over_micro_batches(batch, arch, dropout, last_unlabelled):
    """In train mode with dropout, two_pass's training pass runs each micro-batch's forward again from the RNG state
    its scoring forward started from: the same masks, so the same circuit and update as deferred's one forward,
    and the generator ends where deferred leaves it — also when the last micro-batch has no label token (scored,
    with a forward of its own, but not trained: the training pass does not run it again)."""
    if last_unlabelled:
        batch = dict(batch, labels=batch["labels"].clone())
        batch["labels"][2:] = -100
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    runs = []
    for mode in ("deferred", "two_pass"):
        model = tiny_model(arch, **dropout).train()
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20, memory_mode=mode)
        torch.manual_seed(7)
        r = tuner.step(halves)
        runs.append((r, _snapshot(model), torch.rand(4)))
    (a, pa, ra), (b, pb, rb) = runs
    assert [e[:2] for e in a.circuit.edges] == [e[:2] for e in b.circuit.edges]
    assert b.loss == pytest.approx(a.loss, rel=1e-6)
    for n in pa:
        assert_close(pb[n], pa[n], name=n)
    assert torch.equal(ra, rb)


@pytest.mark.parametrize("mode", ["deferred", "two_pass", "lagged", "reused"])
def test_nan_loss_is_refused_after_the_backward_in_every_mode(batch, mode):
    """The losses are read once per pass, after its backwards (on a GPU a read between a forward and its backward
    drains the queue): a NaN loss in any micro-batch is still refused with its own message, whatever the scoring
    backward made of it, the model and the optimizer untouched, the tuner usable afterwards."""
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2)
    options = dict(refresh_every=100) if mode == "reused" else dict(memory_mode=mode)
    tuner = CircuitTuner(model, opt, top_n=20, **options)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    if mode in ("reused", "lagged"):
        tuner.step(batch)  # a circuit to reuse (lagged: the one the next step updates)
    before, state = _snapshot(model), opt.state_bytes()
    order = []
    read, backward = ct_fast.tuner._read_losses, torch.autograd.backward

    def logged_read(*args, **kwargs):
        order.append("read")
        return read(*args, **kwargs)

    def logged_backward(*args, **kwargs):
        order.append("backward")
        return backward(*args, **kwargs)

    emb = model.get_input_embeddings().weight
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ct_fast.tuner, "_read_losses", logged_read)
        mp.setattr(torch.autograd, "backward", logged_backward)
        # a token of the second micro-batch only: its loss alone is NaN
        token = min(set(halves[1]["input_ids"].flatten().tolist()) - set(halves[0]["input_ids"].flatten().tolist()))
        order.clear()
        with torch.no_grad():
            emb[token] = float("nan")
        try:
            with pytest.raises(NonFiniteError, match="the training loss is nan"):
                tuner.step(halves)
        finally:
            with torch.no_grad():
                emb[token] = before["model.embed_tokens.weight"][token]
    assert order == ["backward", "backward", "read"]  # both micro-batches' backwards, then one read
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert opt.state_bytes() == state
    assert tuner.step(halves).tuned_params > 0  # still usable afterwards


def test_mlp_heads_and_node_selection(batch):
    model = tiny_model("llama")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3), top_n=15, selection="nodes",
                         mlp_head_dim=10)
    want = attribute(copy.deepcopy(model), batch, graph=tuner.graph).top_n(15, method="nodes")
    r = tuner.step(batch)
    assert r.circuit.edges == want.edges and len(r.circuit) == 15
    assert "mlp.0.3" in tuner.graph.upstream_nodes and "mlp.1.3" in tuner.graph.downstream_nodes
    assert ct_fast.Circuit.from_json(r.circuit.to_json(), tuner.graph).num_params == r.tuned_params


def test_frozen_parameters_stay_frozen(batch):
    """requires_grad=False is respected even when the optimizer holds the parameter and the circuit owns it."""
    model = tiny_model("gpt2")
    for n, p in model.named_parameters():
        if n.startswith("transformer.h.0.attn"):
            p.requires_grad_(False)
    opt = CircuitAdamW(model.parameters(), lr=1e-2)
    tuner = CircuitTuner(model, opt, top_n=ct_fast.ComputationGraph.from_model(model).n_edges)
    before = _snapshot(model)
    tuner.step(batch)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_dense_steps_then_circuit_steps(batch):
    """A dense warm-up step (state along axis 0) followed by circuit steps selecting columns moves the state
    to the new axis instead of failing half-way."""
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2)
    model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tuner = CircuitTuner(model, opt, top_n=40)
    r = tuner.step(batch)
    assert any("o_proj" in s.param or "down_proj" in s.param for s in
               tuner.graph.param_slices(r.circuit.upstream, r.circuit.downstream))


def test_token_budget_differs_between_steps(batch):
    model = tiny_model("gpt2")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=0.0), top_n=10, token_budget=4)
    seen = []
    orig = ct_fast.AttributionRun._budget

    def spy(self, pos):
        out = orig(self, pos)
        seen.append(out[0].nonzero().tolist())
        return out

    ct_fast.AttributionRun._budget = spy
    try:
        for _ in range(3):
            tuner.step(batch)
    finally:
        ct_fast.AttributionRun._budget = orig
    assert len({str(s) for s in seen}) == 3


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_bf16_step_touches_only_the_circuit(arch, batch):
    model = tiny_model(arch, dtype=torch.bfloat16)
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20)
    before = _snapshot(model)
    r = tuner.step(batch)
    masks = r.circuit.param_masks(model)
    changed = 0
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
        changed += int((p.detach() != before[n]).sum())
    assert changed > 0 and torch.isfinite(torch.tensor(r.loss))
