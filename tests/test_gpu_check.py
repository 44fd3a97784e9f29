"""``bench/gpu_check.sh --rehearse`` runs every stage of the GPU check on the CPU at tiny shapes, so the
script a GPU session runs first cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("CT_FAST_SKIP_REHEARSAL") == "1", reason="CT_FAST_SKIP_REHEARSAL=1")
def test_gpu_check_rehearsal(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--rehearse"], cwd=ROOT,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.tar.gz"]  # the device returns 8 files at most
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        archived = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    stages = {s["stage"]: s for s in summary["stages"]}
    assert summary["rehearse"] and set(stages) >= {"build", "tests", "op_masked_adamw", "op_score_edges",
                                                    "op_masked_dw", "step", "scale", "dropin", "distributed",
                                                    "tune_torchrun", "big_step", "tiles"}
    bad = {k: s for k, s in stages.items() if s["status"] not in ("ok", "skipped")}
    assert not bad, f"stages failed: {bad}\n{proc.stdout[-3000:]}"
    assert stages["build"]["status"] == "skipped"  # the only stage a rehearsal skips
    for name, s in stages.items():
        if name != "build":
            assert f"{name}.log" in archived
        if name not in ("build", "tests"):
            data = json.loads(archived[f"{name}.json"])
            assert data["env"]["commit"] is not None or data["env"]["torch"]
    assert "gpu_choices_run.json" not in archived  # the later stages' table is no stage result (none on a CPU)
    assert proc.returncode == 0 and "| stage | status |" in proc.stdout and "| target | limit |" in proc.stdout
    rows = summary["targets"]
    assert rows and all(r["status"] in ("CPU reading (not a target)", "no data") for r in rows)  # never "met" on CPU
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import report
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="not measured on a GPU"):  # a rehearsal's CPU numbers are never filed
        report.import_run(str(tmp_path / "gpu_check.tar.gz"))


def test_gpu_check_reads_the_kernels_before_the_install_is_visible(tmp_path):
    """On the device the check starts from the tree before its build stage installs the package, and Python reads
    the editable install's finder at start-up only: the summary's targets and auto's choices (which read the
    kernels' tile versions) still come out, and the archive ``report.py --import`` takes holds stage results only."""
    script = f"""
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # a process started pre-install
sys.path[:0] = [{os.path.join(ROOT, "bench")!r}]
import gpu_check
assert importlib.util.find_spec("ct_fast.kernels") is None
rows, choices = gpu_check.publish({str(tmp_path)!r}, {str(tmp_path / "work")!r}, [], False)
print(json.dumps([rows, choices]))
"""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "tiles.json").write_text(json.dumps({"env": {}, "results": []}))
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, choices = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [r for r in rows if str(r["status"]).startswith("error")], rows
    assert choices["tiles"] == {} and "products" in choices


