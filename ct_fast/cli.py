"""The ``ct-fast`` command line (also ``python -m ct_fast``).

    ct-fast profile [--layers 12 --d-model 768 ...]   time circuit-tuning steps on a random model, offline
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .errors import CTFastError


def _profile_model(args):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.arch == "gpt2":
        config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                                         vocab_size=args.vocab, n_positions=max(1024, args.seq))
    else:
        config = transformers.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.d_model,
                                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                                          intermediate_size=4 * args.d_model, vocab_size=args.vocab,
                                          max_position_embeddings=max(1024, args.seq))
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _env() -> dict:
    """Machine, versions and commit a result belongs to."""
    import subprocess

    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=__file__.rsplit("/", 2)[0], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit}


def cmd_profile(args) -> dict:
    """Median per-phase time of circuit-tuning steps (random weights and tokens, no download)."""
    from . import CircuitAdamW, CircuitTuner

    torch.set_num_threads(args.threads) if args.threads else None
    model = _profile_model(args)
    opt = CircuitAdamW(model.parameters(), lr=1e-5)
    tuner = CircuitTuner(model, opt, top_n=args.top_n, ablation=args.ablation)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        result = tuner.step({"input_ids": ids, "labels": ids})
        if step >= args.warmup:
            rows.append(result.timings)
    median = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
    report = {
        "bench": "tuner_step", "arch": args.arch, "layers": args.layers, "d_model": args.d_model,
        "heads": args.heads, "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "top_n": args.top_n,
        "n_edges": tuner.graph.n_edges, "tuned_param_fraction": result.circuit.fraction,
        "median_s": median, "steps": args.steps,
        "env": _env(),
    }
    print(f"{args.arch}: {args.layers} layers, d_model {args.d_model}, batch {args.batch} x {args.seq} tokens, "
          f"top_n {args.top_n} of {tuner.graph.n_edges} edges ({100 * result.circuit.fraction:.2f}% of params)")
    for k, v in median.items():
        print(f"  {k:<12} {1000 * v:9.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-fast", description="circuit-tuning for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("profile", help="time circuit-tuning steps on a random model (offline)")
    pr.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    pr.add_argument("--layers", type=int, default=12)
    pr.add_argument("--d-model", type=int, default=768)
    pr.add_argument("--heads", type=int, default=12)
    pr.add_argument("--kv-heads", type=int, default=None)
    pr.add_argument("--vocab", type=int, default=50257)
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--seq", type=int, default=64)
    pr.add_argument("--top-n", type=int, default=200)
    pr.add_argument("--ablation", default="mean", choices=["mean", "zero"])
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--warmup", type=int, default=1)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default=None, help="write the report as JSON here")
    pr.set_defaults(func=cmd_profile)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CTFastError as e:
        print(f"ct-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
