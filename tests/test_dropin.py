"""The drop-in optimizers (``CircuitAdamW(..., model=model, top_n=N)``) in an ordinary training loop: equal to
CircuitTuner step for step, gradient accumulation, only circuit rows change and no tunable weight gets a
``.grad``, no_grad forwards pass through, clipping, schedulers, autocast, NaN refusal, checkpoints."""

import copy
import io

import pytest
import torch

import ct_fast
from ct_fast import CircuitAdamW, CircuitSGD, CircuitTuner, CTFastError, NonFiniteError, TopNSchedule
from ct_fast.testing import assert_close, random_batch, tiny_model

OPTIMIZERS = {"adamw": (CircuitAdamW, dict(lr=1e-2, weight_decay=0.1)), "sgd": (CircuitSGD, dict(lr=0.1, momentum=0.9))}


def _batches(n, seq=7, seed=0):
    return [random_batch(37, seq=seq, seed=seed + s) for s in range(n)]


def _inputs(b):
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def _loop(model, opt, batches, weights=None):
    """The user's loop: forward, backward (k per step when a step is a list), step, zero_grad."""
    for step in batches:
        micro = step if isinstance(step, list) else [step]
        w = weights or [1.0] * len(micro)
        for b, wi in zip(micro, w):
            (model(**_inputs(b)).loss * wi).backward()
        opt.step()
        yield opt.last_step
        opt.zero_grad()


def _edges(circuit):
    return [e[:2] for e in circuit.edges]


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("refresh,schedule", [(1, None), (4, None), (1, TopNSchedule(40, end=10, steps=3))])
def test_loop_equals_tuner(opt_name, refresh, schedule):
    cls, kw = OPTIMIZERS[opt_name]
    a, b = tiny_model("llama"), tiny_model("llama")
    batches = _batches(5)
    top = schedule or 25
    tuner = CircuitTuner(a, cls(a.parameters(), **kw), top_n=top, refresh_every=refresh)
    want = [tuner.step(x) for x in batches]
    opt = cls(b.parameters(), **kw, model=b, top_n=top, refresh_every=refresh)
    got = list(_loop(b, opt, batches))
    for r, c in zip(want, got):
        assert _edges(c.circuit) == _edges(r.circuit) and c.refreshed == r.refreshed and c.top_n == r.top_n
        assert c.memory_mode == r.memory_mode
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_accumulated_backwards_equal_micro_batches(opt_name, arch):
    """k backwards (each weighted by its share of label tokens) before one step == one tuner step on the list."""
    cls, kw = OPTIMIZERS[opt_name]
    a, b = tiny_model(arch), tiny_model(arch)
    steps = [[random_batch(37, batch=2, seed=10 * s + i) for i in range(3)] for s in range(2)]
    tuner = CircuitTuner(a, cls(a.parameters(), **kw), top_n=30)
    want = [tuner.step(micro) for micro in steps]
    opt = cls(b.parameters(), **kw, model=b, top_n=30)
    got = []
    for micro in steps:
        n = [int((m["labels"][:, 1:] != -100).sum()) for m in micro]
        got += list(_loop(b, opt, [micro], [x / sum(n) for x in n]))
    for r, c in zip(want, got):
        assert _edges(c.circuit) == _edges(r.circuit)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


def test_first_lagged_step_of_your_loop_scores_and_updates_nothing():
    """No earlier circuit to update: the first lagged step selects its batch's circuit and applies an empty one,
    keeping no dense weight gradient (deferred's, which auto chose lagged to avoid); the second applies the first's
    circuit to its own batch's gradient, as CircuitTuner's lagged steps do."""
    model, twin = tiny_model("llama"), tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20, memory_mode="lagged")
    first, second = _batches(2)
    model(**_inputs(first)).loss.backward()
    assert not opt.tuning.masked.dense and not opt.tuning.masked.saved
    opt.step()
    assert len(opt.last_step.circuit) == 0 and opt.last_step.circuit.fraction == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    selected = opt.tuning.circuit
    assert _edges(selected) == _edges(ct_fast.attribute(twin, _inputs(first)).top_n(20))
    opt.zero_grad()
    model(**_inputs(second)).loss.backward()
    opt.step()
    assert opt.last_step.circuit is selected


