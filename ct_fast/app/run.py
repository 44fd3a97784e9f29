"""Training runs on disk: the run directory, checkpoints with exact resume, and the training loop shared
by ``ct-fast tune`` and ``ct-fast demo`` for circuit-tuning and its baselines (full, LoRA).

Run directory::

    config.json      every setting (for exact reruns and --resume)
    log.jsonl        one record per step: loss, metric, circuit size, top_n, lr, step time, ...
    circuits/        step-000010.json ... (the circuit every ``circuit_every`` steps, and the last)
    checkpoints/     step-000050/state.pt and ``latest`` (model, optimizer, tuner, RNG, data position)
    summary.json     written at the end

Every file is written atomically (temporary file, then rename): an interrupted run never leaves a
corrupt checkpoint or summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import math

import numpy as np
import torch
from torch import nn

from ..attribution import evaluate_metric, model_inputs
from ..circuit import Circuit, TopNSchedule
from .data import Example, batch_indices, collate
from ..errors import CTFastError
from ..fused_loss import causal_lm_loss
from ..optim import CircuitAdamW, CircuitSGD
from ..tuner import CircuitTuner
from .launch import Launch

METHODS = ("circuit", "full", "lora")
LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def write_atomic(path: str, data: bytes | str):
    """Write ``data`` to ``path`` through a temporary file and a rename (the temporary file is removed when the
    write fails, e.g. on a full disk)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class RunDir:
    """Files of one run (see module docstring)."""

    def __init__(self, path: str, create: bool = True):
        self.path = os.path.abspath(path)
        if create:
            os.makedirs(self.path, exist_ok=True)

    def file(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    def write_json(self, name: str, obj):
        write_atomic(self.file(name), json.dumps(obj, indent=1))

    def read_json(self, name: str):
        with open(self.file(name)) as f:
            return json.load(f)

    def clear(self, *names: str):
        """Remove these files or folders of an earlier run in the same place (a run written there again)."""
        for name in names:
            path = self.file(name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def append_log(self, record: dict):
        with open(self.file("log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_log(self) -> list[dict]:
        """The log's records; a torn last line (a write cut short: a full disk, a kill) is dropped, as the step it
        records is redone from its checkpoint."""
        if not os.path.exists(self.file("log.jsonl")):
            return []
        with open(self.file("log.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # (not the last line: the log is damaged, not cut short)
                    raise CTFastError(f"{self.file('log.jsonl')}: line {i + 1} is not JSON") from None
        return records

    def truncate_log(self, before_step: int):
        """Drop log records of steps >= ``before_step`` (written after the checkpoint we resume from)."""
        keep = [r for r in self.read_log() if r.get("step", -1) < before_step]
        write_atomic(self.file("log.jsonl"), "".join(json.dumps(r) + "\n" for r in keep))

    def save_circuit(self, step: int, circuit: Circuit):
        os.makedirs(self.file("circuits"), exist_ok=True)
        write_atomic(self.file("circuits", f"step-{step:06d}.json"), json.dumps(dict(circuit.to_dict(), step=step)))

    def save_checkpoint(self, step: int, state: dict, keep: int = 2):
        """``checkpoints/step-N/state.pt`` written whole, then ``latest`` pointed at it; older ones pruned."""
        tmp = self.begin_checkpoint(step)
        try:
            with open(os.path.join(tmp, "state.pt"), "wb") as f:  # a file object: write errors are OSErrors
                torch.save(state, f)
            self.finish_checkpoint(step, tmp, keep)
        except BaseException:  # e.g. a full disk: no half-written checkpoint directory stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def begin_checkpoint(self, step: int) -> str:
        """A fresh temporary directory for the files of the checkpoint of ``step`` (``finish_checkpoint`` makes it
        ``checkpoints/step-N``)."""
        os.makedirs(self.file("checkpoints"), exist_ok=True)
        tmp = self.file("checkpoints", f"step-{step:06d}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def finish_checkpoint(self, step: int, tmp: str, keep: int = 2):
        """Rename the complete ``tmp`` to ``checkpoints/step-N``, point ``latest`` at it, prune older ones."""
        final = self.file("checkpoints", f"step-{step:06d}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(self.file("checkpoints", "latest"), os.path.basename(final))
        done = sorted(d for d in os.listdir(self.file("checkpoints")) if d.startswith("step-") and ".tmp" not in d)
        for old in done[:-keep]:
            shutil.rmtree(self.file("checkpoints", old), ignore_errors=True)

    def checkpoint_step(self) -> int | None:
        """The step of the latest checkpoint (without loading it), or None."""
        latest = self.file("checkpoints", "latest")
        if not os.path.exists(latest):
            return None
        with open(latest) as f:
            name = f.read().strip()
        try:
            return int(name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            raise CTFastError(f"{latest}: unreadable checkpoint pointer {name!r}") from None

    def checkpoint_path(self) -> str | None:
        """The directory of the latest checkpoint, or None."""
        step = self.checkpoint_step()
        return None if step is None else self.file("checkpoints", f"step-{step:06d}")

    def load_checkpoint(self) -> dict | None:
        path = self.checkpoint_path()
        return None if path is None else torch.load(os.path.join(path, "state.pt"), weights_only=False)


@dataclass
class TrainConfig:
    """Settings of one training run (all of them land in config.json)."""

    method: str = "circuit"
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    top_n: int = 50
    top_n_end: int | None = None
    top_n_schedule: str = "constant"
    schedule_steps: int | None = None  # steps the top-n schedule spans (the original steps of an extended run)
    refresh_every: int = 1
    ablation: str = "mean"
    metric: str = "loss"
    selection: str = "edges"
    mlp_head_dim: int | None = None
    token_budget: int | None = None
    memory_mode: str = "auto"
    state_capacity: float | int | None = None
    fused_loss: bool = False
    lora_r: int = 32
    seed: int = 0
    circuit_every: int = 10
    save_every: int = 50
    extra: dict = field(default_factory=dict)

    def check(self):
        """Refuse settings no run can use (one-line ``CTFastError``), before anything is loaded."""
        if self.method not in METHODS:
            raise CTFastError(f"method {self.method!r} is not one of {METHODS}")
        if self.optimizer not in ("adamw", "sgd"):
            raise CTFastError(f"optimizer {self.optimizer!r} is not 'adamw' or 'sgd'")
        for name in ("steps", "batch_size", "circuit_every", "save_every", "refresh_every", "top_n", "lora_r"):
            if getattr(self, name) < 1:
                raise CTFastError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("top_n_end", "token_budget", "mlp_head_dim", "schedule_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CTFastError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CTFastError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise CTFastError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise CTFastError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.top_n_schedule not in ("constant", "linear", "cosine"):
            raise CTFastError(f"top_n_schedule {self.top_n_schedule!r} is not 'constant', 'linear' or 'cosine'")
        if self.top_n_schedule == "constant" and self.top_n_end is not None:
            raise CTFastError("top_n_end needs a top_n_schedule of 'linear' or 'cosine' (the schedule is 'constant')")
        if self.top_n_schedule != "constant" and self.top_n_end is None:
            raise CTFastError(f"a {self.top_n_schedule} top_n_schedule needs top_n_end")
        cap = self.state_capacity
        if cap is not None and (cap <= 0 or (isinstance(cap, float) and cap > 1)):
            raise CTFastError(f"state_capacity must be a fraction in (0, 1] or a row count >= 1, got {cap}")
        if self.fused_loss and self.method == "lora":
            raise CTFastError("--fused-loss runs with --method circuit or full (LoRA's wrapper hides the base model)")
        if self.fused_loss and self.metric != "loss":
            raise CTFastError(f"--fused-loss computes the training loss without logits; --metric {self.metric} "
                              "needs them: use --metric loss or drop --fused-loss")
        if self.method == "circuit" and self.ablation == "corrupted":
            raise CTFastError("ablation 'corrupted' needs paired corrupted inputs; the command line supports "
                              "'mean' and 'zero' (use the Python API for corrupted runs)")


class Method:
    """A model with its optimizer (and tuner): ``step(batch) -> record`` for circuit, full or LoRA.

    ``launch`` (``ct_fast.app.launch``): the processes of the run; ``model`` is wrapped for them (``runner``:
    the model itself, its DDP wrapper, or the FSDP2-sharded model) and ``step`` reports the loss and metric
    averaged over the ranks."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, arch: str, launch: Launch | None = None):
        self.cfg, self.tuner, self.launch = cfg, None, launch or Launch()
        self.applied: Circuit | None = None  # the circuit the last step updated
        self.base_params = sum(p.numel() for p in model.parameters())
        _seed(cfg.seed)  # LoRA initialises its adapters randomly: the same seed gives the same run
        if cfg.method == "lora":
            if self.launch.parallel == "fsdp":
                raise CTFastError("--method lora runs under --parallel ddp (LoRA adapters are small: sharding "
                                  "them saves nothing)")
            model = _lora(model, cfg, arch)
        self.model = model
        self.runner = self.launch.wrap(model)
        params = [p for p in self.runner.parameters() if p.requires_grad]
        if cfg.method == "circuit":
            cap = cfg.state_capacity
            self.optimizer = (CircuitAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, state_capacity=cap)
                              if cfg.optimizer == "adamw" else
                              CircuitSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                         state_capacity=cap))
            schedule = top_n_schedule(cfg)
            self.tuner = CircuitTuner(self.runner, self.optimizer, top_n=schedule, metric=cfg.metric,
                                      ablation=cfg.ablation, selection=cfg.selection, refresh_every=cfg.refresh_every,
                                      mlp_head_dim=cfg.mlp_head_dim, token_budget=cfg.token_budget,
                                      memory_mode=cfg.memory_mode, fused_loss=cfg.fused_loss)
        else:
            self.optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
                              else torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        self.trainable = sum(p.numel() for p in params)

    def step(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        if self.tuner is not None:
            r = self.tuner.step(batch)
            self.applied = r.circuit  # (lagged: the previous step's; tuner.circuit is the next one's)
            loss, metric = r.loss, r.metric
            if self.launch.distributed:
                loss, metric = self.launch.mean(torch.tensor([loss, metric])).tolist()
            record = {"loss": loss, "metric": metric, "top_n": r.top_n, "circuit_edges": len(r.circuit),
                      "circuit_nodes": len(r.circuit.nodes), "tuned_params": r.tuned_params,
                      "tuned_fraction": r.circuit.fraction, "refreshed": r.refreshed, "memory_mode": r.memory_mode,
                      "state_rows": self.optimizer.num_state_rows(),
                      "state_pool_rows": self.optimizer.state_capacity_rows(),
                      "timings": {k: round(v, 6) for k, v in r.timings.items()}, "step_time": r.timings["total"]}
            if self.launch.distributed:
                record["comm_bytes"] = self.optimizer.last_step.comm_bytes
            return record
        out = (causal_lm_loss(self.runner, model_inputs(batch)) if self.cfg.fused_loss
               else self.runner(**model_inputs(batch)))
        with torch.no_grad():
            metric = evaluate_metric(self.cfg.metric, out, batch)
        loss, metric = self.launch.mean(torch.stack([out.loss.detach().float(), metric.float()])).tolist()
        if not math.isfinite(loss):  # the mean over the ranks: every rank refuses the step together
            raise CTFastError(f"the training loss is {loss}: lower the learning rate or check the data")
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "metric": metric, "tuned_params": self.trainable,
                "tuned_fraction": self.trainable / self.base_params, "step_time": time.perf_counter() - t0}

    def tuner_state(self) -> dict | None:
        return None if self.tuner is None else self.tuner.state_dict()

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "tuner": self.tuner_state()}

    def load_tuner_state(self, tuner: dict | None):
        if self.tuner is not None and tuner is not None:
            self.tuner.load_state_dict(tuner)

    def load_state(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_tuner_state(state["tuner"])

    def final_model(self) -> nn.Module:
        """The tuned model as a plain transformers model (LoRA merged)."""
        return self.model.merge_and_unload() if self.cfg.method == "lora" else self.model


def top_n_schedule(cfg: TrainConfig) -> TopNSchedule:
    """The run's circuit size per step: ``top_n`` at step 0, ``top_n_end`` at the last step of the schedule
    (``schedule_steps``, default ``steps``) and after."""
    span = cfg.schedule_steps or cfg.steps
    return TopNSchedule(cfg.top_n, cfg.top_n_end, max(1, span - 1), cfg.top_n_schedule)


def _lora(model, cfg: TrainConfig, arch: str):
    try:
        import peft
    except ImportError:
        raise CTFastError("method 'lora' needs peft: pip install peft") from None
    import warnings

    targets = LORA_TARGETS["gpt2" if arch == "gpt2" else "llama"]
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules=targets,
                             fan_in_fan_out=arch == "gpt2", bias="none")
    with warnings.catch_warnings():  # peft calls a transformers API that transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int):
    torch.manual_seed(seed)  # all devices
    random.seed(seed)
    np.random.seed(seed)


def train(run: RunDir, method: Method, examples: list[Example], pad_id: int, evaluate=None, eval_every: int = 0,
          resume: bool = False, progress: bool = True, checkpoints: bool = True) -> list[dict]:
    """Run ``method`` for ``cfg.steps`` steps on ``examples``; log, save circuits and checkpoints.

    ``evaluate(model) -> dict`` (optional) adds fields to the log every ``eval_every`` steps and at the end.
    With ``resume`` the latest checkpoint restores model, optimizer, tuner, RNG and data position.
    ``checkpoints=False`` writes none (runs that are not resumed, such as the demo's). Under ``torchrun``
    (``method.launch``) each rank steps on its slice of every global batch and only rank 0 writes; the log it
    returns is complete on rank 0 (the other ranks return their own records).
    """
    from tqdm.auto import tqdm

    cfg, launch = method.cfg, method.launch
    start = 0
    if resume:
        start = load_checkpoint(run, method)
        if launch.main:
            run.truncate_log(start)
    if not start:  # a fresh run, or a resume before the first checkpoint: start over exactly — each rank from its
        _seed(cfg.seed + launch.rank)  # own seed (dropout masks of the ranks' batches independent, as in one batch)
    device = next(method.model.parameters()).device
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and launch.main),
               desc=cfg.method, dynamic_ncols=True)
    records = []
    for step in bar:
        indices = launch.split(batch_indices(step, cfg.batch_size, len(examples), cfg.seed))
        batch = collate([examples[i] for i in indices], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        record = {"step": step, "lr": method.optimizer.param_groups[0]["lr"], **method.step(batch)}
        last = step == cfg.steps - 1
        if evaluate is not None and ((eval_every and step % eval_every == 0) or last):
            record.update(evaluate(method.model))
        records.append(record)
        if launch.main:
            run.append_log(record)
            if method.tuner is not None and (step % cfg.circuit_every == 0 or last):
                run.save_circuit(step, method.applied)  # the circuit the step updated, as the log's record
        post = {"loss": f"{record['loss']:.3f}"}
        if "circuit_edges" in record:
            post["edges"], post["params"] = record["circuit_edges"], f"{100 * record['tuned_fraction']:.1f}%"
        bar.set_postfix(post)
        if checkpoints and ((step + 1) % cfg.save_every == 0 or last):
            save_checkpoint(run, method, step + 1)
    return run.read_log() if launch.main else records


def save_checkpoint(run: RunDir, method: Method, step: int):
    """The state after ``step`` steps: rank 0 writes ``state.pt`` (step, tuner, the RNG state of every rank and,
    unless sharded, model and optimizer); with ``--parallel fsdp`` the model shards go through
    ``torch.distributed.checkpoint`` (``model/``) and each rank writes its optimizer shard (``optimizer-rank-R.pt``:
    the state of the rows its parameter shards hold)."""
    launch = method.launch
    rng = launch.gather(_rng_state())
    meta = {"step": step, "rng": rng, "world": launch.world, "parallel": launch.parallel}
    if launch.parallel != "fsdp":
        if launch.main:
            run.save_checkpoint(step, {**meta, "method": method.state()})
        return
    import torch.distributed.checkpoint as dcp

    tmp = launch.on_main(lambda: run.begin_checkpoint(step))
    dcp.save(method.model.state_dict(), checkpoint_id=os.path.join(tmp, "model"))
    with open(os.path.join(tmp, f"optimizer-rank-{launch.rank}.pt"), "wb") as f:
        torch.save(method.optimizer.state_dict(), f)
    launch.barrier()
    if launch.main:
        with open(os.path.join(tmp, "state.pt"), "wb") as f:
            torch.save({**meta, "method": {"tuner": method.tuner_state()}}, f)
        run.finish_checkpoint(step, tmp)
    launch.barrier()  # the next checkpoint's directory is created only after this one is complete


def load_checkpoint(run: RunDir, method: Method) -> int:
    """Restore the latest checkpoint into ``method`` and the RNG; the step to continue from (0 without one).
    Every rank reads it; a run resumed on another number of processes gets rank ``r % old_world``'s RNG state
    (its random draws, e.g. dropout, then differ from an uninterrupted run's); a sharded one needs the same number."""
    launch = method.launch
    path = run.checkpoint_path()
    if path is None:
        return 0
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False, map_location="cpu")  # (not rank 0's GPU on
    # every rank: load_state_dict copies each tensor to its parameter's device)
    parallel, world = state.get("parallel"), state.get("world", 1)
    if (parallel == "fsdp") != (launch.parallel == "fsdp") or (parallel == "fsdp" and world != launch.world):
        raise CTFastError(f"{path} holds sharded state of {world} process(es); resume it with the same launch "
                          f"(--parallel fsdp and {world} processes)" if parallel == "fsdp" else
                          f"{path} holds replicated state; resume it without --parallel fsdp")
    if launch.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp

        model_state = method.model.state_dict()
        dcp.load(model_state, checkpoint_id=os.path.join(path, "model"))
        method.model.load_state_dict(model_state)
        method.optimizer.load_state_dict(torch.load(os.path.join(path, f"optimizer-rank-{launch.rank}.pt"),
                                                    weights_only=False))  # (this rank's own, on its own device)
        method.load_tuner_state(state["method"]["tuner"])
    else:
        method.load_state(state["method"])
    rng = state["rng"]
    if isinstance(rng, list):  # one per rank (older checkpoints: one dict)
        if len(rng) != launch.world and launch.main:
            import warnings

            warnings.warn(f"{path} was written by {len(rng)} process(es), resumed on {launch.world}: the steps "
                          "continue exactly, random draws (dropout) differ from an uninterrupted run")
        rng = rng[launch.rank % len(rng)]
    _set_rng_state(rng)
    return state["step"]


def config_dict(cfg: TrainConfig, **more) -> dict:
    return {**asdict(cfg), **more}
