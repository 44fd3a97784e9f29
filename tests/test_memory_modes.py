"""Memory modes of the faithful step: two_pass == deferred (circuits and updates), lagged updates the previous
step's circuit with this batch's gradient, deferred's dense-gradient and (x, grad_out) paths agree, and
activation checkpointing works with two_pass."""

import copy

import pytest
import torch

import ct_fast
from ct_fast import CircuitAdamW, CircuitSGD, CircuitTuner, CTFastError, ParamSelection, enable_activation_checkpointing
from ct_fast.masked_linear import MaskedLinears
from ct_fast.testing import assert_close, random_batch, tiny_model


def _batches(n=3):
    return [random_batch(37, seed=s) for s in range(n)]


def _run(model, mode, batches, opt="adamw", **kw):
    optimizer = (CircuitAdamW(model.parameters(), lr=1e-2) if opt == "adamw"
                 else CircuitSGD(model.parameters(), lr=0.1, momentum=0.9))
    tuner = CircuitTuner(model, optimizer, top_n=25, memory_mode=mode, **kw)
    return [tuner.step(b) for b in batches]


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_two_pass_equals_deferred(arch, opt):
    a, b = tiny_model(arch), tiny_model(arch)
    ra, rb = _run(a, "deferred", _batches(), opt), _run(b, "two_pass", _batches(), opt)
    assert [r.memory_mode for r in ra] == ["deferred"] * 3 and [r.memory_mode for r in rb] == ["two_pass"] * 3
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
        assert y.loss == pytest.approx(x.loss, rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


def test_deferred_dense_path_trains_a_bias_whose_weight_is_frozen():
    """GPT-2 with its q/k/v weights frozen and their biases trainable, 96 tokens a call (deferred keeps the dense
    gradient then): the selected biases are updated as two_pass updates them (deferred updated none)."""
    batch = random_batch(37, batch=4, seq=24)
    micro = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]  # (no pruner)
    models = []
    for mode in ("deferred", "two_pass"):
        model = tiny_model("gpt2")
        for layer in model.transformer.h:
            layer.attn.c_attn.weight.requires_grad_(False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tuner = CircuitTuner(model, CircuitAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             top_n=30, memory_mode=mode)
        selected = [n for n in tuner.step(micro).circuit.param_selections(tuner.graph) if "c_attn.bias" in n]
        changed = [n for n, p in model.named_parameters() if "c_attn.bias" in n and not torch.equal(p, before[n])]
        assert selected and changed == selected, (mode, selected, changed)
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        assert_close(q, p)


@pytest.mark.parametrize("mode", ["two_pass", "lagged"])
def test_micro_batches_equal_the_whole_batch(mode):
    """With several micro-batches two_pass re-runs each forward for the training pass; same result."""
    whole, parts = tiny_model("llama"), tiny_model("llama")
    batches = _batches(2)
    ra = _run(whole, mode, batches)
    rb = _run(parts, mode, [[{k: v[:1] for k, v in b.items()}, {k: v[1:] for k, v in b.items()}] for b in batches])
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for p, q in zip(whole.parameters(), parts.parameters()):
        assert_close(q, p)


def test_lagged_updates_the_previous_circuit_with_this_batch(arch):
    """Step 1 (no circuit yet) is a two_pass step; step 2 applies the gradient of batch 2 to circuit 1."""
    model, check = tiny_model(arch), tiny_model(arch)
    b1, b2 = _batches(2)
    lr = 0.1
    tuner = CircuitTuner(model, CircuitSGD(model.parameters(), lr=lr), top_n=25, memory_mode="lagged")
    r1 = tuner.step(b1)
    first = CircuitTuner(check, CircuitSGD(check.parameters(), lr=lr), top_n=25, memory_mode="two_pass").step(b1)
    assert r1.memory_mode == "two_pass" and r1.circuit.edges == first.circuit.edges
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = copy.deepcopy(model)
    dense(**b2).loss.backward()
    r2 = tuner.step(b2)
    assert r2.memory_mode == "lagged" and r2.circuit is r1.circuit and tuner.circuit is not r1.circuit
    masks = r1.circuit.param_masks(model)
    owned = ct_fast.ComputationGraph.from_model(model).tunable_params
    for (n, p), q in zip(model.named_parameters(), dense.parameters()):
        want = before[n] - lr * q.grad * masks[n] if n in owned else before[n]
        assert_close(p.detach(), want, name=n)
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n


def test_deferred_dense_gradient_equals_kept_pairs(monkeypatch):
    """Deferred mode keeps dense dW or (x, grad_out) per linear by size; both give the same update."""
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    monkeypatch.setattr(MaskedLinears, "_keep_dense", lambda self, name, pairs: True)
    ra = _run(a, "deferred", _batches(2))
    monkeypatch.setattr(MaskedLinears, "_keep_dense", lambda self, name, pairs: False)
    rb = _run(b, "deferred", _batches(2))
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


def test_deferred_accumulation_keeps_no_more_than_the_dense_gradient():
    """Many small backwards in one deferred step (gradient accumulation): once a linear's kept (x, grad_out) pairs
    outgrow its dense fp32 weight gradient they are summed into it, so a step keeps at most about the dense
    gradient per linear (it kept every pair: k times that); the update equals the whole batch's."""
    ids = torch.randint(0, 37, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    micro = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(8)]  # 6 tokens a backward: each pair is
    # smaller than its linear's dense gradient (>= 8 tokens in the tiny llama), 8 pairs are not
    kept = []
    real = MaskedLinears.finish

    def finish(self, selection):
        tensors = [t for pairs in self.saved.values() for pair in pairs for t in pair]
        tensors += [t for dw_db in self.dense.values() for t in dw_db if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # (q/k/v share x)
        kept.append(sum(storages.values()))
        return real(self, selection)

    whole, parts = tiny_model("llama"), tiny_model("llama")
    _run(whole, "deferred", [batch])
    masked_dense = 4 * sum(w.numel() + w.shape[0] for w in MaskedLinears(
        parts, ct_fast.ComputationGraph.from_model(parts)).weight.values())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MaskedLinears, "finish", finish)
        _run(parts, "deferred", [micro])
    assert kept and kept[0] <= masked_dense, (kept, masked_dense)
    for p, q in zip(whole.parameters(), parts.parameters()):
        assert_close(q, p)


def test_auto_weighs_the_whole_step_of_your_own_loop(monkeypatch):
    """``auto`` on a GPU sees your loop's first micro-batch only: with ``backwards_per_step=k`` it weighs k of them
    (what deferred then keeps), so a step whose one micro-batch fits but whose k do not runs lagged."""
    model = tiny_model("llama")
    ids = torch.randint(0, 37, (1, 2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25, backwards_per_step=8)
    session = opt.tuning
    two = session.masked.deferred_bytes(2 * ids.numel(), 4)  # what two micro-batches keep: fits in a quarter
    assert two < session.masked.deferred_bytes(8 * ids.numel(), 4)
    monkeypatch.setattr(session, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * two, 40 * two))
    assert session._choose_mode([batch], 1) == "deferred"
    with pytest.warns(UserWarning, match="runs 'lagged'|steps run 'lagged'"):
        assert session._choose_mode([batch], 8) == "lagged"
    assert session._choose_mode([batch, batch], 2) == "deferred"  # the tuner's steps: every micro-batch given

    class OtherRankNeedsLagged:  # several ranks: one whose batch or free memory does not fit decides for all
        calls = 0

        def reduce_number(self, value, what, op=None):
            self.calls += 1
            return 1.0

    monkeypatch.setattr(session, "dp", OtherRankNeedsLagged())
    with pytest.warns(UserWarning, match="or so on another rank"):
        assert session._choose_mode([batch], 1) == "lagged"
    assert session._choose_mode([batch], 1) == "lagged" and session.dp.calls == 2  # every step: no rank-local cache
    opt.detach()


def test_a_refused_lagged_step_keeps_the_circuit_it_lags():
    """A lagged step refused after its selection (the state pool cannot hold the circuit it applies) changes nothing:
    not the model, and not the circuit the next lagged step applies (it kept the refused batch's)."""
    from ct_fast import TopNSchedule

    model = tiny_model("llama", num_hidden_layers=3)
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2, state_capacity=0.35), mlp_head_dim=8,
                         top_n=TopNSchedule(2, 200, steps=1, kind="linear"), memory_mode="lagged")
    tuner.step(random_batch(37, seed=0))
    tuner.step(random_batch(37, seed=1))
    lagged = tuner.circuit
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CTFastError, match="the circuit selects"):
        tuner.step(random_batch(37, seed=2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert tuner.circuit is lagged


def test_keep_dense_is_the_smaller_choice():
    model = tiny_model("llama")  # d_model 16..: dense dW beats (x, grad_out) beyond ~in*out/(in+out) tokens
    masked = MaskedLinears(model, ct_fast.ComputationGraph.from_model(model))
    name = next(iter(masked.weight))
    w = masked.weight[name]
    few = torch.zeros(1, 2, w.shape[1])
    many = torch.zeros(1, 4 * w.numel(), w.shape[1])
    assert not masked._keep_dense(name, [(few, None)]) and masked._keep_dense(name, [(many, None)])
    assert masked._keep_dense(name, [(few, None)] * (4 * w.numel()))  # the pairs of many backwards
    assert masked.deferred_bytes(2, 4) < masked.deferred_bytes(10 ** 6, 4) == 4 * sum(
        p.numel() for p in masked.weight.values())


def test_two_pass_with_activation_checkpointing():
    plain, ckpt = tiny_model("llama"), tiny_model("llama")
    enable_activation_checkpointing(ckpt)
    ckpt.train()  # HF checkpoints only in training mode; the tiny models have no dropout
    ra, rb = _run(plain, "two_pass", _batches(2)), _run(ckpt, "two_pass", _batches(2))
    for x, y in zip(ra, rb):
        assert [e[:2] for e in x.circuit.edges] == [e[:2] for e in y.circuit.edges]
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert_close(q, p)


def test_auto_mode_and_bad_mode(model, batch):
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3), top_n=10)
    assert tuner.memory_mode == "auto" and tuner.step(batch).memory_mode == "deferred"  # CPU: deferred
    with pytest.raises(CTFastError, match="memory_mode"):
        CircuitTuner(model, CircuitAdamW(model.parameters()), top_n=10, memory_mode="fast")


