"""Scale: time and peak memory of each faithful-step memory mode, and of circuit_refresh10, against full
fine-tuning (torch AdamW) as sequences grow, with and without activation checkpointing; host syncs per step
on a Llama-3-8B topology (32 layers, tiny widths).

    python bench/bench_scale.py                      # T = 256, 1024, 2048 on the 8-layer shape (~1 h on 2 CPU cores)
    python bench/bench_scale.py --seqs 128 --layers 2 --out /tmp/scale.json   # seconds

The model is an 8-layer Llama (d_model 512, 8 heads / 4 KV heads, MLP 1536, vocab 8192, random weights, fp32).
Time: median of ``--steps`` steps at ``--batch-time`` (after one warm-up step), the methods of one (T,
checkpointing) interleaved step by step so that the machine's slow spells hit them alike. Memory: one further step at
``--batch-mem`` under the live-tensor tracker, plus what is held between steps (gradients, optimizer state):
the extra peak over the built model. Circuits hold ~5% of the parameters. Writes bench/results/cpu_scale.json;
``python bench/report.py`` renders it into README.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import ct_fast
from ct_fast.app import harness
from ct_fast.app.step_bench import _persistent_bytes, choose_top_n, make_batches

METHODS = ("full", "deferred", "two_pass", "lagged", "circuit_refresh10", "deferred_fused", "two_pass_fused")
DEFAULT_METHODS = METHODS[:5]  # "*_fused": the same mode with CircuitTuner(fused_loss=True) (no logits)


def build(layers: int, checkpointing: bool, seed: int = 0, device="cpu", dtype=torch.float32, d_model: int = 512):
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=3 * d_model, vocab_size=8192, max_position_embeddings=8192)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).train()  # no dropout; train(): checkpointing
    if checkpointing:
        ct_fast.enable_activation_checkpointing(model)
    return model


class Step:
    """One training step of ``method`` on ``model`` (full fine-tuning or a circuit tuner)."""

    def __init__(self, method: str, model, top_n: int, lr: float = 1e-5, state_capacity=None):
        self.model, self.tuner, self.opt = model, None, None
        if method == "full":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)
        else:
            mode = "auto" if method == "circuit_refresh10" else method.removesuffix("_fused")
            opt = ct_fast.CircuitAdamW(model.parameters(), lr=lr, state_capacity=state_capacity)
            self.tuner = ct_fast.CircuitTuner(model, opt, top_n=top_n,
                                              memory_mode=mode, refresh_every=10 if method == "circuit_refresh10" else 1,
                                              fused_loss=method.endswith("_fused"))
        self.last = None

    def __call__(self, batch):
        if self.tuner is not None:
            self.last = self.tuner.step(batch)
            return
        self.model(**batch, use_cache=False).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def measure(methods: list, layers: int, seq: int, checkpointing: bool, batch_time: int, batch_mem: int, steps: int,
            top_n: int, device="cpu", dtype=torch.float32, d_model: int = 512, state_capacity=None) -> list[dict]:
    """Every method at one (seq, checkpointing): its own model and step; one warm-up step each, then ``steps``
    rounds timing one step of every method in turn (round-robin: a slow spell of the machine hits all methods
    alike), then each method's peak memory at ``batch_mem``."""
    runs = {}
    for method in methods:
        model = build(layers, checkpointing, device=device, dtype=dtype, d_model=d_model)
        runs[method] = (model, Step(method, model, top_n, state_capacity=state_capacity))
    vocab = runs[methods[0]][0].config.vocab_size
    timed = make_batches(vocab, batch_time, seq, steps + 1, device)
    times = {m: [] for m in methods}
    for _, step in runs.values():
        step(timed[0])  # warm-up (refresh10: this step discovers the circuit)
    for b in timed[1:]:
        for method, (_, step) in runs.items():
            harness.sync(device)
            t0 = time.perf_counter()
            step(b)
            harness.sync(device)
            times[method].append(time.perf_counter() - t0)
    mem_batch = make_batches(vocab, batch_mem, seq, 1, device)[0]
    records = []
    for method in methods:
        model, step = runs.pop(method)
        transient = harness.peak_bytes(lambda: step(mem_batch), device)
        persistent = _persistent_bytes(model, step) - sum(p.numel() * p.element_size() for p in model.parameters())
        rec = {"method": method, "layers": layers, "seq": seq, "checkpointing": checkpointing,
               "batch_time": batch_time, "batch_mem": batch_mem, "steps": steps,
               "median_ms": 1e3 * statistics.median(times[method]), "extra_peak_mib": (persistent + transient) / 2**20,
               "state_capacity": None if method == "full" else state_capacity}
        if step.last is not None:
            rec.update(memory_mode=step.last.memory_mode, tuned_param_fraction=step.last.circuit.fraction,
                       state_rows=step.tuner.optimizer.num_state_rows())
        records.append(rec)
        del step, model
        gc.collect()
    return records


