"""One circuit-tuning step of a large model shape, its measured peak memory against ``ct_fast.memory_plan``.

    python bench/bench_big_step.py --model llama-8B --batch 1 --seq 2048 --dtype bf16 --device cuda \
        --checkpointing --state-capacity 0.25 --mlp-head-dim 128 --mode two_pass

Plans first (meta device, no weight allocated); runs the step only if the plan says the mode fits the
device's memory (``torch.cuda.mem_get_info``; on CPU: always, at the shapes one passes there). Random
weights (no download). Reports planned and measured peak (CUDA allocator stats / the live-tensor tracker
on CPU), their ratio, the step time and the circuit's size; writes ``bench/results/<device>_big_step.json``.
"""

import argparse
import time

import torch

import ct_fast
from ct_fast.app import harness
from ct_fast.app.step_bench import make_batches
from ct_fast.models import shape_config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-8B", help="a shape preset of ct_fast.models.shape_config")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="two_pass", choices=["deferred", "two_pass", "lagged"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--state-capacity", type=float, default=0.25, help="fraction of rows (<1) or rows per "
                    "parameter (>=1) with optimizer state; 1 = every row")
    ap.add_argument("--top-n", type=int, default=500)
    ap.add_argument("--mlp-head-dim", type=int, default=None, help="split MLPs into heads of this width (row "
                    "slices: a fractional --state-capacity then bounds each parameter's selected rows)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    device = torch.device(a.device)
    cap = a.state_capacity if a.state_capacity < 1 else (None if a.state_capacity == 1 else int(a.state_capacity))
    memory = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    plan = ct_fast.memory_plan(a.model, a.batch, a.seq, dtype=a.dtype, device_memory=memory, state_capacity=cap,
                               activation_checkpointing=a.checkpointing, modes=(a.mode,))
    planned = plan.modes[a.mode]
    rec = {"model": a.model, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "mode": a.mode,
           "checkpointing": a.checkpointing, "state_capacity": cap, "planned_peak_gib": planned.peak_bytes / 2**30,
           "fits": planned.fits if memory is not None else None}
    print(plan.table())
    if memory is not None and not planned.fits:
        rec["skipped"] = "the plan says it does not fit"
        print(harness.write(f"{device.type}_big_step", [rec], a.out))
        return rec
    import transformers as tf

    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(shape_config(a.model), dtype=dtype).train()
    if a.checkpointing:
        ct_fast.enable_activation_checkpointing(model)
    opt = ct_fast.CircuitAdamW(model.parameters(), lr=1e-5, state_capacity=cap)
    graph = ct_fast.ComputationGraph.from_model(model, mlp_head_dim=a.mlp_head_dim)
    top_n = min(a.top_n, graph.n_edges)
    tuner = ct_fast.CircuitTuner(model, opt, top_n=top_n, memory_mode=a.mode, graph=graph)
    batch = make_batches(model.config.vocab_size, a.batch, a.seq, 1, device)[0]
    harness.sync(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result = tuner.step(batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        out = {}
        peak = sum(p.numel() * p.element_size() for p in model.parameters()) + harness.peak_bytes(
            lambda: out.setdefault("r", tuner.step(batch)), device)
        result = out["r"]
    rec.update(seconds=time.perf_counter() - t0, measured_peak_gib=peak / 2**30, top_n=top_n,
               tuned_param_fraction=result.circuit.fraction, loss=result.loss, memory_mode=result.memory_mode)
    rec["measured_over_planned"] = rec["measured_peak_gib"] / rec["planned_peak_gib"]
    print(f"{a.model} {a.mode}: planned {rec['planned_peak_gib']:.2f} GiB, measured {rec['measured_peak_gib']:.2f} "
          f"GiB ({rec['measured_over_planned']:.2f}x), {rec['seconds']:.1f} s, circuit "
          f"{100 * rec['tuned_param_fraction']:.1f}% of params")
    print(harness.write(f"{device.type}_big_step", [rec], a.out))
    return rec


if __name__ == "__main__":
    main()
