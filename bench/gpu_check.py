"""The one device check: build, test and benchmark everything on a GPU in one go (``bench/gpu_check.sh``).

    bash bench/gpu_check.sh              # on the GPU machine: results in $OUT (then report.py --import)
    bash bench/gpu_check.sh --rehearse   # every stage on the CPU at tiny shapes (the test suite runs this)
    bash bench/gpu_check.sh --only op_score_edges,step   # some stages again (same machine: the build stays)

Stages run in order — build, tests, the op timings (they decide ``auto``), the step benchmark, the 8B step, then the
rest — each under a time limit (the whole check is budgeted at 9 minutes; stages past it are skipped, and a timed-out
stage's process group is killed); none stops the next. After every stage ``$OUT`` (default
``bench/results/gpu_check``) holds two files: ``gpu_check.json`` (summary, the GPU targets of ``bench/targets.py``,
auto's measured choices) and ``gpu_check.tar.gz`` (each stage's log and JSON) — the device returns at most 8 files, and
a run killed at its limit still returns what it finished. ``python bench/report.py --import gpu_check.tar.gz`` files
the JSON as ``bench/results/gpu_<stage>.json`` and regenerates the README tables and auto's choices. The last screen
is the summary table and the targets. A stage that only makes sense on a GPU is reported as skipped in the rehearsal.
The GPU tests run on 8 pytest-xdist workers where xdist is installed (``CT_FAST_GPU_TEST_WORKERS=0``: one process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # this process reads ct_fast from the tree: the build installs it only for the stages it starts
PY = sys.executable
BUDGET_S = 9 * 60
BUDGET_SPENT = "the time budget is spent"
MIN_STAGE_S = 40  # a stage is not started with less left (it would be killed before it wrote a record)
# the build's last line, and its exit status: a build that came out without the CUDA kernels fails the stage
BUILT_WITH_CUDA = ("import sys, ct_fast._C as C; print('ct_fast._C built; CUDA kernels:', C.WITH_CUDA); "
                   "sys.exit(0 if C.WITH_CUDA else 1)")


def stages(rehearse: bool, out: str) -> list[dict]:
    """``{name, cmd (None: skipped, with why), limit}`` per stage; commands write their JSON into ``out``."""
    dev = "cpu" if rehearse else "cuda"
    j = lambda name: os.path.join(out, f"{name}.json")  # noqa: E731
    bench = lambda script, *args: [PY, os.path.join(ROOT, "bench", script), *args]  # noqa: E731
    q = shlex.quote
    pip = f"{q(PY)} -m pip install --no-deps --no-build-isolation -e {q(ROOT)}"
    if rehearse:
        tiny_ops = {"masked_adamw": ["--params", "2e5", "--d", "64"],
                    "score_edges": ["--layers", "2", "--d-model", "32", "--heads", "4", "--batch", "2", "--seq", "8"],
                    "masked_dw": ["--tokens", "32", "--d", "32"]}
    else:
        # score_edges: a materialising EAP's memory grows with the nodes (layers x heads), ours does not — 12
        # layers of 16 heads (1-2 s a brute-force call: its Python loop over edges), not the CPU default's 4 x 8
        tiny_ops = {"masked_adamw": ["--params", "1e9", "--d", "4096"], "score_edges": [
            "--layers", "12", "--d-model", "512", "--heads", "16", "--batch", "4", "--seq", "128"], "masked_dw": [
            "--tokens", "8192", "--d", "4096", "--fraction", "0.05"]}

    def faithful_step(name: str, env: dict) -> dict:
        """A stage timing the faithful step (refresh 1) alone under another setting ``env``: the data for its default
        (compare with the step stage's)."""
        return {"name": name, "limit": 60, "env": env,
                "cmd": [PY, "-m", "ct_fast", "bench", "--device", dev, "--out", j(name), "--methods", "circuit_refresh1"]
                + (["--models", "tiny", "--steps", "1", "--warmup", "1"] if rehearse else
                   ["--models", "llama-1B", "--dtype", "bf16", "--steps", "3", "--batch", "8", "--seq", "512"])}
    return [
        # a CUDA build that fails still leaves the package installed without the CUDA kernels (the Triton and torch
        # paths then get their timings): the stage fails, the run goes on
        {"name": "build", "limit": 420, "why": "rehearsal: the installed package is used",
         "cmd": None if rehearse else ["bash", "-c", f"{pip} || (echo 'the CUDA build failed: building without the CUDA"
                                       f" kernels'; CT_FAST_NO_CUDA=1 {pip}); {q(PY)} -c {q(BUILT_WITH_CUDA)}"]},
        # correctness first: every op on CUDA against its reference, tuner steps per backend, CUDA-graph capture (the CPU
        # cases of test_ops, the emulated CUDA kernels included — "cuda_emu" cases, "emulated" tests: a minute's g++
        # build on a fresh machine — are the CPU suite's: deselected here)
        {"name": "tests", "limit": 150,
         "cmd": [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist_args(rehearse),
                 os.path.join(ROOT, "tests", "test_gpu.py")]
         + (["-k", "not triton"] if rehearse else
            [os.path.join(ROOT, "tests", "test_ops.py"), "-k",
             "(cuda or triton or test_gpu) and not cuda_emu and not emulated"]),
         "env": {"CT_FAST_TEST_DEVICE": dev, **({"TRITON_INTERPRET": "1"} if rehearse else {})}},
        # the op timings: they decide auto's kernels (and carry their own error against the reference)
        # score_edges: one block and a layer; masked_adamw: rows and columns per backend
        *[{"name": f"op_{name}", "limit": {"score_edges": 100, "masked_adamw": 90}.get(name, 75),
           "cmd": bench(f"bench_{name}.py", "--device", dev, *args, "--out", j(f"op_{name}"))}
          for name, args in tiny_ops.items()],
        # the targets' methods first (each method's record is written as it finishes); 4096 tokens a step (512
        # would time launch overheads)
        {"name": "step", "limit": 150, "cmd": [PY, "-m", "ct_fast", "bench", "--device", dev, "--out", j("step")]
         + (["--models", "tiny", "--steps", "1", "--warmup", "1", "--methods", "full,circuit_refresh1,circuit_dropin,"
             "circuit_refresh10"] if rehearse else
            ["--models", "llama-1B", "--dtype", "bf16", "--steps", "3", "--batch", "8", "--seq", "512", "--methods",
             "full,circuit_refresh1,circuit_refresh10,circuit_dropin,lora,reference"])
         # the reference code's step took 24 s on the H200: one timed step after its warm-up (~48 s, not ~95)
         + ["--max-seconds", "20"]},
        {"name": "big_step", "limit": 150, "cmd": bench("bench_big_step.py", "--device", dev, "--out", j("big_step"), *(
            ["--model", "tiny", "--batch", "2", "--seq", "16", "--dtype", "fp32", "--state-capacity", "1"] if rehearse
            else ["--model", "llama-8B", "--batch", "1", "--seq", "2048", "--dtype", "bf16", "--checkpointing",
                  "--state-capacity", "0.25", "--mlp-head-dim", "128", "--mode", "two_pass"]))},
        # where a step's time goes (launches, device-busy vs wall, top kernels): the faithful step, a step between
        # refreshes (refresh 10 missed its 0.9x by 2% in session 12) and the masked optimizer step of the targets
        {"name": "profile", "limit": 90, "cmd": bench("profile_step.py", "--device", dev, "--out", j("profile"), *(
            ["--model", "tiny", "--methods", "circuit_refresh1", "--optimizer-params", "2e5", "--optimizer-d", "64"]
            if rehearse else
            ["--model", "llama-1B", "--dtype", "bf16", "--batch", "8", "--seq", "512", "--methods",
             "circuit_refresh1,circuit_refresh10,full", "--optimizer-params", "1e9", "--optimizer-d", "4096"]))},
        # tile variants of the Triton scoring kernels: the data to set their defaults by
        {"name": "tiles", "limit": 90, "cmd": bench("bench_score_edges.py", "--device", dev, "--tiles", "--out",
                                                    j("tiles")),
         "env": {"TRITON_INTERPRET": "1"} if rehearse else {}},
        # the faithful step with 4 layers scored together (CT_FAST_SCORE_SPAN; default 2): fewer contribution bytes
        # and FLOPs against twice the held gradients — the data for the default (compare with the step stage's)
        faithful_step("step_span4", {"CT_FAST_SCORE_SPAN": "4"}),
        # ... and with 4x longer scoring chunks (CT_FAST_SCORE_CHUNK_ELEMENTS; default 2^28): ~2.7k launches a
        # deferred step instead of ~4.0k (bench/count_launches.py), for 4x the scoring blocks' memory — the data for
        # that default
        faithful_step("step_chunk4x", {"CT_FAST_SCORE_CHUNK_ELEMENTS": str(1 << 30)}),
        {"name": "scale", "limit": 120, "cmd": bench("bench_scale.py", "--device", dev, "--out", j("scale"), *(
            ["--seqs", "16", "--layers", "2", "--d-model", "64", "--batch-time", "1", "--batch-mem", "1", "--steps", "1",
             "--checkpointing", "off", "--sync-layers", "2", "--methods", "full,deferred,two_pass,two_pass_fused"]
            if rehearse else
            ["--seqs", "1024,4096", "--layers", "8", "--d-model", "2048", "--dtype", "bf16", "--batch-time", "2",
             "--batch-mem", "2", "--steps", "2", "--sync-layers", "32", "--methods",
             "full,deferred,two_pass,lagged,circuit_refresh10,deferred_fused,two_pass_fused"]))},
        {"name": "dropin", "limit": 60, "cmd": bench("bench_dropin.py", "--device", dev, "--out", j("dropin"), *(
            ["--model", "tiny", "--batch", "2", "--seq", "16", "--rounds", "1"] if rehearse else ["--rounds", "5"]))},
        {"name": "distributed", "limit": 90, "cmd": bench("bench_distributed.py", "--worlds", "1", "--out",
                                                           j("distributed"), *(
            ["--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--backend", "gloo"] if rehearse else
            ["--backend", "nccl", "--steps", "3"]))},
        {"name": "tune_torchrun", "limit": 120, "cmd": bench("bench_tune_torchrun.py", "--device", dev, "--out",
                                                             j("tune_torchrun"), *(
            [] if rehearse else ["--hidden", "1024", "--layers", "8", "--batch", "16", "--steps", "6", "--top-n", "200"]))},
    ]


def xdist_args(rehearse: bool) -> list[str]:
    """pytest-xdist workers for the GPU tests (the device image has xdist): Triton's JIT compiles, on the host's
    CPUs, dominate that stage. ``CT_FAST_GPU_TEST_WORKERS`` sets how many (default 8; 0: one process)."""
    n = int(os.environ.get("CT_FAST_GPU_TEST_WORKERS", "8"))
    if rehearse or n <= 1 or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(n)]


