"""The loss without logits (ct_fast.fused_loss): the chunked unembedding + cross-entropy against
``F.cross_entropy`` on materialised logits (fp64, awkward shapes and chunks, ignored tokens), the models' own
loss and gradients, and a CircuitTuner with ``fused_loss=True`` against one without."""

import pytest
import torch
import torch.nn.functional as F

import ct_fast
from ct_fast import CircuitAdamW, CircuitTuner, CTFastError, causal_lm_loss, linear_cross_entropy
from ct_fast.testing import random_batch, tiny_model


@pytest.mark.parametrize("chunk", [1, 7, 40])
@pytest.mark.parametrize("train_weight", [True, False])
def test_linear_cross_entropy_equals_the_materialised_loss(chunk, train_weight):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(37, 24, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(53, 24, dtype=torch.float64, generator=g).requires_grad_(train_weight)
    t = torch.randint(0, 53, (37,), generator=g)
    t[::5] = -100
    inputs = (h, w) if train_weight else (h,)
    got = linear_cross_entropy(h, w, t, chunk=chunk)
    want = F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(3 * got, inputs), torch.autograd.grad(3 * want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_follows_the_model_dtype():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(29, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(41, 16, generator=g).bfloat16()
    t = torch.randint(0, 41, (29,), generator=g)
    got = linear_cross_entropy(h, w, t, chunk=8)
    want = F.cross_entropy((h @ w.t()).float(), t)  # the lm_head in bf16, the loss upcast (as HF)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    gh, = torch.autograd.grad(got, h)
    wh, = torch.autograd.grad(want, h)
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), wh.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_causal_lm_loss_equals_the_models_loss(arch):
    model = tiny_model(arch)
    batch = random_batch(37, batch=3, seq=7)
    params = list(model.parameters())
    want = model(**batch).loss
    want_grads = torch.autograd.grad(want, params)
    out = causal_lm_loss(model, batch)
    assert out.logits.shape[1] == 0  # the lm_head saw no position
    torch.testing.assert_close(out.loss, want)
    for p, a, b in zip(params, torch.autograd.grad(out.loss, params), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tuner_with_fused_loss_selects_and_updates_the_same():
    runs = []
    for fused in (False, True):
        model = tiny_model("llama")
        base = {k: v.clone() for k, v in model.state_dict().items()}
        tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=20, fused_loss=fused)
        results = [tuner.step(random_batch(37, batch=3, seq=7, seed=s)) for s in range(3)]
        runs.append((results, model.state_dict(), base))
    (a, sa, base), (b, sb, _) = runs
    assert [[e[:2] for e in r.circuit.edges] for r in a] == [[e[:2] for e in r.circuit.edges] for r in b]
    assert [r.loss for r in b] == pytest.approx([r.loss for r in a], rel=1e-6)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
        if "embed" in k or "norm" in k or "lm_head" in k:  # outside every circuit: bit-identical
            assert torch.equal(sb[k], base[k]), k


def test_shape_errors_name_the_problem():
    with pytest.raises(CTFastError, match="do not fit"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(CTFastError, match="labels"):
        causal_lm_loss(tiny_model("llama"), {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert ct_fast.causal_lm_loss is causal_lm_loss
    scaled = tiny_model("llama")
    scaled.config.logits_scaling = 8.0  # (Granite's: the model divides its logits, which the fused loss would not)
    with pytest.raises(CTFastError, match="rescales them \\(logits_scaling=8.0\\)"):
        causal_lm_loss(scaled, random_batch(37))
    model = tiny_model("llama")
    with pytest.raises(CTFastError, match="metric='logit_diff' needs them"):
        CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-3), top_n=3, metric="logit_diff", fused_loss=True)
