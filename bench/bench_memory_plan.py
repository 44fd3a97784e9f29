"""The memory plan (``ct_fast.memory_plan``, meta device) against measured peaks of real training steps.

    python bench/bench_memory_plan.py [--shapes 4x512,2x1024,4x2048] [--modes full,deferred,two_pass,lagged]
                                      [--layers 8] [--llama8b-only]

Per shape: a random-weight fp32 Llama on the CPU; per mode one measured step after a warmup step: the
extra peak of the step (``ct_fast.app.harness.peak_bytes``, and an exact storage-lifetime count with
``ct_fast.memory.LiveStorages``) plus what is held between steps (parameters, gradients, optimizer state).
Circuit modes run ``CircuitTuner(memory_mode=...)`` with a circuit of ~5% of the parameters; a mode the
installed tuner lacks is skipped. Before the measured step every tunable parameter gets its optimizer row
pool (``allocate_pools``: the steady state the plan assumes); the plan is given the circuit share the
measured step had (``predicted_default_fractions``: with the default 5%). Writes
``bench/results/cpu_memory_plan.json`` and prints the table and the Llama-3-8B plans (bf16, 8 x 2048, 80 GB).
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import types

import torch

import ct_fast
from ct_fast.app import harness
from ct_fast.app.step_bench import _persistent_bytes, choose_top_n, make_batches
from ct_fast.memory import LiveStorages, allocate_pools, memory_plan, replay_peak

CONFIG = dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=1536, vocab_size=8192, max_position_embeddings=4096)
MODES = ("full", "deferred", "two_pass", "lagged")


def llama(layers: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})
    torch.manual_seed(0)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg).train()


def tuner_modes() -> tuple:
    """The memory modes the installed ``CircuitTuner`` accepts."""
    if "memory_mode" not in inspect.signature(ct_fast.CircuitTuner).parameters:
        return ()
    from ct_fast.tuner import MEMORY_MODES

    return tuple(MEMORY_MODES)


class Trainer:
    """One step function of ``mode`` on its own model copy; ``held()`` is what stays between steps."""

    def __init__(self, mode: str, model, top_n: int):
        self.model, self.tuner = model, None
        if mode == "full":
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        else:
            self.opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-5)
            self.tuner = ct_fast.CircuitTuner(model, self.opt, top_n=top_n, memory_mode=mode)

    def step(self, batch):
        if self.tuner is not None:
            return self.tuner.step(batch)
        self.model(**batch, use_cache=False).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def held(self) -> int:
        return _persistent_bytes(self.model, types.SimpleNamespace(model=self.model, tuner=self.tuner, opt=self.opt))

    def steady_state(self):
        """Row pools for every tunable parameter, as after enough steps (what the plan assumes)."""
        if self.tuner is not None:
            allocate_pools(self.opt, self.model, self.tuner.graph)


def measure(mode: str, base, batches, top_n: int) -> dict:
    """Held bytes and the extra peak of one step after a warmup step (harness and exact counts)."""
    trainer = Trainer(mode, copy.deepcopy(base), top_n)
    trainer.step(batches[0])
    trainer.steady_state()
    tracker = LiveStorages()

    def step():
        with tracker:
            trainer.result = trainer.step(batches[1])

    extra = harness.peak_bytes(step)
    exact = replay_peak(tracker.events, tracker.size, {})["transients"]
    held = trainer.held()
    out = {"held": held, "measured": held + extra, "measured_exact": held + exact}
    if trainer.tuner is not None:
        graph = trainer.tuner.graph
        tunable = sum(p.numel() for n, p in trainer.model.named_parameters() if n in graph.tunable_params)
        out["top_fraction"] = trainer.result.circuit.num_params / tunable
        out["ran_mode"] = trainer.result.memory_mode
    del trainer
    gc.collect()
    return out


def run(shapes, modes, layers: int) -> list[dict]:
    cfg, base = llama(layers)
    available = ("full",) + tuner_modes()
    records = []
    for batch, seq in shapes:
        batches = make_batches(cfg.vocab_size, batch, seq, 2, "cpu")
        top_n = choose_top_n(base, batches[0], 0.05)
        for mode in modes:
            if mode not in available:
                print(f"{batch}x{seq} {mode}: skipped (CircuitTuner has no memory_mode={mode!r})")
                continue
            got = measure(mode, base, batches, top_n)
            circuit_modes = [m for m in modes if m != "full"]
            plan = memory_plan(cfg, batch, seq, dtype="fp32", top_fraction=got.get("top_fraction", 0.05),
                               modes=circuit_modes)
            predicted = plan.modes[mode]
            default = memory_plan(cfg, batch, seq, dtype="fp32", modes=circuit_modes).modes[mode].peak_bytes
            rec = {"bench": "memory_plan", "layers": layers, "batch": batch, "seq": seq, "mode": mode,
                   "top_n": top_n, "predicted": predicted.peak_bytes, "breakdown": predicted.breakdown,
                   "predicted_default_fractions": default,
                   **got, "ratio": predicted.peak_bytes / got["measured"],
                   "ratio_exact": predicted.peak_bytes / got["measured_exact"]}
            records.append(rec)
            print(f"{batch}x{seq} {mode:>8}: predicted {predicted.peak_bytes / 2**20:8.1f} MiB, measured "
                  f"{got['measured'] / 2**20:8.1f} (harness) {got['measured_exact'] / 2**20:8.1f} (exact) MiB, "
                  f"ratio {rec['ratio']:.3f} / {rec['ratio_exact']:.3f}", flush=True)
    return records


def table(records: list[dict]) -> str:
    rows = ["| B x T | mode | predicted MiB | measured MiB (harness) | ratio | measured MiB (exact) | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        rows.append(f"| {r['batch']} x {r['seq']} | {r['mode']} | {r['predicted'] / 2**20:.0f} | "
                    f"{r['measured'] / 2**20:.0f} | {r['ratio']:.3f} | {r['measured_exact'] / 2**20:.0f} | "
                    f"{r['ratio_exact']:.3f} |")
    return "\n".join(rows)


def llama8b() -> dict:
    """Llama-3-8B plans at bf16, 8 x 2048 tokens, on an 80 GB card: without and with activation checkpointing,
    circuit optimizer state for every row (the default) and bounded to 10% of each parameter's rows."""
    out = {}
    for ckpt in (False, True):
        for capacity in (None, 0.1):
            plan = memory_plan("llama-8B", 8, 2048, dtype="bf16", device_memory="80GB", state_capacity=capacity,
                               activation_checkpointing=ckpt)
            print(f"\nLlama-3-8B, bf16, 8 x 2048, 80 GB, activation checkpointing {'on' if ckpt else 'off'}, "
                  f"state_capacity={capacity}:")
            print(plan.table())
            out[f"checkpointing={ckpt},state_capacity={capacity}"] = plan.to_dict()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4x512,2x1024,4x2048", help="B x T per shape, comma separated")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--llama8b-only", action="store_true", help="print the Llama-3-8B plan and exit")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.llama8b_only:
        llama8b()
        return
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    records = run(shapes, [m for m in a.modes.split(",") if m], a.layers)
    print(table(records))
    records.append({"bench": "memory_plan_llama8b", **llama8b()})
    print(harness.write("cpu_memory_plan", records, a.out))


if __name__ == "__main__":
    main()
