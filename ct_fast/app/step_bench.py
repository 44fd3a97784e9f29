"""End-to-end training steps: circuit-tuning (faithful, in the tuner and as a drop-in optimizer in a plain loop,
and amortised) against full fine-tuning, LoRA and the public reference code's way of doing a circuit-tuning
step — same model, data and device.

    ct-fast bench [--models gpt2-small] [--methods full,lora,reference,circuit_refresh1,circuit_dropin,...]
                  [--device cpu|cuda] [--dtype fp32|bf16] [--batch 8 --seq 64] [--steps 3] [--max-seconds S]

Reports median and mean step time, tokens/s, peak memory and, for circuit methods, the per-phase split and
the attribution share of a step; writes ``bench/results/step_<device>.json`` and prints a table.
Models are built from configs with random weights (no download).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from .. import attribution
from . import harness
from ..errors import CTFastError
from ..models import SHAPES, shape_config as config

METHODS = ("full", "lora", "reference", "circuit_refresh1", "circuit_dropin", "circuit_refresh10")
REFRESH_EVERY = {"circuit_refresh10": 10}  # methods re-selecting their circuit every k steps (timed over k at least)
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build(name: str, device, dtype, seed: int = 0):
    import transformers as tf

    tf.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = config(name)
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.train()


def make_batches(vocab: int, batch: int, seq: int, n: int, device):
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def choose_top_n(model, batch, target: float) -> int:
    """The smallest top-N whose circuit holds at least ``target`` of the parameters (binary search)."""
    import ct_fast

    scores = ct_fast.attribute(model, batch)
    lo, hi = 1, scores.graph.n_edges
    while lo < hi:
        mid = (lo + hi) // 2
        if scores.top_n(mid).fraction >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Method:
    """A step function for one method on its own copy of the model."""

    def __init__(self, method: str, model, top_n: int, arch: str, lr: float = 1e-5):
        import ct_fast

        self.method, self.model, self.tuner, self.last = method, model, None, None
        cuda = next(model.parameters()).is_cuda
        if method == "full":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=cuda, foreach=not cuda)
        elif method == "lora":
            import peft

            self.model = peft.get_peft_model(model, peft.LoraConfig(
                r=32, lora_alpha=64, lora_dropout=0.0, target_modules=LORA_TARGETS["gpt2" if arch == "gpt2" else "llama"],
                fan_in_fan_out=arch == "gpt2"))
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=lr, fused=cuda, foreach=not cuda)
        elif method == "reference":
            from .reference_step import ReferenceCircuitTuning

            self.ref = ReferenceCircuitTuning(model, top_n, lr=lr, fused=cuda)
        elif method == "circuit_dropin":  # the faithful step in the user's own loop (below: as "full")
            self.opt = ct_fast.CircuitAdamW(model.parameters(), lr=lr, model=model, top_n=top_n)
        else:
            refresh = REFRESH_EVERY.get(method, 1)
            self.tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=lr), top_n=top_n,
                                              refresh_every=refresh, profile=True)  # phase split on GPUs too

    def step(self, batch):
        if self.tuner is not None:
            self.last = self.tuner.step(batch)
        elif self.method == "reference":
            self.ref.step(batch)
        else:
            self.model(**batch, use_cache=False).loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def _persistent_bytes(model, method: "_Method") -> int:
    """Parameters, gradients and optimizer state held between steps (the CPU memory baseline)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in method.model.parameters():
        add(p)
        add(p.grad)
    opt = method.tuner.optimizer if method.tuner is not None else getattr(method, "opt", None) or method.ref.optimizer
    for state in opt.state.values():
        for v in state.values():
            add(v)
    for pool in getattr(opt, "_pools", {}).values():  # circuit optimizers: the shared row pools
        for v in pool.t.values():
            add(v)
    return total