def run(rehearse: bool, out: str, only: set | None = None) -> list[dict]:
    """Run the stages; after each one ``out`` holds ``gpu_check.json`` (summary, targets, auto's choices) and
    ``gpu_check.tar.gz`` (every stage's log and JSON): the device returns at most 8 files from ``$OUT``, and a run
    killed at its limit still returns what it finished."""
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ct_fast_gpu_check_")  # the stages' logs and JSON
    t_start = time.perf_counter()
    summary, rows, choices, extra_env = [], [], {}, {}
    for st in stages(rehearse, work):
        if only is not None and st["name"] not in only:
            continue
        rec = {"stage": st["name"], "seconds": 0.0}
        left = BUDGET_S - (time.perf_counter() - t_start) if not rehearse else st["limit"]
        if st["cmd"] is None:
            rec.update(status="skipped", detail=st["why"])
        elif left < MIN_STAGE_S:
            rec.update(status="skipped", detail=BUDGET_SPENT)
        else:
            rec.update(run_stage(st, min(st["limit"], left), os.path.join(work, f"{st['name']}.log"), extra_env))
        summary.append(rec)
        print(f"[gpu_check] {rec['stage']:>12}: {rec['status']} ({rec['seconds']} s) {rec.get('detail', '')}",
              flush=True)
        rows, choices = publish(out, work, summary, rehearse)
        if st["name"].startswith("op_"):
            own = apply_choices(work, summary, choices)
            if own:
                extra_env["CT_FAST_GPU_CHOICES"] = own
    print("\n| stage | status | seconds | last line |\n| --- | --- | --- | --- |")
    for r in summary:
        print(f"| {r['stage']} | {r['status']} | {r['seconds']} | {r.get('detail', '')[:90]} |")
    print(f"auto's kernel choices from these timings (python bench/report.py --import gpu_check.tar.gz commits them): "
          f"{json.dumps(choices)}")
    import targets

    print("\n" + targets.table(rows))
    try:
        print("\n" + targets.phase_table(work))
    except Exception as e:  # noqa: BLE001  (a reading error must not cost the summary)
        print(f"phase split: {e!r}")
    unrun = [r["stage"] for r in summary if r["status"].startswith("timeout") or r.get("detail") == BUDGET_SPENT]
    if unrun:  # the command for a second call in the same lease (the build stays installed there)
        print(f"\nnot finished in this run: bash bench/gpu_check.sh --only {','.join(unrun)}")
    shutil.rmtree(work, ignore_errors=True)
    if os.path.exists(work + "_choices.json"):
        os.remove(work + "_choices.json")
    return summary


