"""The memory plan: built on the meta device, its byte counts equal what real tiny models allocate, its
largest batch is consistent with its own peaks, and ``ct-fast plan`` works."""

import json

import pytest
import torch

from ct_fast.app.cli import main
from ct_fast.app.step_bench import build, config
from ct_fast.errors import CTFastError
from ct_fast.memory import LiveStorages, memory_plan, parse_bytes, replay_peak

B, T = 2, 16
TINY = build("tiny", "meta", torch.float32).config  # the bench's tiny GPT-2: dropout off


@pytest.fixture(scope="module")
def tiny_plan():
    return memory_plan(TINY, B, T, dtype="fp32", device_memory=2e6)


def _ids(batch=B, seq=T):
    ids = torch.randint(0, config("tiny").vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_full_finetuning_bytes_match_a_real_adamw_step(tiny_plan):
    """Weights, gradients and AdamW state (moments in the parameter dtype, step counts) to the byte."""
    model = build("tiny", "cpu", torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    model(**_ids()).loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters())
    opt.step()
    states = sum(v.nbytes for s in opt.state.values() for v in s.values())
    full = tiny_plan.modes["full"].breakdown
    assert tiny_plan.param_bytes == full["params"] == sum(p.nbytes for p in model.parameters())
    assert full["optimizer_state"] == states
    assert tiny_plan.grad_bytes == grads


def test_activation_bytes_and_step_peak_match_a_real_step(tiny_plan):
    """What a real fp32 step leaves alive after the forward, and its whole extra peak, counted storage by
    storage, are within 15% of the plan (meta device: exact up to the attention kernel)."""
    model = build("tiny", "cpu", torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    model(**_ids()).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker = LiveStorages()
    with tracker:
        out = model(**_ids())
        outputs = {tracker.serial(out.logits), tracker.serial(out.loss)}
        forward_live = sum(tracker.size[s] for s in tracker.live - outputs)
        out.loss.backward()
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert forward_live == pytest.approx(tiny_plan.activation_bytes, rel=0.15)
    held = sum(p.nbytes for p in model.parameters()) + sum(v.nbytes for s in opt.state.values() for v in s.values())
    measured = held + replay_peak(tracker.events, tracker.size, {})["transients"]
    assert measured == pytest.approx(tiny_plan.modes["full"].peak_bytes, rel=0.15)


@pytest.mark.parametrize("mode", ["deferred", "two_pass", "lagged"])
def test_circuit_mode_peak_matches_a_real_tuner_step(mode):
    """A real tiny GPT-2 tuner step (optimizer pools for every tunable parameter, as the plan assumes), its
    held bytes plus its extra peak counted storage by storage, within 15% of the plan."""
    import ct_fast
    from ct_fast.app.step_bench import make_batches
    from ct_fast.memory import allocate_pools

    model = build("tiny", "cpu", torch.float32)
    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-5)
    tuner = ct_fast.CircuitTuner(model, opt, top_n=30, memory_mode=mode)
    batches = make_batches(TINY.vocab_size, B, T, 2, "cpu")
    tuner.step(batches[0])
    allocate_pools(opt, model, tuner.graph)
    tracker = LiveStorages()
    with tracker:
        result = tuner.step(batches[1])
    held = sum(p.nbytes for p in model.parameters()) + opt.state_bytes()
    measured = held + replay_peak(tracker.events, tracker.size, {})["transients"]
    top_fraction = result.circuit.num_params / memory_plan(TINY, B, T, dtype="fp32").tunable_params
    plan = memory_plan(TINY, B, T, dtype="fp32", top_fraction=top_fraction)
    assert measured == pytest.approx(plan.modes[mode].peak_bytes, rel=0.15)


def test_max_batch_is_the_largest_that_fits(tiny_plan):
    for mode, plan in tiny_plan.modes.items():
        assert sum(plan.breakdown.values()) == plan.peak_bytes
        b = plan.max_batch
        assert b >= 1, mode
        at = memory_plan(TINY, b, T, dtype="fp32", device_memory=2e6).modes[mode]
        above = memory_plan(TINY, b + 1, T, dtype="fp32", device_memory=2e6).modes[mode]
        assert at.fits and not above.fits, mode
    bigger = memory_plan(TINY, B, T, dtype="fp32", device_memory=4e6)
    assert all(bigger.modes[m].max_batch >= p.max_batch for m, p in tiny_plan.modes.items())


def test_cli_plan_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "tiny", "--batch", "2", "--seq", "16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"full", "deferred", "two_pass", "lagged"}
    assert data["modes"]["lagged"]["peak_bytes"] > data["param_bytes"]
    assert "| lagged |" in capsys.readouterr().out


def test_cli_plan_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nope" / "config.json"), "--batch", "1", "--seq", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err


def test_memory_sizes_parse():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512MiB") == 2**29
    for bad in ("eighty", "1.2.3GB", ".", "1e400", "0"):
        with pytest.raises(CTFastError, match="cannot read a memory size"):
            parse_bytes(bad)
    for kw, message in ((dict(batch=2.5), "whole number"), (dict(modes="lagged"), "give a list"),
                        (dict(device_memory=float("inf")), "finite number of bytes"),
                        (dict(seq=10 ** 5), "longer than the 64 positions"), (dict(dtype=torch.int8), "int8")):
        with pytest.raises(CTFastError, match=message):
            memory_plan(TINY, **{"batch": 1, "seq": 16, "dtype": "fp32", **kw})


def test_llama_8b_full_finetuning_needs_more_than_80gb():
    """Llama-3-8B in bf16 with AdamW: ~16 GB weights + 16 gradients + 32 states before any activation."""
    plan = memory_plan("llama-8B", 1, 128, dtype="bf16", device_memory="80GB", modes=())
    full = plan.modes["full"]
    assert plan.param_bytes == 2 * plan.params and 7.5e9 < plan.params < 8.5e9
    assert full.breakdown["optimizer_state"] >= 2 * plan.param_bytes
    assert full.peak_bytes > 80e9 and not full.fits and full.max_batch == 0


@pytest.mark.parametrize("mode", ["full", "deferred", "two_pass"])
def test_fused_loss_plan_matches_a_real_fused_step(mode):
    """``fused_loss=True``: the plan of a step whose loss is ``causal_lm_loss`` (no logits) within 15% of a real
    one (full fine-tuning with torch AdamW, or a fused tuner step), and below the plain plan."""
    import ct_fast
    from ct_fast.app.step_bench import make_batches
    from ct_fast.memory import allocate_pools

    model = build("tiny", "cpu", torch.float32)
    batches = make_batches(TINY.vocab_size, B, T, 2, "cpu")
    if mode == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step(b):
            ct_fast.causal_lm_loss(model, b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step(batches[0])
        held_state = lambda: sum(v.nbytes for s in opt.state.values() for v in s.values())  # noqa: E731
        top_fraction = 0.05
    else:
        opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-5)
        tuner = ct_fast.CircuitTuner(model, opt, top_n=30, memory_mode=mode, fused_loss=True)
        step = tuner.step
        result = step(batches[0])
        allocate_pools(opt, model, tuner.graph)
        held_state = opt.state_bytes
        top_fraction = result.circuit.num_params / memory_plan(TINY, B, T, dtype="fp32").tunable_params
    tracker = LiveStorages()
    with tracker:
        step(batches[1])
    measured = sum(p.nbytes for p in model.parameters()) + held_state() + replay_peak(
        tracker.events, tracker.size, {})["transients"]
    fused = memory_plan(TINY, B, T, dtype="fp32", top_fraction=top_fraction, fused_loss=True)
    assert fused.fused_loss and measured == pytest.approx(fused.modes[mode].peak_bytes, rel=0.15)
    # with a 4096-token vocabulary the logits dominate the peak: the fused plan is well below the plain one
    wide = TINY.__class__(**{**TINY.to_dict(), "vocab_size": 4096})
    peaks = [memory_plan(wide, 8, 64, dtype="fp32", fused_loss=f).modes[mode].peak_bytes for f in (True, False)]
    assert peaks[0] < 0.8 * peaks[1]


def test_fused_loss_plan_when_batches_make_different_chunk_counts():
    """A 65536-token vocabulary chunks 128 tokens at a time: batches 2 and 3 of 64 tokens make 1 and 2 chunks, and
    the trace still fits one model of the batch (it traces one chunk, whose logits are counted)."""
    wide = TINY.__class__(**{**TINY.to_dict(), "vocab_size": 65536})
    plan = memory_plan(wide, 4, 64, dtype="fp32", fused_loss=True)
    plain = memory_plan(wide, 4, 64, dtype="fp32")
    assert plan.modes["full"].breakdown["transients"] >= 128 * 65536 * 4  # one chunk's fp32 logits
    assert plan.modes["full"].peak_bytes < plain.modes["full"].peak_bytes
