"""The drop-in optimizer in the Hugging Face Trainer: gradient accumulation, clipping (CircuitTrainer), the
default LR schedule, evaluation during training, checkpoints and an exact resume; equal to the plain loop on
the same data order, and parameters outside every circuit bit-identical."""

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

from ct_fast import CircuitAdamW
from ct_fast.integrations import CircuitTrainer
from ct_fast.testing import assert_close, tiny_model

STEPS, ACCUMULATE = 4, 2


class _Tokens(torch.utils.data.Dataset):
    """Fixed-length random token sequences; a varying prefix of each has no loss (-100)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 37, (n, 9), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : i % 4] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _args(tmp_path, max_grad_norm, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, learning_rate=1e-2, max_grad_norm=max_grad_norm, eval_strategy="steps", eval_steps=2,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **kw)


def _record_micro_batches(model):
    """The training micro-batches the Trainer feeds the model (grad-enabled forwards), in order."""
    seen = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")}
                        | {"num_items_in_batch": kwargs.get("num_items_in_batch")})

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _train(tmp_path, trainer_cls, max_grad_norm, resume=None, state_capacity=None):
    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25, state_capacity=state_capacity)
    seen, handle = _record_micro_batches(model)
    trainer = trainer_cls(model=model, args=_args(tmp_path, max_grad_norm), train_dataset=_Tokens(16, 0),
                          eval_dataset=_Tokens(4, 1), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    handle.remove()
    return model, opt, seen, trainer


@pytest.mark.parametrize("trainer_cls,max_grad_norm", [(CircuitTrainer, 0.05), (Trainer, 0.0)])
def test_trainer_equals_the_plain_loop(tmp_path, trainer_cls, max_grad_norm):
    model, opt, seen, trainer = _train(tmp_path, trainer_cls, max_grad_norm)
    assert len(seen) == STEPS * ACCUMULATE
    # the plain loop on the same micro-batches, with the Trainer's default (linear) schedule and clipping
    ref = tiny_model("llama")
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_opt = CircuitAdamW(ref.parameters(), lr=1e-2, model=ref, top_n=25)
    sched = get_linear_schedule_with_warmup(ref_opt, 0, STEPS)
    touched = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in ref.named_parameters()}
    norms = []
    for step in range(STEPS):
        for mb in seen[step * ACCUMULATE:(step + 1) * ACCUMULATE]:
            ref(**mb).loss.backward()
        norms.append(float(ref_opt.clip_grad_norm_(max_grad_norm if max_grad_norm else float("inf"))))
        ref_opt.step()
        sched.step()
        ref_opt.zero_grad()
        for n, m in ref_opt.last_step.circuit.param_masks(ref).items():
            touched[n] |= m
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, name=n)
        assert torch.equal(p.detach()[~touched[n]], initial[n][~touched[n]]), f"{n} changed outside every circuit"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS and any("eval_loss" in entry for entry in trainer.state.log_history)
    if trainer_cls is CircuitTrainer:  # the logged norm is the circuit's gradient norm before clipping
        assert [entry["grad_norm"] for entry in logs] == pytest.approx(norms, rel=1e-4)
        assert all(entry["circuit_edges"] == 25 and 0 < entry["tuned_fraction"] < 1 for entry in logs)
        assert max(norms) > max_grad_norm  # clipping was active
        assert opt.tuning.backwards_per_step == ACCUMULATE  # told the optimizer (1 would let deferred steps prune)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("state_capacity", [None, 0.8], ids=["own_pools", "shared_pools"])
def test_resume_from_checkpoint_continues_exactly(tmp_path, state_capacity):
    full, _, _, _ = _train(tmp_path / "full", CircuitTrainer, 0.05, state_capacity=state_capacity)
    resumed, opt, _, _ = _train(tmp_path / "full", CircuitTrainer, 0.05,
                                resume=str(tmp_path / "full" / "checkpoint-2"), state_capacity=state_capacity)
    assert opt.tuning.step_count == STEPS
    if state_capacity is not None:  # the bounded pools came back from the checkpoint, shared and in use
        assert 0 < opt.num_state_rows() <= opt.state_capacity_rows()
        assert any(len(pool.members) > 1 for pool in opt._pools.values())
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_one_optimizer_serves_trainers_of_other_accumulations(tmp_path):
    """CircuitTrainer gives the optimizer its own gradient_accumulation_steps as backwards per step, replacing an
    earlier trainer's (it kept the first: a later trainer accumulating 2 had its second backward refused), but not
    a count the user set."""
    def train(opt, accumulate, name):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=1,
                                 gradient_accumulation_steps=accumulate, learning_rate=1e-2, report_to="none",
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        CircuitTrainer(model=opt.tuning.model, args=args, train_dataset=_Tokens(8, 0), optimizers=(opt, None)).train()

    model = tiny_model("llama")
    opt = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
    for i, accumulate in enumerate((1, 2, 1)):
        train(opt, accumulate, f"run{i}")
        assert opt.tuning.backwards_per_step == accumulate
    model = tiny_model("llama")
    mine = CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25, backwards_per_step=2)
    train(mine, 1, "mine")
    assert mine.tuning.backwards_per_step == 2


def test_circuit_trainer_under_torchrun(tmp_path):
    """Two processes (gloo): accelerate wraps the model in DDP; ranks end with equal parameters and circuits."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_ddp_script.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script,
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads((tmp_path / f"log_{r}.json").read_text()) for r in range(2)]
    assert [x["steps"] for x in logs] == [STEPS - 1, STEPS - 1] and logs[0]["world"] == 2
    steps = [[(e["loss"], e["circuit_edges"]) for e in x["log"] if "circuit_edges" in e] for x in logs]
    assert steps[0] == steps[1] and len(steps[0]) == STEPS - 1
    a, b = (torch.load(tmp_path / f"params_{r}.pt") for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