def test_gpu_check_reruns_named_stages(tmp_path):
    """``--only`` reruns some stages (a second call in the same GPU lease); an unknown name lists the stages."""
    cmd = ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--rehearse", "--only"]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    bad = subprocess.run(cmd + ["op_nothing"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "no stage named ['op_nothing']" in bad.stderr and "op_masked_dw" in bad.stderr
    proc = subprocess.run(cmd + ["build,op_masked_dw"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    stages = [s["stage"] for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]]
    assert proc.returncode == 0 and stages == ["build", "op_masked_dw"], proc.stdout[-2000:]


def test_gpu_stage_commands(monkeypatch, tmp_path):
    """The GPU run's commands (not rehearsed by the CPU): the build fails its stage when ``ct_fast._C`` comes out
    without CUDA kernels; the GPU tests spread over pytest-xdist workers where xdist is, one process when asked, and
    leave out the CPU emulation of the CUDA kernels."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    stages = {s["name"]: s for s in gpu_check.stages(False, str(tmp_path))}
    build = stages["build"]["cmd"]
    assert build[:2] == ["bash", "-c"] and "pip install --no-deps --no-build-isolation -e" in build[2]
    assert "|| (" in build[2] and "CT_FAST_NO_CUDA=1" in build[2]  # a failed CUDA build falls back to the CPU kernels
    assert build[2].endswith(gpu_check.shlex.quote(gpu_check.BUILT_WITH_CUDA))
    has_xdist = importlib.util.find_spec("xdist") is not None
    assert ("-n" in stages["tests"]["cmd"]) == has_xdist
    tests = stages["tests"]["cmd"]
    # the CPU emulation of the CUDA kernels (a g++ build on a fresh machine) is not run on GPU time: what the stage's
    # selection collects holds none of its tests
    paths = [a for a in tests if a.endswith(".py") and os.sep + "tests" + os.sep in a]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *paths, "-k", tests[tests.index("-k") + 1]], cwd=ROOT, capture_output=True, text=True)
    nodes = [line for line in collected.stdout.splitlines() if "::" in line]
    assert nodes and not [n for n in nodes if "emu" in n.lower() or "emulated" in n.lower()]
    monkeypatch.setenv("CT_FAST_GPU_TEST_WORKERS", "0")
    stages = {s["name"]: s for s in gpu_check.stages(False, str(tmp_path))}
    assert "-n" not in stages["tests"]["cmd"] and gpu_check.xdist_args(True) == []


def test_targets_read_off_a_gpu_run(monkeypatch, tmp_path):
    """Each GPU target from one run's records: the best backend against the limit, met or missed."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import targets

    def write(name, *recs):
        (tmp_path / f"{name}.json").write_text(json.dumps({"env": {}, "results": list(recs)}))

    adamw = dict(bench="masked_adamw", device="cuda", dtype="torch.float32", params=1e9, fraction=0.05)
    write("op_masked_adamw", {**adamw, "backend": "torch", "fraction_of_copy_bw": 0.3, "ratio_to_dense": 0.5},
          {**adamw, "backend": "cuda", "fraction_of_copy_bw": 0.85, "ratio_to_dense": 0.08},
          {**adamw, "backend": "triton", "skipped": "not built"})
    op = dict(bench="score_edges_op", device="cuda", dtype="torch.bfloat16", n_u=32, w=64, n_d=49, c=2048, d=2048)
    layer = {**op, "bench": "score_edges_layer"}
    write("op_score_edges", {**op, "backend": "torch", "time_vs_torch": 1.0},
          {**op, "backend": "triton", "time_vs_torch": 0.9, "max_rel_err": 1e-3},  # faster on one block,
          {**layer, "backend": "triton", "time_vs_torch": 1.3, "max_rel_err": 1e-3},  # slower on the scorer's call
          {**op, "backend": "cuda", "time_vs_torch": 0.5, "max_rel_err": 0.5},  # fast, outside the bf16 band
          {**op, "backend": "cuda", "time_vs_torch": 2.0, "max_rel_err": 1e-3, "c": 4096},
          dict(bench="score_edges", device="cuda", layers=12, heads=16, d_model=512, tokens=512, memory_ratio=6.0,
               overhead_ratio=16.0))
    split = dict(forward=36.25, attribution=145.0, selection=6.75, backward=61.0, optimizer=4.5, total=253.5)
    host = dict(forward=35.0, attribution=60.0, selection=6.5, backward=20.0, optimizer=4.0, total=130.0)
    write("step", *[dict(bench="step", device="cuda", model="llama-1B", dtype="bfloat16", batch=8, seq=64,
                         method=m, mean_ms=t, **extra) for m, t, extra in (
                             ("full", 100.0, {}), ("circuit_refresh1", 140.0, dict(split_ms=split, split_host_ms=host,
                                                               tuned_param_fractions=[0.05, 0.071])),
                             ("circuit_refresh10", 95.0, dict(steps=10)),
                             ("circuit_refresh10", 80.0, dict(steps=3)))])  # (not amortised over a refresh: ignored)
    write("step_span4", dict(bench="step", device="cuda", model="llama-1B", dtype="bfloat16", batch=8, seq=64,
                             method="circuit_refresh1", mean_ms=130.0, score_span=4, split_ms=split,
                             split_host_ms=host))
    write("step_chunk4x", dict(bench="step", device="cuda", model="llama-1B", dtype="bfloat16", batch=8, seq=64,
                               method="circuit_refresh1", mean_ms=120.0, score_span=2, split_ms=split))
    rows = {r["target"]: r for r in targets.evaluate(str(tmp_path))}
    got = {k: (r["status"], r["value"]) for k, r in rows.items()}
    assert got["masked AdamW, 5% circuit: share of copy bandwidth"] == ("met", 0.85)
    assert got["masked AdamW, 5% circuit: time / fused dense AdamW"] == ("met", 0.08)
    slower = "score_edges kernel, bfloat16: time / torch path (its slower of one block and a layer)"
    assert got[slower] == ("missed", 1.3)  # triton's layer case; cuda's 0.5 is outside the band, its 2.0 slower
    assert got["attribution: materialising EAP's memory / ours (above the activation backward both run)"] == \
        ("met", 16.0)
    assert got["masked dW: time / dense dW"] == ("no data", None)
    assert got["llama-1B bfloat16 step: faithful (refresh 1) / full fine-tuning"] == ("met", 1.4)
    assert got["llama-1B bfloat16 step: refresh 10 / full fine-tuning"] == ("missed", 0.95)
    assert f"| {slower} | <= 1 | 1.3 | triton, layer," in targets.table(list(rows.values()))
    assert rows["llama-1B bfloat16 step: faithful (refresh 1) / full fine-tuning"]["where"] == \
        "batch 8 x 64, circuit 5.0-7.1% of params"  # (the circuit size the ratio was read at)
    # the phase split: device / host ms per phase of the methods that have one
    assert targets.phase_table(str(tmp_path)).splitlines() == [
        "| step (device / host ms) | forward | attribution | selection | backward | optimizer | total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| llama-1B circuit_refresh1 | 36.2 / 35.0 | 145.0 / 60.0 | 6.8 / 6.5 | 61.0 / 20.0 | 4.5 / 4.0 | 253.5 / 130.0 |",
        "| llama-1B circuit_refresh1 (span 4) | 36.2 / 35.0 | 145.0 / 60.0 | 6.8 / 6.5 | 61.0 / 20.0 | 4.5 / 4.0 "
        "| 253.5 / 130.0 |",  # (the span-4 and longer-chunk stages' rows: not targets, beside the step stage's)
        "| llama-1B circuit_refresh1 (4x scoring chunks) | 36.2 | 145.0 | 6.8 | 61.0 | 4.5 | 253.5 |"]
    assert targets.phase_table(str(tmp_path / "none")) == ""


def test_gpu_stage_arguments_parse(monkeypatch, tmp_path):
    """Every GPU-only benchmark command line (never run by the rehearsal) is accepted by its script's parser: a
    misspelt option would otherwise cost a stage of the first GPU run."""
    import argparse
    import runpy

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    real_parse = argparse.ArgumentParser.parse_args
    parsed = {}

    def parse_then_stop(self, args=None, namespace=None):
        parsed["args"], parsed["prog"] = real_parse(self, args, namespace), self.prog  # exits 2 on a bad option
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    checked = []
    for st in gpu_check.stages(False, str(tmp_path)):
        cmd = st["cmd"]
        if cmd[0] != gpu_check.PY or cmd[1:3] == ["-m", "pytest"]:
            continue  # the build (pip) and the tests (pytest)
        parsed.clear()
        monkeypatch.setattr(sys, "argv", [cmd[1]] + cmd[2:] if cmd[1] != "-m" else [cmd[2]] + cmd[3:])
        with pytest.raises(SystemExit) as stop:
            if cmd[1] == "-m":
                runpy.run_module(cmd[2], run_name="__main__")
            else:
                runpy.run_path(cmd[1], run_name="__main__")
        assert stop.value.code == 0 and "args" in parsed, f"{st['name']}: {cmd}"
        assert parsed["prog"] == ("ct-fast bench" if st["name"].startswith("step") else os.path.basename(cmd[1]))
        checked.append(st["name"])
    assert len(checked) == 13, checked


def test_report_files_a_gpu_run(monkeypatch, tmp_path):
    """``report.py --import`` files each stage's JSON of a GPU run's archive as ``bench/results/gpu_<stage>.json``."""
    import io

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import report

    data = json.dumps({"env": {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}, "results": []}).encode()
    with tarfile.open(tmp_path / "gpu_check.tar.gz", "w:gz") as tar:
        for name, blob in (("op_masked_dw.json", data), ("op_masked_dw.log", b"log")):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    assert report.import_run(str(tmp_path / "gpu_check.tar.gz")) == [os.path.join("bench", "results",
                                                                                  "gpu_op_masked_dw.json")]
    assert json.loads((tmp_path / "bench" / "results" / "gpu_op_masked_dw.json").read_text())["env"]["commit"] == "abc1234"


def test_stages_past_the_budget_are_named_for_a_second_call(monkeypatch, tmp_path, capsys):
    """Stages the budget left out are skipped, and the last screen gives the ``--only`` command that runs them."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "BUDGET_S", 0)
    summary = gpu_check.run(False, str(tmp_path), only={"build", "op_masked_dw", "step"})
    assert [(r["stage"], r["status"]) for r in summary] == [(s, "skipped") for s in ("build", "op_masked_dw", "step")]
    assert "not finished in this run: bash bench/gpu_check.sh --only build,op_masked_dw,step" in capsys.readouterr().out


def test_later_stages_run_on_the_checks_own_choices(monkeypatch, tmp_path):
    """Once the GPU check's tests passed, its op timings choose ``auto``'s kernels for the stages after them (a
    kernel rewritten since the committed timings is timed in the step benchmarks of the same run)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    choices = {"residual_grads": {"torch.bfloat16": ["triton", "torch"]}, "tiles": {"residual_grads": {}},
               "products": {"torch.bfloat16": {"split": 8}}}
    assert gpu_check.apply_choices(str(tmp_path), [{"stage": "tests", "status": "failed (exit 1)"}], choices) is None
    assert gpu_check.apply_choices(str(tmp_path), [{"stage": "op_masked_dw", "status": "ok"}], choices) is None
    path = gpu_check.apply_choices(str(tmp_path), [{"stage": "tests", "status": "ok"}], choices)
    table = json.loads(open(path).read())
    assert table["choices"] == {"residual_grads": {"torch.bfloat16": ["triton", "torch"]}}  # tiles: not from op stages
    assert table["products"] == {"torch.bfloat16": {"split": 8}}  # (from op_score_edges: the step stage splits so)
    # on the GPU: the table names the GPU's architecture, and a stage reading it (CT_FAST_GPU_CHOICES) follows it there
    # and on no other architecture
    import torch

    from ct_fast.ops import measured

    arch = {"gpu": "sm_90"}
    monkeypatch.setattr(measured, "device_architecture", lambda device: arch["gpu"])
    path = gpu_check.apply_choices(str(tmp_path), [{"stage": "tests", "status": "ok"}], choices)
    assert json.loads(open(path).read())["architectures"] == ["sm_90"]
    monkeypatch.setenv("CT_FAST_GPU_CHOICES", path)
    monkeypatch.delenv("CT_FAST_PRODUCT_SPLIT", raising=False)
    for cache in ("_table", "_product_table", "_tile_table"):
        monkeypatch.setattr(measured, cache, None)
    monkeypatch.setattr(measured, "_architectures", measured._UNREAD)
    gpu = torch.device("cuda")
    assert measured.product_split(torch.bfloat16, gpu) == 8 and measured.product_split(torch.float32, gpu) == 1
    assert measured.gpu_order("residual_grads", [torch.bfloat16], gpu) == ["triton", "torch"]
    arch["gpu"] = "sm_80"
    assert measured.product_split(torch.bfloat16, gpu) == 1 and measured.gpu_order("residual_grads", [torch.bfloat16],
                                                                                 gpu) is None
    seen = tmp_path / "env.txt"
    st = {"name": "probe", "cmd": [sys.executable, "-c", f"import os; open({str(seen)!r}, 'w').write("
                                                          "os.environ.get('CT_FAST_GPU_CHOICES', ''))"]}
    assert gpu_check.run_stage(st, 60, str(tmp_path / "probe.log"), {"CT_FAST_GPU_CHOICES": path})["status"] == "ok"
    assert seen.read_text() == path


def test_a_stage_past_its_limit_is_stopped_with_the_workers_it_started(monkeypatch, tmp_path):
    """A timed-out stage gets SIGTERM first (torchrun stops its workers, which run in sessions of their own, on it),
    then SIGKILL: here a launcher that, like torchrun, starts a worker in its own session and stops it on SIGTERM."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import gpu_check

    pid_file = tmp_path / "worker.pid"
    launcher = f"""
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pid_file)!r}, "w").write(str(worker.pid))
signal.signal(signal.SIGTERM, lambda *a: (worker.kill(), worker.wait(), sys.exit(1)))
time.sleep(120)
"""
    st = {"name": "launcher", "cmd": [sys.executable, "-c", launcher]}
    t0 = time.perf_counter()
    rec = gpu_check.run_stage(st, 3, str(tmp_path / "launcher.log"))
    assert rec["status"] == "timeout (3 s)" and time.perf_counter() - t0 < 30
    worker = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage's worker outlived it")


def test_device_versions_script_parses_and_refuses_unknown_arguments():
    """``bench/device_versions.sh`` (the suite under the GPU machine's versions: a 5 GB environment, not run here) is
    valid bash, and a mistyped option stops it before it installs anything."""
    script = os.path.join(ROOT, "bench", "device_versions.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    done = subprocess.run(["bash", script, "--venv-dir", "/nonexistent"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --venv-dir" in done.stderr
    assert not os.path.exists("/nonexistent")
