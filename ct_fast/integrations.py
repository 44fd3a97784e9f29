"""Hugging Face ``Trainer`` integration.

A plain ``Trainer(optimizers=(CircuitAdamW(..., model=model, top_n=N), None))`` already circuit-tunes:
it accumulates gradients (k backwards before a step), steps, schedules the LR, evaluates (``no_grad``
forwards pass through), saves and resumes (the optimizer's state_dict carries the pools, the step count and
the circuit). What it cannot do alone is clip: it clips the ``.grad`` of ``model.parameters()`` through
accelerate, and circuit-tuning gives tunable weights no ``.grad`` — so it would clip nothing and log
``grad_norm`` 0.0. ``CircuitTrainer`` routes that clipping (and the logged ``grad_norm``) to the circuit's
gradient (``optimizer.clip_grad_norm_``), logs the circuit of each step and tells the optimizer how many
backwards each step runs (``backwards_per_step``: without accumulation deferred steps prune); under ``torchrun`` it switches off
the DDP wrapper's own gradient reduction (circuit-tuning reduces the circuit's compact gradients itself).

Example::

    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-4, model=model, top_n=300)
    trainer = CircuitTrainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0),
                             train_dataset=ds, optimizers=(opt, None))
    trainer.train()
"""

from __future__ import annotations

from torch import nn
from transformers import Trainer

from .optim import _CircuitOptimizer


def circuit_optimizer(optimizer) -> _CircuitOptimizer | None:
    """The circuit-tuning optimizer behind ``optimizer`` (accelerate wraps it), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, _CircuitOptimizer) and inner.tuning is not None else None


class CircuitTrainer(Trainer):
    """``transformers.Trainer`` whose gradient clipping and ``grad_norm`` act on the circuit's gradient, and
    whose logs carry the circuit (``circuit_edges``, ``tuned_fraction``, ``circuit_refreshed``). With any other
    optimizer it is the plain ``Trainer``."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        clip = self.accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, norm_type=2):
            opt = circuit_optimizer(self.optimizer)
            if opt is None:
                return clip(parameters, max_norm, norm_type)
            return opt.clip_grad_norm_(max_norm, norm_type)

        self.accelerator.clip_grad_norm_ = clip_grad_norm_  # this trainer's own accelerator only

    def training_step(self, model, *args, **kwargs):
        opt = circuit_optimizer(self.optimizer)
        if opt is not None:
            # one backward per micro-batch (1: deferred steps prune) — this trainer's count, unless the user set one
            # (a value an earlier trainer set is replaced: one optimizer may serve trainers of other accumulations)
            session = opt.tuning
            if session.backwards_per_step is None or session.backwards_from_trainer:
                session.backwards_per_step = self.args.gradient_accumulation_steps
                session.backwards_from_trainer = True
            if isinstance(model, nn.parallel.DistributedDataParallel):
                # several processes: DDP's reduction expects every .grad, which circuit-tuning never makes; the
                # optimizer all-reduces the circuit's compact gradients itself (ct_fast.distributed)
                model.require_backward_grad_sync = False
        return super().training_step(model, *args, **kwargs)

    def log(self, logs: dict, *args, **kwargs):
        opt = circuit_optimizer(self.optimizer)
        last = opt.last_step if opt is not None else None
        if last is not None and "loss" in logs:
            logs = {**logs, "circuit_edges": len(last.circuit), "tuned_fraction": last.circuit.fraction,
                    "circuit_refreshed": float(last.refreshed)}
        super().log(logs, *args, **kwargs)