def run_stage(st: dict, limit: float, log_path: str, extra_env: dict | None = None) -> dict:
    """One stage's command in its own process group (a timeout kills its workers and ranks too)."""
    env = {**os.environ, **(extra_env or {}), **st.get("env", {})}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(st["cmd"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun stops its workers on it (they run in sessions of their own, out of the group)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the whole group is gone
                pass
            proc.wait()
            status = f"timeout ({limit:.0f} s)"
    with open(log_path) as log:
        tail = log.read().strip().splitlines()
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "detail": tail[-1][:160] if tail else ""}


def kernels_from_tree():
    """Make ``ct_fast.kernels`` (the tree's ``kernels/``, mapped into the package by the install) importable in this
    process, which started before the build stage installed the package: Python reads the editable install's
    finder at start-up only, and the choices read the kernels' tile versions."""
    import ct_fast

    if "ct_fast.kernels" in sys.modules or importlib.util.find_spec("ct_fast.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location("ct_fast.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(ROOT, "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ct_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["ct_fast.kernels"]
        raise
    ct_fast.kernels = module


def publish(out: str, work: str, summary: list[dict], rehearse: bool) -> tuple[list[dict], dict]:
    """``out/gpu_check.json`` and ``out/gpu_check.tar.gz`` as the run stands; returns the target rows and auto's
    measured choices (``{}`` where they cannot be read)."""
    import targets  # bench/targets.py

    from ct_fast.app import harness

    def error_row(what: str, e: Exception) -> dict:
        return {"target": what, "limit": "", "value": None, "where": "", "status": f"error: {e!r}"}

    try:  # a reading error must not cost the run's summary, nor one reading the other
        rows = targets.evaluate(work)
    except Exception as e:  # noqa: BLE001
        rows = [error_row("reading the targets", e)]
    try:
        kernels_from_tree()
        choices = measured_choices(work)
    except Exception as e:  # noqa: BLE001
        rows, choices = rows + [error_row("deriving auto's choices", e)], {}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump({"env": harness.env(), "rehearse": rehearse, "stages": summary, "targets": rows,
                   "auto_choices": choices}, f, indent=1)
    with tarfile.open(os.path.join(out, "gpu_check.tar.gz.part"), "w:gz") as tar:
        for name in sorted(os.listdir(work)):
            tar.add(os.path.join(work, name), arcname=name)
    os.replace(os.path.join(out, "gpu_check.tar.gz.part"), os.path.join(out, "gpu_check.tar.gz"))
    return rows, choices


def apply_choices(work: str, summary: list[dict], choices: dict) -> str | None:
    """The later stages (step, profile, scale...) run ``auto`` on this run's op timings — the kernels as they are
    now, on this GPU — rather than on the committed ones, once this run's tests passed: returns the table's path
    for ``CT_FAST_GPU_CHOICES`` in their environment (``report.py --import`` then commits the same choices), or
    None."""
    if not choices or not any(r["stage"] == "tests" and r["status"] == "ok" for r in summary):
        return None
    import torch

    from ct_fast.ops import measured

    arch = measured.device_architecture(torch.device("cuda"))
    path = work + "_choices.json"  # beside the stages' folder, not in the archive: report.py files stage results only
    with open(path, "w") as f:
        json.dump({"about": "this GPU check's op timings (ct_fast.ops.measured.derive)",
                   "architectures": [arch] if arch else [],
                   "choices": {k: v for k, v in choices.items() if k not in ("tiles", "products")},
                   "products": choices.get("products", {})}, f, indent=1)
    return path


def measured_choices(out: str) -> dict:
    """What ``ct_fast.ops.measured.derive`` makes of this run's op benchmarks, ``derive_products`` of their score
    product timings (``"products"``: the torch scoring path's explicit K split) and ``derive_tiles`` of its tile
    timings (``"tiles"``; empty on CPU: GPU records only)."""
    from ct_fast.ops import measured

    records = []
    for name in sorted(os.listdir(out)):
        if name.startswith("op_") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                records += json.load(f).get("results", [])
    choices = measured.derive(records)
    choices["products"] = measured.derive_products(records)
    tiles = os.path.join(out, "tiles.json")
    if os.path.exists(tiles):
        with open(tiles) as f:
            choices["tiles"] = measured.derive_tiles(json.load(f).get("results", []), measured.tile_versions())
    return choices


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rehearse = "--rehearse" in argv
    only = None
    if "--only" in argv:  # a second call in the same lease: rerun some stages (the build stays installed)
        only = set(argv[argv.index("--only") + 1].split(","))
        unknown = only - {st["name"] for st in stages(rehearse, "")}
        if unknown:
            raise SystemExit(f"--only: no stage named {sorted(unknown)}; stages: "
                             f"{', '.join(st['name'] for st in stages(rehearse, ''))}")
    out = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results", "gpu_check")
    from ct_fast.app import harness

    if harness.env()["commit"] is None:
        print("[gpu_check] no commit known (no .git here): the results will name none; pass CT_FAST_COMMIT=<hash>",
              flush=True)
    summary = run(rehearse, out, only)
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
