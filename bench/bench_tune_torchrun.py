"""``ct-fast tune`` end to end under ``torchrun`` against one plain process: the same run (a random Qwen2
saved to disk, a word-level agreement dataset, circuit-tuning) launched both ways; reports the median step
time, bytes all-reduced per step and whether the losses agree.

    python bench/bench_tune_torchrun.py [--device cpu|cuda] [--nproc 1] [--parallel ddp|fsdp]
                                        [--hidden 24 --layers 2] [--steps 4] [--batch 4]

On one GPU (``--nproc 1 --device cuda``) this is the NCCL path of the command line (process group of one
rank, DDP or FSDP2, compact all-reduces, rank-0 checkpoints). Writes ``bench/results/<device>_tune_torchrun.json``
or ``--out``.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(root: str, hidden: int, layers: int):
    from ct_fast.app.tasks import AgreementWorld, word_tokenizer
    from ct_fast.testing import tiny_model

    world = AgreementWorld()
    tok = word_tokenizer(world.vocabulary())
    heads = max(4, hidden // 64)
    model = tiny_model("qwen2", vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                       intermediate_size=int(hidden * 8 / 3) // 8 * 8)
    model.save_pretrained(os.path.join(root, "model"))
    tok.save_pretrained(os.path.join(root, "model"))
    rng = random.Random(0)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for _ in range(256):
            ex = world.task_example(rng)
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.disagree}) + "\n")
    return sum(p.numel() for p in model.parameters())


def _run(root: str, name: str, args, launcher: list) -> dict:
    out = os.path.join(root, name)
    cmd = [*launcher, "tune", "--model", os.path.join(root, "model"), "--data", os.path.join(root, "data.jsonl"),
           "--out", out, "--steps", str(args.steps), "--batch-size", str(args.batch), "--top-n", str(args.top_n),
           "--lr", "1e-3", "--no-progress", "--save-every", str(args.steps), "--device", args.device]
    if "torch.distributed.run" in launcher:
        cmd += ["--parallel", args.parallel]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    later = log[1:] or log
    return {"median_step_s": statistics.median(r["step_time"] for r in later),
            "comm_bytes_per_step": statistics.median(r.get("comm_bytes", 0) for r in later),
            "loss": [r["loss"] for r in log], "tuned_fraction": log[-1]["tuned_fraction"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top-n", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from ct_fast.app import harness

    with tempfile.TemporaryDirectory(prefix="ct_fast_tune_torchrun_") as root:
        n_params = _setup(root, args.hidden, args.layers)
        single = _run(root, "single", args, [sys.executable, "-m", "ct_fast"])
        dist = _run(root, "torchrun", args, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", str(args.nproc), "-m", "ct_fast"])
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(single["loss"], dist["loss"]))
    report = {"bench": "tune_torchrun", "device": args.device, "nproc": args.nproc, "parallel": args.parallel,
              "params": n_params, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
              "steps": args.steps,
              "single": single, "torchrun": dist, "loss_max_rel_diff": worst,
              "step_time_ratio": dist["median_step_s"] / single["median_step_s"], "env": harness.env()}
    print(f"{args.device}: one process {1000 * single['median_step_s']:.1f} ms/step; torchrun x{args.nproc} "
          f"({args.parallel}) {1000 * dist['median_step_s']:.1f} ms/step, {dist['comm_bytes_per_step']:.0f} B "
          f"all-reduced/step; losses agree to {worst:.1e}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{args.device.split(':')[0]}_tune_torchrun.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