def test_only_the_circuit_changes_and_no_full_gradient(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20, memory_mode="lagged")
    tunable = set(opt.tuning.graph.tunable_params)
    seen = []
    for p in model.parameters():  # fires if a backward ever reaches a parameter's .grad
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: seen.append(p.shape))
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for b in _batches(3):
        model(**_inputs(b)).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        for n, m in opt.last_step.circuit.param_masks(model).items():
            masks[n] |= m
        opt.zero_grad()
    assert not seen
    for n, p in model.named_parameters():
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), f"{n} changed outside every circuit"
        if n not in tunable:
            assert not masks[n].any() and not p.requires_grad  # frozen while circuit-tuning
    opt.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_no_grad_forwards_pass_through():
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    opt = CircuitSGD(model.parameters(), lr=0.1, model=model, top_n=20)
    b = _batches(1)[0]
    with torch.no_grad():
        out = model(**_inputs(b))
        ids = model.generate(b["input_ids"][:1, :3], max_new_tokens=4, do_sample=False)
    assert opt.tuning.run is None and opt.tuning.mode is None  # nothing was recorded
    assert torch.equal(out.logits, twin(**_inputs(b)).logits)
    assert torch.equal(ids, twin.generate(b["input_ids"][:1, :3], max_new_tokens=4, do_sample=False))
    opt.step()  # no backward since the last step: nothing happens
    assert opt.last_step is None and all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    # an evaluation forward between the backward and the step changes nothing
    a, c = tiny_model("llama"), tiny_model("llama")
    oa = CircuitSGD(a.parameters(), lr=0.1, model=a, top_n=20)
    oc = CircuitSGD(c.parameters(), lr=0.1, model=c, top_n=20)
    a(**_inputs(b)).loss.backward()
    c(**_inputs(b)).loss.backward()
    with torch.no_grad():
        c(**_inputs(_batches(1, seed=5)[0]))
    oa.step()
    oc.step()
    assert _edges(oa.last_step.circuit) == _edges(oc.last_step.circuit)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_zero_grad_between_forward_and_backward():
    """``out = model(x); opt.zero_grad(); out.loss.backward(); opt.step()`` (the classic order) works."""
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    oa = CircuitAdamW(a.parameters(), lr=1e-2, model=a, top_n=25)
    ob = CircuitAdamW(b.parameters(), lr=1e-2, model=b, top_n=25)
    for x in _batches(2):
        out = a(**_inputs(x))
        oa.zero_grad()
        out.loss.backward()
        oa.step()
    list(_loop(b, ob, _batches(2)))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_clip_grad_norm_clips_the_circuit_gradient():
    model, twin = tiny_model("llama"), tiny_model("llama")
    opt = CircuitSGD(model.parameters(), lr=0.5, model=model, top_n=30)
    b = _batches(1)[0]
    model(**_inputs(b)).loss.backward()
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)) == 0.0  # torch's sees no .grad
    norm = opt.clip_grad_norm_(1e-3)
    assert float(opt.clip_grad_norm_(1e-3)) == pytest.approx(1e-3, rel=1e-3)  # a second call: the clipped norm,
    circuit = opt.tuning._conclusion.circuit  # and no second scaling (as torch's)
    twin(**_inputs(b)).loss.backward()
    masks = circuit.param_masks(twin)
    dense = torch.cat([(q.grad * masks[n]).flatten() for n, q in twin.named_parameters() if q.grad is not None])
    assert_close(norm, dense.norm())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert opt.last_step.circuit is circuit
    scale = 1e-3 / (float(dense.norm()) + 1e-6)
    for n, p in model.named_parameters():
        q = dict(twin.named_parameters())[n]
        want = before[n] - 0.5 * scale * q.grad * masks[n] if q.grad is not None else before[n]
        assert_close(p.detach(), want, name=n)


