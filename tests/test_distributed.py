"""Data-parallel circuit-tuning on torch.distributed (gloo, 2 spawned processes, tiny models): 2 ranks equal
1 rank on the concatenated batch (drop-in with a DDP wrapper, the bare module and FSDP2 fully_shard;
CircuitTuner on DDP and FSDP2; FSDP2 ranks keep only their shard's optimizer state),
circuits and parameters equal across ranks, a resume after the processes end equals an uninterrupted run
(DDP: rank 0's checkpoint; FSDP2: torch.distributed.checkpoint for the model, a file per rank for the optimizer),
and mismatches or a NaN on one rank raise on every rank instead of hanging."""

import datetime
import os
import pathlib
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ct_fast
from ct_fast import CircuitAdamW, CircuitSGD, CircuitTuner, CTFastError, NonFiniteError
from ct_fast.distributed import DataParallel
from ct_fast.testing import assert_close, tiny_model

WORLD, STEPS, PER_RANK = 2, 2, 2


def _global_batch(step):
    g = torch.Generator().manual_seed(50 + step)
    ids = torch.randint(1, 37, (WORLD * PER_RANK, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _shard(batch, rank):
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


LENGTHS = [8, 4, 6, 6]  # padded batches: rank 0 holds 16 positions, rank 1 12, and each 10 label tokens


def _padded_batch(step):
    batch = _global_batch(step)
    mask = (torch.arange(8)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return dict(batch, attention_mask=mask, labels=batch["labels"].masked_fill(mask == 0, -100))


def _unequal_batch(step):
    """The global batch with the first 5 label tokens of rank 1's rows masked: 32 label tokens on rank 0, 12 on 1."""
    batch = _global_batch(step)
    labels = batch["labels"].clone()
    labels[PER_RANK:, :5] = -100
    return dict(batch, labels=labels)


def _padded_shard(step, rank):
    """This rank's slice of the padded global batch, trimmed to its own longest example (as a rank collates)."""
    part = _shard(_padded_batch(step), rank)
    width = int(part["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in part.items()}


def _dropin_steps(model, opt, rank, steps):
    circuits = []
    for step in steps:
        model(**_shard(_global_batch(step), rank)).loss.backward()
        opt.step()
        opt.zero_grad()
        circuits.append([e[:2] for e in opt.last_step.circuit.edges])
    return circuits


def _scenarios(rank, out: pathlib.Path, phase: str):
    """What each rank runs; results go to ``out/<name>_<rank>.pt``."""
    def save(name, **data):
        torch.save(data, out / f"{name}_{rank}.pt")

    if phase == "main":
        model = tiny_model("llama")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = CircuitAdamW(ddp.parameters(), lr=1e-2, model=ddp, top_n=25)
        circuits = _dropin_steps(ddp, opt, rank, range(1))
        if rank == 0:  # the checkpoint a later run ("resume", new processes) continues from
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / "checkpoint.pt")
        circuits += _dropin_steps(ddp, opt, rank, range(1, STEPS))
        save("dropin_ddp", circuits=circuits, params=model.state_dict(), bytes=opt.last_step.comm_bytes)

        model = tiny_model("llama", seed=rank)  # different weights per rank: rank 0's are broadcast
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
        save("dropin_module", circuits=_dropin_steps(model, opt, rank, range(STEPS)), params=model.state_dict())

        model = tiny_model("qwen2")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tuner = CircuitTuner(ddp, CircuitSGD(ddp.parameters(), lr=0.1, momentum=0.9), top_n=25,
                             memory_mode="two_pass")
        results = [tuner.step(_shard(_global_batch(s), rank)) for s in range(STEPS)]
        save("tuner_ddp", circuits=[[e[:2] for e in r.circuit.edges] for r in results], params=model.state_dict(),
             loss=[r.loss for r in results])

        # deferred mode on ranks of different token counts: each keeps a linear's dense dW or its (x, grad_out)
        # by its own count, yet the compact gradients are reduced in one (parameter) order
        model = tiny_model("qwen2")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tuner = CircuitTuner(ddp, CircuitAdamW(ddp.parameters(), lr=1e-2), top_n=40, memory_mode="deferred")
        results = [tuner.step(_padded_shard(s, rank)) for s in range(STEPS)]
        save("tuner_ddp_padded", circuits=[[e[:2] for e in r.circuit.edges] for r in results],
             params=model.state_dict(), loss=[r.loss for r in results])

        # ranks of unequal label tokens: each rank's loss weighs by its share of all the ranks' tokens (the average of
        # per-rank means would weigh rank 1's 12 tokens as rank 0's 32)
        model = tiny_model("qwen2")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tuner = CircuitTuner(ddp, CircuitSGD(ddp.parameters(), lr=0.1, momentum=0.9), top_n=25, memory_mode="two_pass")
        results = [tuner.step(_shard(_unequal_batch(s), rank)) for s in range(STEPS)]
        save("tuner_ddp_unequal", circuits=[[e[:2] for e in r.circuit.edges] for r in results],
             params=model.state_dict(), loss=[r.loss for r in results])

        # lagged and reused steps know their circuit before the backward: the compact gradients are averaged
        # while it runs (GradStream); then a NaN on rank 1 refuses the step on both ranks, neither hangs
        model = tiny_model("qwen2")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tuner = CircuitTuner(ddp, CircuitAdamW(ddp.parameters(), lr=1e-2), top_n=30, memory_mode="lagged",
                             refresh_every=2, overlap_comm=True)  # (on by default on GPUs only)
        results, overlapped = [], []
        for s in range(3):
            results.append(tuner.step(_padded_shard(s, rank)))
            overlapped.append(tuner.optimizer.last_step.overlapped_bytes)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        bad = _padded_shard(3, rank)
        if rank == 1:
            bad["input_ids"] = bad["input_ids"].clone()
            with torch.no_grad():
                model.get_input_embeddings().weight[bad["input_ids"][0, 0]] = float("nan")
        try:
            tuner.step(bad)
            nan_error = None
        except NonFiniteError as e:
            nan_error = str(e)
        if rank == 1:
            with torch.no_grad():
                model.get_input_embeddings().weight.copy_(before["model.embed_tokens.weight"])
        untouched = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        # rank 1 without a label token: every rank refuses the step (rank 1 alone raised, rank 0 waited for it)
        try:
            tuner.step(dict(bad, labels=torch.full_like(bad["labels"], -100)) if rank == 1 else bad)
            no_labels_error = None
        except CTFastError as e:
            no_labels_error = str(e)
        # ranks with 1 and 2 micro-batches: rank 1 streaming alone left the ranks' collectives out of line
        shard = _padded_shard(4, rank)
        halves = [{k: v[:1] for k, v in shard.items()}, {k: v[1:] for k, v in shard.items()}]
        tuner.step(halves if rank == 0 else shard)
        save("tuner_ddp_streamed", circuits=[[e[:2] for e in r.circuit.edges] for r in results],
             params=before, loss=[r.loss for r in results], modes=[r.memory_mode for r in results],
             overlapped=overlapped, nan_error=nan_error, untouched=untouched, no_labels_error=no_labels_error,
             after_uneven_micro_batches=model.state_dict())

        # FSDP2: parameters sharded on dim 0 (DTensors); masked dW and the optimizer act on local shards
        model = _fully_shard(tiny_model("llama"))
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
        circuits = _dropin_steps(model, opt, rank, range(1))
        import torch.distributed.checkpoint as dcp  # sharded model state; each rank saves its optimizer shard

        dcp.save(model.state_dict(), checkpoint_id=str(out / "fsdp_model"))
        torch.save(opt.state_dict(), out / f"fsdp_opt_{rank}.pt")
        circuits += _dropin_steps(model, opt, rank, range(1, STEPS))
        save("dropin_fsdp", circuits=circuits, params=_full_state(model), state_bytes=opt.state_bytes())

        model = _fully_shard(tiny_model("qwen2"))
        tuner = CircuitTuner(model, CircuitSGD(model.parameters(), lr=0.1, momentum=0.9), top_n=25,
                             memory_mode="two_pass")
        results = [tuner.step(_shard(_global_batch(s), rank)) for s in range(STEPS)]
        save("tuner_fsdp", circuits=[[e[:2] for e in r.circuit.edges] for r in results], params=_full_state(model),
             loss=[r.loss for r in results])

        # failures: every rank raises, none hangs, nothing changes
        errors = {}
        model = tiny_model("llama")
        try:
            CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25 + rank)
        except CTFastError as e:
            errors["top_n"] = str(e)
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if rank == 1:
            with torch.no_grad():
                model.get_input_embeddings().weight[3] = float("nan")
        batch = _shard(_global_batch(0), rank)
        model(**dict(batch, input_ids=torch.full_like(batch["input_ids"], 3))).loss.backward()
        try:
            opt.step()
        except NonFiniteError as e:
            errors["nan"] = str(e)
        if rank == 1:
            with torch.no_grad():
                model.get_input_embeddings().weight[3] = before["model.embed_tokens.weight"][3]
        errors["untouched"] = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        opt.zero_grad()
        if rank == 0:  # rank 1 steps without a backward
            model(**batch).loss.backward()
        try:
            opt.step()
        except CTFastError as e:
            errors["no_backward"] = str(e)
        # FSDP2 with a bounded state pool: each rank plans its own shard's rows, and a circuit overflowing the pool
        # on one rank only is refused on both (one rank applied it: shards out of step, then a hang)
        from ct_fast.testing import random_batch

        model = _fully_shard(tiny_model("llama"))
        cols = [p for n, p in model.named_parameters() if "o_proj" in n or "down_proj" in n]
        rows = [p for p in model.parameters() if all(p is not q for q in cols)]
        opt = CircuitAdamW([{"params": cols, "state_capacity": None}, {"params": rows}], lr=1e-2, model=model,
                           top_n=6, state_capacity=1)
        outcomes = []
        for s in range(3):
            model(**random_batch(37, batch=2, seq=8, pad=False, seed=10 * s + rank)).loss.backward()
            try:
                opt.step()
                outcomes.append("applied")
            except CTFastError as e:
                outcomes.append("refused: " + ("own" if "overflow" not in str(e) else "other rank's"))
            opt.zero_grad()
        errors["fsdp_capacity"] = outcomes
        # ranks at different points of a step (one streams gradients, the other concludes): both raise, none hangs
        dp = DataParallel(dist.group.WORLD, torch.device("cpu"))
        try:
            dp.agree("gradient streaming", {"step": 0}) if rank == 0 else dp.agree("circuit-tuning step", {
                "step": 0, "mode": "deferred", "top_n": 25})
        except CTFastError as e:
            errors["points"] = str(e)
        save("errors", **errors)
    elif phase == "resume":
        model = tiny_model("llama", seed=3)
        saved = torch.load(out / "checkpoint.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = CircuitAdamW(ddp.parameters(), lr=1e-2, model=ddp, top_n=25)
        opt.load_state_dict(saved["opt"])
        save("resumed", circuits=_dropin_steps(ddp, opt, rank, range(1, STEPS)), params=model.state_dict())

        import torch.distributed.checkpoint as dcp

        model = _fully_shard(tiny_model("llama", seed=3))
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(out / "fsdp_model"))
        model.load_state_dict(state)
        opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
        opt.load_state_dict(torch.load(out / f"fsdp_opt_{rank}.pt", weights_only=True))
        save("resumed_fsdp", circuits=_dropin_steps(model, opt, rank, range(1, STEPS)), params=_full_state(model))


def _fully_shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _full_state(model):
    from ct_fast.distributed import full

    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, init_file, out, phase):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        _scenarios(rank, pathlib.Path(out), phase)
        dist.barrier()  # no rank tears its connections down while another still receives its last collective
    finally:
        dist.destroy_process_group()
    # every result is written: leave without the interpreter's teardown, where a gloo thread still joinable at
    # static destruction aborted a finished worker (SIGABRT, "terminate called without an active exception",
    # no Python frame) about 1 run in 8 under the CI's environment
    os._exit(0)


def _spawn(out, phase):
    init = tempfile.mktemp(prefix="ct_fast_dist_")
    mp.start_processes(_worker, args=(init, str(out), phase), nprocs=WORLD, join=True, start_method="spawn")
    if os.path.exists(init):
        os.remove(init)


def _load(out, name):
    return [torch.load(out / f"{name}_{r}.pt", weights_only=False) for r in range(WORLD)]


def _one_rank_dropin():
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
    circuits = []
    for step in range(STEPS):
        model(**_global_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
        circuits.append([e[:2] for e in opt.last_step.circuit.edges])
    return circuits, model.state_dict(), opt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _spawn(out, "main")
    _spawn(out, "resume")  # new processes, from the checkpoint "main" wrote after its first step
    return out


def _same_across_ranks(results):
    a, b = results
    assert a["circuits"] == b["circuits"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


@pytest.mark.parametrize("name", ["dropin_ddp", "dropin_module", "dropin_fsdp"])
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(runs, name):
    results = _load(runs, name)
    _same_across_ranks(results)
    circuits, params, opt = _one_rank_dropin()
    assert results[0]["circuits"] == circuits
    for k, v in params.items():
        assert_close(results[0]["params"][k], v, name=k)
    if name == "dropin_fsdp":  # each rank keeps the optimizer state of its shard only
        assert all(r["state_bytes"] < 0.75 * opt.state_bytes() for r in results)
    if name == "dropin_ddp":  # only the circuit's compact gradients (and the step fingerprint) are all-reduced
        grad_bytes = 4 * sum(g.numel() for g in opt.last_step.grads.values())
        assert grad_bytes < results[0]["bytes"] <= 1.2 * grad_bytes + 4096


def _tuner_equals_one_rank(results, model, tuner, batches):
    """Both ranks' tuner steps against ``tuner`` on the whole batches: circuits, mean loss, parameters."""
    _same_across_ranks(results)
    want = [tuner.step(b) for b in batches]
    assert results[0]["circuits"] == [[e[:2] for e in r.circuit.edges] for r in want]
    mean_loss = [(a + b) / 2 for a, b in zip(results[0]["loss"], results[1]["loss"])]  # each rank: its own loss
    assert mean_loss == pytest.approx([r.loss for r in want], rel=1e-5)
    for k, v in model.state_dict().items():
        assert_close(results[0]["params"][k], v, name=k)
    return want


@pytest.mark.parametrize("name", ["tuner_ddp", "tuner_fsdp"])
def test_tuner_equals_one_rank(runs, name):
    model = tiny_model("qwen2")
    tuner = CircuitTuner(model, CircuitSGD(model.parameters(), lr=0.1, momentum=0.9), top_n=25, memory_mode="two_pass")
    _tuner_equals_one_rank(_load(runs, name), model, tuner, [_global_batch(s) for s in range(STEPS)])


def test_ranks_of_unequal_label_tokens_equal_one_rank(runs):
    model = tiny_model("qwen2")
    tuner = CircuitTuner(model, CircuitSGD(model.parameters(), lr=0.1, momentum=0.9), top_n=25, memory_mode="two_pass")
    _tuner_equals_one_rank(_load(runs, "tuner_ddp_unequal"), model, tuner, [_unequal_batch(s) for s in range(STEPS)])


def test_deferred_ranks_of_different_lengths_equal_one_rank(runs):
    model = tiny_model("qwen2")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=40, memory_mode="deferred")
    _tuner_equals_one_rank(_load(runs, "tuner_ddp_padded"), model, tuner, [_padded_batch(s) for s in range(STEPS)])


def test_lagged_and_reused_steps_stream_gradients_and_equal_one_rank(runs):
    results = _load(runs, "tuner_ddp_streamed")
    model = tiny_model("qwen2")
    tuner = CircuitTuner(model, CircuitAdamW(model.parameters(), lr=1e-2), top_n=30, memory_mode="lagged",
                         refresh_every=2)
    want = _tuner_equals_one_rank(results, model, tuner, [_padded_batch(s) for s in range(3)])
    assert results[0]["modes"] == [r.memory_mode for r in want] == ["two_pass", "reused", "lagged"]
    for r in results:  # every step's gradients were launched while its backward ran
        assert all(b > 0 for b in r["overlapped"])
        assert "rank(s) [1]" in r["nan_error"] and r["untouched"]
        assert "no label token in this step's batches on rank(s) [1]" in r["no_labels_error"]
    for k, v in results[0]["after_uneven_micro_batches"].items():  # no hang, the same step on both ranks
        assert torch.equal(v, results[1]["after_uneven_micro_batches"][k])


def test_failures_raise_on_every_rank(runs):
    for errors in _load(runs, "errors"):
        assert "top_n" in errors["top_n"] and "disagree" in errors["top_n"]
        assert "rank(s) [1]" in errors["nan"] or "non-finite" in errors["nan"]
        assert errors["untouched"]
        assert "backward_ran" in errors["no_backward"]
        assert "reached another point of the step" in errors["points"]
    outcomes = [errors["fsdp_capacity"] for errors in _load(runs, "errors")]
    assert [o[:7] for o in outcomes[0]] == [o[:7] for o in outcomes[1]]  # the same steps applied on both ranks
    assert any(o.startswith("refused") for o in outcomes[0]) and "applied" in outcomes[0]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_resume_after_the_processes_end_equals_an_uninterrupted_run(runs, name):
    resumed = _load(runs, "resumed" if name == "ddp" else "resumed_fsdp")
    full = _load(runs, f"dropin_{name}")
    _same_across_ranks(resumed)
    assert resumed[0]["circuits"] == full[0]["circuits"][1:]
    for k, v in full[0]["params"].items():
        assert torch.equal(resumed[0]["params"][k], v), k
