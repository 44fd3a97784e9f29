"""The ``ct-fast`` command line (also ``python -m ct_fast``).

    ct-fast demo [--out DIR]                           the paper's agreement experiment, offline, minutes
    ct-fast tune --model PATH --data FILE.jsonl ...    circuit-tune a model (or --resume RUN_DIR)
    ct-fast discover --model PATH --data FILE.jsonl    score the graph, write the circuit and its picture
    ct-fast plot RUN_DIR                               regenerate a run's pictures
    ct-fast profile [--layers 12 --d-model 768 ...]    time circuit-tuning steps on a random model
    ct-fast bench [--models gpt2-small ...]            circuit vs full / LoRA / reference steps
    ct-fast plan --model llama-8B --batch 8 --seq 2048 --memory 80GB   peak memory per mode (meta device)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..errors import CTFastError
from . import harness


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


def _capacity(text: str):
    """``--state-capacity``: a fraction (has a '.') or a row count."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.25 or a row count, got {text!r}") from None


def cmd_profile(args) -> dict:
    """Median per-phase time of circuit-tuning steps (random weights and tokens, no download)."""
    from .. import CircuitAdamW, CircuitTuner

    torch.set_num_threads(args.threads) if args.threads else None
    model = _profile_model(args)
    opt = CircuitAdamW(model.parameters(), lr=1e-5)
    tuner = CircuitTuner(model, opt, top_n=args.top_n, ablation=args.ablation, mlp_head_dim=args.mlp_head_dim,
                         memory_mode=args.memory_mode, profile=True)
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
        "mlp_head_dim": args.mlp_head_dim,
        "n_edges": tuner.graph.n_edges, "tuned_param_fraction": result.circuit.fraction,
        "median_s": median, "steps": args.steps,
        "env": harness.env(),
    }
    print(f"{args.arch}: {args.layers} layers, d_model {args.d_model}, batch {args.batch} x {args.seq} tokens, "
          f"top_n {args.top_n} of {tuner.graph.n_edges} edges ({100 * result.circuit.fraction:.2f}% of params)")
    for k, v in median.items():
        print(f"  {k:<12} {1000 * v:9.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def cmd_demo(args) -> dict:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    for key in ("tune_steps", "top_n", "tune_lr", "pretrain_steps", "threads", "seed"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in ("circuit", "full", "lora")]
    if bad:
        raise CTFastError(f"--methods: unknown {bad}; choose from circuit, full, lora")
    summary = run_demo(args.out, cfg, methods=methods, progress=not args.no_progress)
    print(f"summary: {os.path.join(args.out, 'summary.json')} ({summary['seconds']:.0f} s)")
    return summary


def _tokenizer(path: str):
    """The tokenizer saved with the model. A generic fast tokenizer (tokenizer_class TokenizersBackend or
    PreTrainedTokenizerFast) is loaded as saved: AutoTokenizer would swap in the model type's class."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loader = AutoTokenizer
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config) as f:
            if json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                loader = PreTrainedTokenizerFast
    try:
        tok = loader.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CTFastError(f"no tokenizer found with the model {path!r} ({e}); save it there with "
                          "tokenizer.save_pretrained") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise CTFastError(f"the tokenizer of {path!r} has neither a pad nor an eos token")
    return tok


def _check_metric(metric: str, fmt: str):
    if metric != "loss" and fmt != "contrastive":
        raise CTFastError(f"--metric {metric} needs contrastive data (prompt, answer, wrong_answer); this file "
                          f"is {fmt!r} — use --metric loss")


TUNE_KEYS = ("method", "steps", "batch_size", "lr", "optimizer", "weight_decay", "top_n", "top_n_end",
             "top_n_schedule", "refresh_every", "ablation", "metric", "selection", "mlp_head_dim", "token_budget", "memory_mode",
             "state_capacity", "lora_r", "seed", "circuit_every", "save_every")


def cmd_tune(args) -> dict:
    from .data import load_dataset
    from ..models import load_model
    from .plots import plot_run_dir
    from .run import Method, RunDir, TrainConfig, train

    if args.resume:
        if not os.path.exists(os.path.join(args.resume, "config.json")):
            raise CTFastError(f"--resume {args.resume!r}: no config.json there (not a ct-fast run directory)")
        run = RunDir(args.resume)
        conf = run.read_json("config.json")
    else:
        if not args.model or not args.data:
            raise CTFastError("tune needs --model and --data (or --resume RUN_DIR)")
        out = args.out or os.path.join("runs", "tune-" + time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(out, "log.jsonl")):
            raise CTFastError(f"{out!r} already holds a run; pass --resume {out} to continue it, or another --out")
        conf = {k: getattr(args, k) for k in TUNE_KEYS}
        conf.update(model=args.model, data=args.data, max_length=args.max_length, dtype=args.dtype,
                    device=args.device)
        run = RunDir(out)
    model, graph = load_model(conf["model"], dtype=conf["dtype"], device=conf["device"])
    tok = _tokenizer(conf["model"])
    examples, fmt = load_dataset(conf["data"], tok, conf["max_length"])
    _check_metric(conf["metric"], fmt)
    cfg = TrainConfig(**{k: conf[k] for k in TUNE_KEYS if k in conf})
    cfg.check()
    if not args.resume:
        run.write_json("config.json", conf)
    method = Method(model.train(), cfg, arch=graph.arch)
    records = train(run, method, examples, tok.pad_token_id, resume=bool(args.resume), progress=not args.no_progress)
    final = method.final_model()
    final.save_pretrained(run.file("model"))
    tok.save_pretrained(run.file("model"))
    summary = {"steps": len(records), "final_loss": records[-1]["loss"], "format": fmt,
               "mean_step_seconds": sum(r["step_time"] for r in records) / len(records),
               "mean_tuned_fraction": sum(r["tuned_fraction"] for r in records) / len(records),
               "model_dir": run.file("model")}
    run.write_json("summary.json", summary)
    plot_run_dir(run.path)
    print(f"tuned model: {run.file('model')}; log: {run.file('log.jsonl')}")
    return summary


def cmd_discover(args) -> dict:
    from ..attribution import AttributionRun
    from .data import collate, load_dataset
    from ..models import load_model
    from .plots import plot_circuit
    from .run import RunDir

    model, graph = load_model(args.model, dtype=args.dtype, device=args.device, mlp_head_dim=args.mlp_head_dim)
    model.eval()
    tok = _tokenizer(args.model)
    examples, fmt = load_dataset(args.data, tok, args.max_length)
    _check_metric(args.metric, fmt)
    examples = examples[:args.num_examples] if args.num_examples else examples
    batches = [collate(examples[i:i + args.batch_size], tok.pad_token_id)
               for i in range(0, len(examples), args.batch_size)]
    device = next(model.parameters()).device
    run_attr = AttributionRun(model, graph, ablation=args.ablation)
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    for b, n_tok in zip(batches, tokens):
        b = {k: v.to(device) for k, v in b.items()}
        _, value = run_attr.forward(b, metric=args.metric)
        weight = n_tok / sum(tokens) if args.metric == "loss" else b["input_ids"].shape[0] / len(examples)
        run_attr.backward(value, scale=weight)
    scores = run_attr.scores()
    circuit = scores.top_n(args.top_n, method=args.selection)
    out = RunDir(args.out)
    out.write_json("circuit.json", circuit.to_dict())
    torch.save({"scores": scores.scores.cpu(), "upstream": graph.upstream_nodes,
                "downstream": graph.downstream_nodes}, out.file("scores.pt"))
    plot_circuit(circuit.to_dict(), out.file("circuit.png"), f"circuit of {os.path.basename(args.model.rstrip('/'))}")
    print(f"{len(circuit)} edges, {len(circuit.nodes)} nodes, {100 * circuit.fraction:.2f}% of parameters -> "
          f"{out.file('circuit.json')}, {out.file('circuit.png')}")
    return circuit.to_dict()


def cmd_bench(argv: list) -> list:
    """``ct-fast bench ...``: the step benchmark (``ct_fast.app.step_bench``)."""
    from .step_bench import main as bench_main

    return bench_main(argv)


def cmd_plot(args) -> list:
    from .plots import plot_run_dir

    paths = plot_run_dir(args.run_dir)
    if not paths:
        raise CTFastError(f"nothing to plot in {args.run_dir!r} (no log.jsonl, circuits/ or summary.json)")
    for p in paths:
        print(p)
    return paths


def cmd_plan(args) -> dict:
    """Predicted peak memory of one training step per memory mode (meta device: no weights allocated)."""
    from ..memory import memory_plan, parse_bytes

    memory = parse_bytes(args.memory) if args.memory else None
    capacity = args.state_capacity
    if capacity is not None and capacity > 1:  # rows per parameter
        capacity = int(capacity)
    plan = memory_plan(args.model, args.batch, args.seq, dtype=args.dtype, device_memory=memory,
                       top_fraction=args.top_fraction, state_capacity=capacity,
                       activation_checkpointing=args.checkpointing, optimizer=args.optimizer)
    print(f"{plan.model}: {plan.params / 1e9:.2f} B parameters ({plan.tunable_params / 1e9:.2f} B tunable), "
          f"{plan.dtype}, batch {plan.batch} x {plan.seq} tokens"
          f"{', activation checkpointing' if plan.activation_checkpointing else ''}")
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
    return plan.to_dict()


def _model_args(p):
    p.add_argument("--model", help="local directory (save_pretrained) or hub name")
    p.add_argument("--data", help="JSONL: {text} | {prompt, completion} | {prompt, answer, wrong_answer}")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default=None, help="float32 (default), bf16, fp16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--top-n", type=int, default=50)
    p.add_argument("--ablation", default="mean", choices=["mean", "zero"])
    p.add_argument("--metric", default="loss", choices=["loss", "logit_diff", "logprob_diff"])
    p.add_argument("--selection", default="edges", choices=["edges", "nodes"])
    p.add_argument("--mlp-head-dim", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-fast", description="circuit-tuning for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the paper's agreement experiment at small scale (offline, minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--methods", default="circuit,full,lora")
    d.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    d.add_argument("--tune-steps", type=int, default=None)
    d.add_argument("--top-n", type=int, default=None)
    d.add_argument("--tune-lr", type=float, default=None)
    d.add_argument("--pretrain-steps", type=int, default=None)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tune", help="circuit-tune a model on a JSONL dataset")
    _model_args(t)
    t.add_argument("--out", default=None, help="run directory (default runs/tune-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--method", default="circuit", choices=["circuit", "full", "lora"])
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--top-n-end", type=int, default=None)
    t.add_argument("--top-n-schedule", default="constant", choices=["constant", "linear", "cosine"])
    t.add_argument("--refresh-every", type=int, default=1)
    t.add_argument("--token-budget", type=int, default=None, help="score at most this many positions per batch")
    t.add_argument("--memory-mode", default="auto", choices=["auto", "deferred", "two_pass", "lagged"],
                   help="how a faithful step bridges scoring and the weight gradient (default auto; see README)")
    t.add_argument("--state-capacity", type=_capacity, default=None,
                   help="optimizer-state pool per parameter: a fraction in (0, 1] of its rows or a row count "
                        "(default: every row)")
    t.add_argument("--lora-r", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--circuit-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=50)
    t.set_defaults(func=cmd_tune)

    c = sub.add_parser("discover", help="score the graph and write the circuit (no training)")
    _model_args(c)
    c.add_argument("--out", default="runs/discover")
    c.add_argument("--num-examples", type=int, default=64)
    c.set_defaults(func=cmd_discover)

    sub.add_parser("bench", help="time circuit-tuning against full, LoRA and the reference code (ct-fast bench -h)")
    pl = sub.add_parser("plot", help="regenerate the pictures of a run directory")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)
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
    pr.add_argument("--mlp-head-dim", type=int, default=None)
    pr.add_argument("--memory-mode", default="auto", choices=["auto", "deferred", "two_pass", "lagged"])
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--warmup", type=int, default=1)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default=None, help="write the report as JSON here")
    pr.set_defaults(func=cmd_profile)
    pn = sub.add_parser("plan", help="predict the peak memory of a training step per memory mode (no weights loaded)")
    pn.add_argument("--model", required=True,
                    help="tiny, gpt2-small, llama-1B, llama-8B, or a config.json / model directory")
    pn.add_argument("--batch", type=int, required=True)
    pn.add_argument("--seq", type=int, required=True)
    pn.add_argument("--dtype", default="bf16", help="bf16 (default), fp16, fp32")
    pn.add_argument("--memory", default=None, help="device memory, e.g. 80GB or 80GiB: fits and largest batch")
    pn.add_argument("--checkpointing", action="store_true", help="with activation checkpointing")
    pn.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    pn.add_argument("--top-fraction", type=float, default=0.05, help="share of tunable parameters in a circuit")
    pn.add_argument("--state-capacity", type=float, default=None,
                    help="circuit optimizer state pool per parameter: a fraction of its rows, or rows "
                         "(default: every row)")
    pn.add_argument("--json", default=None, metavar="FILE", help="write the plan as JSON here")
    pn.set_defaults(func=cmd_plan)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own argument parser (ct_fast/app/step_bench.py)
        try:
            cmd_bench(argv[1:])
        except CTFastError as e:
            print(f"ct-fast: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CTFastError as e:
        print(f"ct-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ct-fast: interrupted; a tune run continues with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
