"""``ct-fast demo``: the paper's first experiment at small scale, offline, on a CPU in minutes.

1. A small GPT-2-style model is trained (deterministically; cached in ``RUN/base``) on a procedural
   English-like corpus in which present-tense verbs agree with their subjects (``ct_fast.app.tasks``).
2. It is then tuned toward subject-verb *disagreement* by circuit-tuning, and — with the same data, steps,
   batch size and learning rate — by full fine-tuning and by LoRA (when ``peft`` is installed).
3. For each method: disagreement accuracy and logit difference on held-out prefixes, language-modelling
   loss on held-out agreement-neutral text (the general capability), fraction of parameters tuned, wall
   time — in ``RUN/summary.json`` and in pictures.
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
    for name in ("tune_steps", "pretrain_steps", "top_n", "eval_every", "tune_batch"):
        if getattr(cfg, name) < 1:
            raise CTFastError(f"demo: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = RunDir(out_dir)
    root.write_json("config.json", asdict(cfg))
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
    summary = {"methods": {}, "before": before, "config": asdict(cfg)}
    for name in methods:
        tcfg = TrainConfig(method=name, steps=cfg.tune_steps, batch_size=cfg.tune_batch, lr=cfg.tune_lr,
                           top_n=cfg.top_n, mlp_head_dim=cfg.mlp_head_dim, lora_r=cfg.lora_r, seed=cfg.seed,
                           circuit_every=max(1, cfg.tune_steps // 6), save_every=cfg.tune_steps)
        run = RunDir(os.path.join(out_dir, name))
        run.write_json("config.json", asdict(tcfg))
        if os.path.exists(run.file("log.jsonl")):
            os.remove(run.file("log.jsonl"))
        model = copy.deepcopy(base_model).train()
        method = Method(model, tcfg, arch="gpt2")
        start = time.perf_counter()
        records = train(run, method, train_set, pad, evaluate=lambda m: evaluate(m, probes, neutral, pad),
                        eval_every=cfg.eval_every, progress=progress)
        seconds = time.perf_counter() - start
        after = evaluate(method.final_model(), probes, neutral, pad)
        result = {
            "target_accuracy_before": before["target_accuracy"], "target_accuracy_after": after["target_accuracy"],
            "target_logit_diff_before": before["target_logit_diff"],
            "target_logit_diff_after": after["target_logit_diff"],
            "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
            "tuned_param_fraction": float(sum(r["tuned_fraction"] for r in records) / len(records)),
            "seconds": seconds,
        }
        run.write_json("summary.json", result)
        summary["methods"][name] = result
        log(f"{name:>8}: disagreement accuracy {result['target_accuracy_after']:.3f}, general loss "
            f"{result['general_loss_before']:.3f} -> {result['general_loss_after']:.3f}, "
            f"{100 * result['tuned_param_fraction']:.2f}% of parameters per step, {seconds:.0f} s")
    summary["seconds"] = time.perf_counter() - t0
    root.write_json("summary.json", summary)
    from .plots import plot_run_dir
    for path in plot_run_dir(out_dir):
        log(f"wrote {path}")
    return summary
