"""Run by tests/test_integrations.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): CircuitTrainer with the
drop-in optimizer when accelerate wraps the model in DistributedDataParallel. Writes each rank's parameters
and log to ``sys.argv[1]``."""

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ct_fast  # noqa: E402
from ct_fast.integrations import CircuitTrainer  # noqa: E402
from ct_fast.testing import tiny_model  # noqa: E402
from test_integrations import _Tokens  # noqa: E402

out = sys.argv[1]
args = transformers.TrainingArguments(
    output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2,
    max_grad_norm=0.5, logging_steps=1, report_to="none", use_cpu=True, seed=0, ddp_backend="gloo", disable_tqdm=True,
    save_strategy="no")
model = tiny_model("llama", seed=int(os.environ["RANK"]))  # different weights per rank: rank 0's win
opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-2, model=model, top_n=25)
trainer = CircuitTrainer(model=model, args=args, train_dataset=_Tokens(16, 0), optimizers=(opt, None))
trainer.train()
rank = int(os.environ["RANK"])
torch.save(model.state_dict(), os.path.join(out, f"params_{rank}.pt"))
with open(os.path.join(out, f"log_{rank}.json"), "w") as f:
    json.dump({"steps": opt.tuning.step_count, "world": opt.tuning.dp.world, "log": trainer.state.log_history}, f)