@pytest.mark.parametrize("mode,bps", [("deferred", None), ("deferred", 1), ("lagged", None)])
def test_zero_grad_after_clip_starts_the_step_over(mode, bps):
    """backward(A), clip_grad_norm_ (concludes the step: A's circuit selected), zero_grad(), backward(B), step():
    the step is B's alone — its circuit scored from B (A's was applied to B's gradient)."""
    a_batch, b_batch = _batches(2)
    models, opts = [], []
    for clipped in (False, True):
        model = tiny_model("llama")
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=10, memory_mode=mode,
                           backwards_per_step=bps)
        if clipped:
            model(**_inputs(a_batch)).loss.backward()
            opt.clip_grad_norm_(1e9)
            opt.zero_grad()
        model(**_inputs(b_batch)).loss.backward()
        opt.step()
        models.append(model)
        opts.append(opt)
    assert [e[:2] for e in opts[1].last_step.circuit.edges] == [e[:2] for e in opts[0].last_step.circuit.edges]
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_circuit_update():
    model, twin = tiny_model("gpt2"), tiny_model("gpt2")
    opt = CircuitSGD(model.parameters(), lr=0.2, model=model, top_n=20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for i, b in enumerate(_batches(3)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        twin.load_state_dict(model.state_dict())
        twin.zero_grad()
        twin(**_inputs(b)).loss.backward()
        model(**_inputs(b)).loss.backward()
        opt.step()
        sched.step()
        masks = opt.last_step.circuit.param_masks(model)
        for n, p in model.named_parameters():
            q = dict(twin.named_parameters())[n]
            want = before[n] - 0.2 * 0.5 ** i * q.grad * masks[n] if q.grad is not None else before[n]
            assert_close(p.detach(), want, name=n)
        opt.zero_grad()


def test_bf16_autocast():
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20)
    for b in _batches(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**_inputs(b)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    masks = opt.last_step.circuit.param_masks(model)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all(p.dtype == torch.float32 for p in model.parameters())
    assert any(masks[n].any() for n in changed)


def test_nan_loss_is_refused_and_the_model_untouched():
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20, refresh_every=2)
    b = _batches(1)[0]
    list(_loop(model, opt, [b]))  # step 0 selects a circuit; step 1 reuses it
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        saved = w[3].clone()
        w[3] = float("nan")
    model(**_inputs(dict(b, input_ids=torch.full_like(b["input_ids"], 3)))).loss.backward()
    with pytest.raises(NonFiniteError, match="refused"):
        opt.step()
    with torch.no_grad():
        w[3] = saved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.state_dict()["tuning"] == state["tuning"]
    opt.zero_grad()
    list(_loop(model, opt, [b]))  # usable afterwards


@pytest.mark.parametrize("mode", ["deferred", "lagged"])
def test_backwards_attribution_cannot_serve_are_refused(mode):
    """Two backwards through one recorded forward (retain_graph=True), and a backward after clip_grad_norm_ concluded
    the step, raise a clear error instead of an internal KeyError / silently dropping that backward's gradients;
    after zero_grad() the loop goes on."""
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20, memory_mode=mode)
    b, c = _batches(2)
    if mode == "lagged":
        list(_loop(model, opt, [b]))
    out = model(**_inputs(b))
    out.loss.backward(retain_graph=True)
    with pytest.raises(CTFastError, match="a second backward through one recorded forward.*loss_a \\+ loss_b"):
        out.logits.float().pow(2).mean().backward()
    opt.zero_grad()
    model(**_inputs(b)).loss.backward()
    opt.clip_grad_norm_(1e9)
    with pytest.raises(CTFastError, match="a backward after this step was concluded \\(by clip_grad_norm_"):
        model(**_inputs(c)).loss.backward()
    opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    list(_loop(model, opt, [[b, c]]))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_model_zero_grad_discards_like_the_optimizers():
    """model.zero_grad() (all the HF Trainer calls) forgets the backwards so far as opt.zero_grad() does: a batch
    backwarded and thrown away leaves no trace in the next step; detached, the model's own zero_grad is back."""
    b, c = _batches(2)
    runs = []
    for discard in (None, "model", "optimizer"):
        model = tiny_model("llama")
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=20)
        if discard is not None:
            model(**_inputs(c)).loss.backward()
            copy.deepcopy(model).zero_grad()  # a copy made while attached is inert: it discards nothing
            assert opt.tuning.pending
            (model if discard == "model" else opt).zero_grad()
        list(_loop(model, opt, [b]))
        runs.append((_edges(opt.last_step.circuit), {n: p.detach().clone() for n, p in model.named_parameters()}))
        opt.detach()
        assert "zero_grad" not in model.__dict__
    for edges, params in runs[1:]:
        assert edges == runs[0][0]
        assert all(torch.equal(params[n], runs[0][1][n]) for n in params)