def test_outcome_metric_ignores_the_memory_mode(batch):
    batch = dict(batch, target_pos=torch.tensor([4, 2, 3]), answer=torch.tensor([3, 5, 7]),
                 wrong_answer=torch.tensor([11, 2, 30]))
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    ra = CircuitTuner(a, CircuitAdamW(a.parameters(), lr=1e-2), top_n=20, metric="logit_diff",
                      memory_mode="deferred").step(batch)
    rb = CircuitTuner(b, CircuitAdamW(b.parameters(), lr=1e-2), top_n=20, metric="logit_diff",
                      memory_mode="lagged").step(batch)
    assert ra.memory_mode == rb.memory_mode == "outcome" and ra.circuit.edges == rb.circuit.edges
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bounded_state_over_many_tuner_steps():
    """A capacity bounds the optimizer state of a tuner whose circuits change every step; shared 1-D biases
    (selected whole with any of their heads) get a slot per row (a pool each, allocated when first selected), so
    GPT-2 circuits of heads fit."""
    model = tiny_model("gpt2")
    opt = CircuitAdamW(model.parameters(), lr=1e-3, state_capacity=0.75)
    tuner = CircuitTuner(model, opt, top_n=2, mlp_head_dim=8)
    rows, storage = [], None
    for s in range(12):
        tuner.step(random_batch(37, seed=s))
        rows.append(opt.num_state_rows())
        assert rows[-1] <= opt.state_capacity_rows()
        now = {key: pool.t["step"].data_ptr() for key, pool in opt._pools.items() if len(key) == 3}
        assert storage in (None, now)  # shared pools: allocated at the first step, never grown
        storage = now
    assert len(set(rows)) > 1
    matrices = [pool for pool in opt._pools.values() if any(p.dim() == 2 for p in pool.members)]
    assert matrices and all(pool.capacity < pool.rows for pool in matrices)