def run(model_name: str, methods=METHODS, device="cpu", dtype=torch.float32, batch=8, seq=64, steps=3, warmup=1,
        target_fraction=0.05, progress=print, on_record=None, max_seconds: float | None = None) -> list[dict]:
    """One record per method (``on_record(rec)`` as each finishes: a run stopped part-way keeps what it timed).
    ``max_seconds``: a method stops timing once its timed steps have taken that long (at least one is timed; the
    record's ``steps`` says how many were): the reference code's 24 s llama-1B step need not run three times."""
    base = build(model_name, device, dtype)
    arch = "gpt2" if model_name in ("tiny", "gpt2-small") else "llama"
    data = make_batches(base.config.vocab_size, batch, seq, warmup + max(timed_steps(m, steps) for m in methods) + 1,
                        device)
    top_n = choose_top_n(base, data[0], target_fraction)
    if device != "cpu":  # each method builds its own model there: this one would count in every method's peak
        del base
        _free(device)
    records = []
    for method in methods:
        model = copy.deepcopy(base) if device == "cpu" else build(model_name, device, dtype)
        try:
            m = _Method(method, model, top_n, arch)
        except ImportError as e:
            progress(f"{method}: skipped ({e})")
            continue
        try:
            times, splits = _time_steps(m, data, warmup, timed_steps(method, steps), device,
                                        None if method in REFRESH_EVERY else max_seconds)
        except torch.OutOfMemoryError as e:  # one method too big for the device: the others still run
            times, oom = None, str(e).splitlines()[0]
        if times is None:  # freed outside the except block: its traceback holds the failed step's tensors
            progress(f"{model_name} {method:>18}: out of memory ({oom})")
            records.append({"bench": "step", "model": model_name, "method": method, "batch": batch, "seq": seq,
                            "device": str(device), "skipped": "out of memory"})
            if on_record:
                on_record(records[-1])
            del m, model
            _free(device)
            continue
        if device != "cpu":
            peak = torch.cuda.max_memory_allocated(device)
        else:  # one more, untimed step under the live-tensor tracker
            transient = harness.peak_bytes(lambda: m.step(data[-1]), device)
            peak = _persistent_bytes(model, m) + transient
        rec = {"bench": "step", "model": model_name, "method": method, "dtype": str(dtype).replace("torch.", ""),
               "batch": batch, "seq": seq, "steps": len(times), "median_ms": 1e3 * statistics.median(times),
               "mean_ms": 1e3 * statistics.mean(times), "tokens_per_s": batch * seq / statistics.mean(times),
               "peak_mem_gib": peak / 2**30, "device": str(device)}
        if splits:
            split = {k: 1e3 * statistics.mean(s.timings[k] for s in splits) for k in splits[0].timings}
            rec.update(split_ms=split, attribution_fraction=split["attribution"] / split["total"], top_n=top_n,
                       tuned_param_fraction=m.last.circuit.fraction,  # the last step's; over the timed steps:
                       tuned_param_fractions=[s.circuit.fraction for s in splits],  # (each method selects its own)
                       score_span=attribution.SCORE_SPAN,
                       score_chunk_elements=attribution.chunk_elements(device))
            if device != "cpu":  # the host's time in the same phases: which of them kept the device waiting
                rec["split_host_ms"] = {k: 1e3 * statistics.mean(s.host_timings[k] for s in splits)
                                        for k in splits[0].host_timings}
        if method == "reference":
            rec["top_n"] = top_n
        records.append(rec)
        if on_record:
            on_record(rec)
        progress(f"{model_name} {method:>18}: {rec['mean_ms']:9.1f} ms/step, {rec['tokens_per_s']:8.0f} tok/s, "
                 f"{rec['peak_mem_gib']:.2f} GiB")
        del m, model
        _free(device)
    return records


def timed_steps(method: str, steps: int) -> int:
    """How many steps of ``method`` are timed: ``steps``, and for a method that refreshes its circuit every k steps at
    least k — after the warm-up (a refresh) they end on the next refresh, so the mean is the amortised step."""
    return max(steps, REFRESH_EVERY.get(method, 1))


def _time_steps(m: _Method, data, warmup: int, steps: int, device, max_seconds: float | None = None
                ) -> tuple[list, list]:
    """Wall time of each timed step (synchronised), and the tuner's ``StepResult`` of each where there is one (its
    phase split); no step starts once the timed ones took ``max_seconds``."""
    for b in data[:warmup]:
        m.step(b)
    if device != "cpu":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, splits = [], []
    for b in data[warmup:warmup + steps]:
        t0 = time.perf_counter()
        m.step(b)
        harness.sync(device)
        times.append(time.perf_counter() - t0)
        if m.last is not None:
            splits.append(m.last)
        if max_seconds is not None and sum(times) >= max_seconds:
            break
    return times, splits


def _free(device) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def table(records: list[dict]) -> str:
    """Markdown table of step results, with ratios to ``full`` per model."""
    rows = ["| model | method | device | ms/step (mean) | vs full | tokens/s | peak GiB | attribution share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    full = {(r["model"], r.get("device")): r["mean_ms"] for r in records if r["method"] == "full" and "skipped" not in r}
    for r in records:
        if "skipped" in r:
            rows.append(f"| {r['model']} | {r['method']} | {r.get('device', '')} | {r['skipped']} | — | — | — | — |")
            continue
        ref = full.get((r["model"], r.get("device")))
        ratio = f"{r['mean_ms'] / ref:.2f}x" if ref else "—"
        share = f"{100 * r['attribution_fraction']:.0f}%" if "attribution_fraction" in r else "—"
        rows.append(f"| {r['model']} | {r['method']} | {r.get('device', '')} | {r['mean_ms']:.0f} | {ratio} | "
                    f"{r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.2f} | {share} |")
    return "\n".join(rows)


def main(argv=None) -> list[dict]:
    from .cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="ct-fast bench", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 formatter_class=HelpFormatter)
    ap.add_argument("--models", default="gpt2-small", help="comma-separated: tiny, gpt2-small, llama-1B, llama-8B")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to time")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model dtype")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--seq", type=int, default=64, help="tokens per example")
    ap.add_argument("--steps", type=int, default=3,
                    help="timed steps per method (circuit_refresh10: at least 10, the last a refresh)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="per method: no timed step starts once the timed ones took this long (at least one runs)")
    ap.add_argument("--fraction", type=float, default=0.05, help="target share of parameters in the circuit")
    ap.add_argument("--out", default=None, help="results JSON (default: bench/results/step_<device>.json)")
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    methods = [m for m in a.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise CTFastError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    for name, least in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq", 2)):
        if getattr(a, name) < least:
            raise CTFastError(f"--{name} must be >= {least}, got {getattr(a, name)}")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise CTFastError(f"--device {a.device}: this torch has no CUDA device (torch {torch.__version__}); use "
                          "--device cpu")
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in SHAPES]
    if bad:
        raise CTFastError(f"--models: unknown {bad}; choose from {', '.join(SHAPES)}")
    records = []

    def save(rec):  # the file grows with each method: a run stopped part-way keeps what it timed
        records.append(rec)
        harness.write(f"step_{a.device}", records, a.out)

    for name in models:
        run(name, methods, a.device, dtype, a.batch, a.seq, a.steps, a.warmup, a.fraction, on_record=save,
            max_seconds=a.max_seconds)
    print(table(records))
    print(harness.write(f"step_{a.device}", records, a.out))
    return records