def test_parameters_added_or_unfrozen_after_attaching_are_trained():
    """Progressive unfreezing with model=: a param group added mid-run, or a weight unfrozen mid-run, is trained
    from the next circuit on where the circuit selects it (it was silently never updated); one frozen mid-run
    stays as it is."""
    batches = _batches(4)
    for how in ("add_param_group", "unfreeze"):
        model = tiny_model("llama")
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
        if how == "add_param_group":
            opt = CircuitSGD([p for n, p in model.named_parameters() if ".mlp." not in n], lr=0.1, model=model,
                             top_n=40)
        else:
            for p in mlp:
                p.requires_grad_(False)
            opt = CircuitSGD(model.parameters(), lr=0.1, model=model, top_n=40)
        frozen_later = model.model.layers[0].self_attn.o_proj.weight
        list(_loop(model, opt, batches[:1]))
        assert all(torch.equal(p.detach(), init[n]) for n, p in model.named_parameters() if ".mlp." in n)
        if how == "add_param_group":
            opt.add_param_group({"params": mlp})
        else:
            for p in mlp:
                p.requires_grad_(True)
        frozen_later.requires_grad_(False)
        kept = frozen_later.detach().clone()
        selected = set()
        for result in _loop(model, opt, batches[1:]):
            selected |= {n for n in result.circuit.nodes if n.startswith("mlp")}
        assert selected
        changed = {n for n, p in model.named_parameters() if ".mlp." in n and not torch.equal(p.detach(), init[n])}
        assert {f"model.layers.{node.split('.')[1]}.mlp.down_proj.weight" for node in selected} <= changed
        assert torch.equal(frozen_later.detach(), kept)


def test_options_and_errors():
    model = tiny_model("llama")
    with pytest.raises(CTFastError, match="need the model"):
        CircuitAdamW(model.parameters(), top_n=10)
    with pytest.raises(CTFastError, match="two_pass"):
        CircuitAdamW(model.parameters(), model=model, top_n=10, memory_mode="two_pass")
    with pytest.raises(CTFastError, match="CircuitTuner"):
        CircuitAdamW(model.parameters(), model=model, top_n=10, metric="logit_diff")
    with pytest.raises(CTFastError, match="out of range"):
        CircuitAdamW(model.parameters(), model=model, top_n=10 ** 9)
    opt = CircuitAdamW(model.parameters(), model=model, top_n=10)
    with pytest.raises(CTFastError, match="already circuit-tunes"):
        CircuitTuner(model, opt, top_n=10)
    with pytest.raises(CTFastError, match="set_circuit"):
        opt.set_circuit({})
    # torch.optim's implementation switches are accepted as they are (ct_fast picks its kernels); a misspelled
    # circuit-tuning option is named, with the list of options, with or without model=
    CircuitSGD(model.parameters(), lr=0.1, foreach=False, fused=True, capturable=True).step()
    with pytest.raises(CTFastError, match="differentiable=True"):
        CircuitAdamW(model.parameters(), differentiable=True)
    with pytest.raises(CTFastError, match="already circuit-tuned by another optimizer"):
        CircuitSGD(model.parameters(), lr=0.1, model=model, top_n=10)  # one session per model at a time
    opt.detach()
    CircuitSGD(model.parameters(), lr=0.1, model=model, top_n=10).detach()
    for kw in ({}, dict(model=tiny_model("llama"), top_n=10)):
        with pytest.raises(CTFastError, match=r"unknown circuit-tuning option\(s\) \['refresh_evry'\].*refresh_every"):
            CircuitAdamW(model.parameters(), refresh_evry=2, **kw)