def test_whole_mlp_nodes_share_the_pool_and_a_pool_no_node_fits_is_refused():
    """An MLP node owns its parameters whole; with rows of one width pooled (gate/up rows, down columns, q/k/v
    rows, o columns: all d_model long) a fractional capacity still holds it. A capacity that cannot hold even
    one node's rows is refused when circuit-tuning starts, naming the fix, instead of at the first step that
    selects the node."""
    model = tiny_model("llama")  # d_model 24, MLP width 40 (gate + up: 80 rows), 2 layers: 384 rows of width 24
    with pytest.raises(CTFastError, match=r"pool of 50 rows, but node 'mlp.0' alone selects 80 of them.*"
                                          r"mlp_head_dim.*state_capacity >= 0.209 \(a fraction\)"):
        CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3, state_capacity=0.125), top_n=3)
    with pytest.raises(CTFastError, match="alone selects"):  # the drop-in optimizer too
        CircuitAdamW(model.parameters(), lr=1e-3, state_capacity=0.125, model=model, top_n=3)
    opt = CircuitAdamW(model.parameters(), lr=1e-3, state_capacity=0.5)
    CircuitTuner(model, opt, top_n=3)  # registers every tunable parameter in its pool: 192 slots of width 24
    mlp = model.model.layers[0].mlp
    every = ((0, 40),)  # node mlp.0 in both roles: all gate/up rows, all down columns (120 rows of width 24)
    whole = {mlp.gate_proj.weight: ParamSelection(0, 40, every), mlp.up_proj.weight: ParamSelection(0, 40, every),
             mlp.down_proj.weight: ParamSelection(1, 40, every)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.set_circuit(whole)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.0.mlp.{k}_proj.weight" for k in ("gate", "up", "down")}
    assert opt.num_state_rows() == 120 and opt.state_capacity_rows() == 192


@pytest.mark.parametrize("mode", ["two_pass", "deferred", "lagged"])
def test_stacked_sources_leave_half_precision_steps_unchanged(mode, monkeypatch):
    """A bf16 model's residual-vector sources stacked at capture, and so its layers' attention heads scored several
    layers at once (the scoring forward is the training forward in deferred and lagged modes), select the same
    circuits and write the same parameter bits as without the stack."""
    base = tiny_model("llama", num_hidden_layers=3, vocab_size=16, dtype=torch.bfloat16)
    batch = random_batch(16, batch=3, seq=12)
    stacked, routed = [], []
    real = ct_fast.attribution.EdgeScorer._accumulate_stacked
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_accumulate_stacked",
                        lambda self, *a: (stacked.append(1), real(self, *a)))
    real_run = ct_fast.attribution.EdgeScorer._head_run
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_head_run",
                        lambda self, k, slot, n, *a: (routed.append(n), real_run(self, k, slot, n, *a))[1])
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = _run(a, mode, [batch] * 3)
    assert stacked and max(routed) == 2  # the heads of both earlier layers as one batch
    monkeypatch.setattr(ct_fast.attribution.AttributionRun, "_stack_keys", lambda self, derived: [])
    rb = _run(b, mode, [batch] * 3)
    assert [r.circuit.edges for r in ra] == [r.circuit.edges for r in rb]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