def host_syncs(layers: int = 32) -> dict:
    """Host-synchronising ops in one faithful step on a ``layers``-deep Llama topology at tiny widths."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    batch = make_batches(256, 2, 32, 1, "cpu")[0]
    out = {"layers": layers}
    top_n = min(300, ct_fast.ComputationGraph.from_model(model).n_edges)
    for mode in ("deferred", "two_pass", "lagged"):
        tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=1e-5), top_n=top_n,
                                     memory_mode=mode)
        tuner.step(batch)
        tuner.step(batch)
        out[mode] = harness.count_host_syncs(lambda: tuner.step(batch))
    return out


def ratios(records: list[dict]) -> list[dict]:
    """Each record's time and memory over full fine-tuning's at the same (seq, checkpointing)."""
    full = {(r["seq"], r["checkpointing"]): r for r in records if r["method"] == "full"}
    for r in records:
        ref = full.get((r["seq"], r["checkpointing"]))
        if ref:
            r["time_vs_full"] = r["median_ms"] / ref["median_ms"]
            r["memory_vs_full"] = r["extra_peak_mib"] / ref["extra_peak_mib"]
    return records


def table(data: dict) -> str:
    """Markdown tables of a results file: per (seq, checkpointing) the ratios to full fine-tuning, and syncs."""
    rows = ["| T | checkpointing | method | mode | ms/step | vs full | extra peak MiB | vs full |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        rows.append(f"| {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | {r['method']} | "
                    f"{r.get('memory_mode', '—')} | {r['median_ms']:.0f} | {r.get('time_vs_full', 1):.2f}x | "
                    f"{r['extra_peak_mib']:.0f} | {r.get('memory_vs_full', 1):.2f}x |")
    syncs = data.get("host_syncs")
    if syncs:
        rows.append("")
        rows.append(f"Host-synchronising ops per faithful step, {syncs['layers']}-layer Llama topology: " + ", ".join(
            f"{mode} {syncs[mode]['total']}" for mode in ("deferred", "two_pass", "lagged") if mode in syncs)
            + f" (target <= {4 * syncs['layers']}).")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", default="256,1024,2048")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-time", type=int, default=2)
    ap.add_argument("--batch-mem", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--checkpointing", default="both", choices=["both", "on", "off"])
    ap.add_argument("--sync-layers", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--d-model", type=int, default=512, help="hidden size (MLP 3x, 8 heads / 4 KV heads)")
    ap.add_argument("--state-capacity", type=float, default=None,
                    help="circuit optimizers' state_capacity (a fraction of the rows; default: every row)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    methods = [m for m in a.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[a.checkpointing]
    probe = build(a.layers, False, d_model=a.d_model)
    top_n = choose_top_n(probe, make_batches(probe.config.vocab_size, 2, 64, 1, "cpu")[0], 0.05)
    del probe
    records = []
    for seq in (int(s) for s in a.seqs.split(",")):
        for ckpt in ckpts:
            for rec in measure(methods, a.layers, seq, ckpt, a.batch_time, a.batch_mem, a.steps, top_n, a.device,
                               dtype, a.d_model, a.state_capacity):
                rec["top_n"] = top_n
                records.append(rec)
                print(f"T={seq:5d} ckpt={ckpt!s:5} {rec['method']:>17}: {rec['median_ms']:8.0f} ms  "
                      f"{rec['extra_peak_mib']:7.0f} MiB  {rec.get('memory_mode', '')}", flush=True)
    data = {"results": ratios(records), "host_syncs": host_syncs(a.sync_layers)}
    print(table(data))
    path = harness.write(f"{torch.device(a.device).type}_scale", data["results"], a.out)
    with open(path) as f:  # keep the sync counts beside the results
        import json
        saved = json.load(f)
    saved["host_syncs"] = data["host_syncs"]
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)
    print(path)
    return data


if __name__ == "__main__":
    main()