def test_checkpoint_resume_is_bit_exact():
    """A state_dict saved mid-run (through torch.save / weights_only load) continues exactly: step count,
    circuit (refresh_every=2 reuses it after the resume) and optimizer pools."""
    batches = _batches(4)
    a = tiny_model("qwen2")
    oa = CircuitAdamW(a.parameters(), lr=1e-2, model=a, top_n=25, refresh_every=2)
    list(_loop(a, oa, batches))
    b = tiny_model("qwen2")
    ob = CircuitAdamW(b.parameters(), lr=1e-2, model=b, top_n=25, refresh_every=2)
    list(_loop(b, ob, batches[:1]))
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c = tiny_model("qwen2", seed=7)
    c.load_state_dict(saved["model"])
    oc = CircuitAdamW(c.parameters(), lr=1e-2, model=c, top_n=25, refresh_every=2)
    oc.load_state_dict(saved["opt"])
    got = list(_loop(c, oc, batches[1:]))
    assert got[0].refreshed is False and oc.tuning.step_count == 4
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    # the same state in an optimizer without model=: dense (the session's last circuit is not a fixed one), as the
    # saving optimizer is once detached — every parameter with a gradient moves
    d = tiny_model("qwen2", seed=7)
    d.load_state_dict(saved["model"])
    od = CircuitAdamW(d.parameters(), lr=1e-2)
    od.load_state_dict(saved["opt"])
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    d(**_inputs(batches[1])).loss.backward()
    od.step()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in d.named_parameters() if p.grad is not None)


def test_resume_across_an_unfreezing_with_shared_pools_is_bit_exact():
    """MLP weights frozen for 2 steps, then unfrozen; fractional state_capacity (shared pools, evictions). A resume
    from the step-2 checkpoint into a model built with them unfrozen equals the uninterrupted run: the loaded pools
    register them as that run did at its refresh (they joined one by one in step order, and evicted other rows)."""
    batches = _batches(8)

    def build(model):
        return CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=30, state_capacity=0.5, mlp_head_dim=8)

    a = tiny_model("llama")
    mlp = [p for n, p in a.named_parameters() if ".mlp." in n]
    for p in mlp:
        p.requires_grad_(False)
    oa = build(a)
    list(_loop(a, oa, batches[:2]))
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    for p in mlp:
        p.requires_grad_(True)
    want = list(_loop(a, oa, batches[2:]))
    c = tiny_model("llama", seed=4)
    c.load_state_dict(saved["model"])
    oc = build(c)
    oc.load_state_dict(saved["opt"])
    got = list(_loop(c, oc, batches[2:]))
    assert [_edges(x.circuit) for x in got] == [_edges(x.circuit) for x in want]
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_activation_checkpointing():
    """Non-reentrant checkpointing (HF's default) gives the un-checkpointed result; reentrant is refused."""
    a, b = tiny_model("llama").train(), tiny_model("llama").train()
    b.gradient_checkpointing_enable()
    oa = CircuitAdamW(a.parameters(), lr=1e-2, model=a, top_n=25)
    ob = CircuitAdamW(b.parameters(), lr=1e-2, model=b, top_n=25)
    for x, y in zip(_loop(a, oa, _batches(2)), _loop(b, ob, _batches(2))):
        assert _edges(x.circuit) == _edges(y.circuit)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)
    c = tiny_model("llama").train()
    c.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    CircuitAdamW(c.parameters(), lr=1e-2, model=c, top_n=25)
    with pytest.raises(CTFastError, match="reentrant"):
        c(**_inputs(_batches(1)[0]))
    d = tiny_model("llama").train()  # attribute() too (its taps' gradients never came: all but logits scored 0)
    d.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(CTFastError, match="reentrant"):
        ct_fast.attribute(d, _inputs(_batches(1)[0]))
