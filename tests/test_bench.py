"""`ct-fast bench` runs end to end on a tiny model, and README's results table is generated from the
committed results (not typed by hand)."""

import json
import pathlib
import sys

import pytest
import torch

from ct_fast.app.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "--models", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"gpu", "cuda", "torch", "triton", "transformers", "commit"} <= set(data["env"])
    methods = {r["method"] for r in data["results"]}
    assert {"full", "reference", "circuit_refresh1", "circuit_dropin", "circuit_refresh10"} <= methods
    for r in data["results"]:
        for key in ("model", "method", "dtype", "batch", "seq", "median_ms", "tokens_per_s", "peak_mem_gib"):
            assert key in r, key
        if r["method"].startswith("circuit") and r["method"] != "circuit_dropin":  # the drop-in: a plain loop
            assert set(r["split_ms"]) >= {"forward", "attribution", "selection", "backward", "optimizer"}
            assert 0 <= r["attribution_fraction"] < 1
    assert "| tiny | circuit_refresh1 |" in capsys.readouterr().out


def test_bench_goes_on_after_a_method_runs_out_of_memory(monkeypatch):
    """One method too big for the device is recorded as skipped; the methods after it are still timed."""
    import torch

    import ct_fast.app.step_bench as sb

    real = sb._Method.step

    def step(self, batch):
        if self.method == "reference":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(sb._Method, "step", step)
    records = sb.run("tiny", ("full", "reference", "circuit_refresh10"), steps=1, progress=lambda _: None)
    assert [r["method"] for r in records] == ["full", "reference", "circuit_refresh10"]
    assert records[1]["skipped"] == "out of memory" and "mean_ms" in records[2]
    assert "| tiny | reference | cpu | out of memory |" in sb.table(records)


def test_bench_caps_the_timed_steps_of_a_slow_method(monkeypatch):
    """``max_seconds``: a method whose timed steps took that long times no more of them (at least one); the record
    says how many it timed. Fast methods time all their steps."""
    import ct_fast.app.step_bench as sb

    real, clock = sb._Method.step, {"t": 0.0}

    def step(self, batch):  # a fake clock: the reference's steps take 30 s, the others 1 ms
        clock["t"] += 30.0 if self.method == "reference" else 1e-3
        return real(self, batch)

    monkeypatch.setattr(sb._Method, "step", step)
    monkeypatch.setattr(sb.time, "perf_counter", lambda: clock["t"])
    records = sb.run("tiny", ("full", "reference"), steps=3, progress=lambda _: None, max_seconds=20)
    assert [r["steps"] for r in records] == [3, 1]
    assert records[1]["median_ms"] == pytest.approx(30e3)


def test_readme_table_is_generated_from_results():
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    text = (ROOT / "README.md").read_text()
    assert report.update(text) == text, "README's bench table is stale: run `python bench/report.py`"


def test_results_name_the_commit_given_by_ct_fast_commit(monkeypatch):
    """A copy of the tree without .git (a GPU machine) is told its commit; otherwise git says it."""
    from ct_fast.app import harness

    monkeypatch.setenv("CT_FAST_COMMIT", "0123abc")
    assert harness.env()["commit"] == "0123abc"
    monkeypatch.delenv("CT_FAST_COMMIT")
    assert harness.env()["commit"] != "0123abc"


def test_count_launches_runs(tmp_path):
    """``bench/count_launches.py`` (it patches the scorer: run in its own process) counts a tiny attribution."""
    import subprocess

    out = tmp_path / "launches.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "count_launches.py"), "--batch", "1", "--seq", "16",
                           "--d-model", "64", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())["results"][0]
    assert rec["ops"] > 100 and rec["top"] and "host syncs per attribution" in proc.stdout
    steps, stdout = {}, {}
    for step in ("lagged", "reused"):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "count_launches.py"), "--batch", "1", "--seq",
                               "16", "--d-model", "64", "--step", step, "--out", str(out)]
                              + (["--flops"] if step == "lagged" else []), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"host syncs per step ({step})" in proc.stdout
        steps[step], stdout[step] = json.loads(out.read_text())["results"][0], proc.stdout
    assert "a full fine-tuning step's" in stdout["lagged"]
    # a step between refreshes scores nothing: fewer launches than a faithful step, none issued by the scorer
    assert steps["reused"]["what"] == "step (reused)" and steps["reused"]["ops"] < steps["lagged"]["ops"]
    assert any(r["where"].startswith("attribution.py") for r in steps["lagged"]["top"])
    assert not any(r["where"].startswith("attribution.py") for r in steps["reused"]["top"])


def test_scoring_flops_count_every_edge_once():
    """The FLOP model of scoring: its products are ``2 T d`` per graph edge (every edge scored once, no pair
    that is not an edge), and scoring stays a fraction of a full fine-tuning step's FLOPs."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import count_launches
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from ct_fast.graph import ComputationGraph
    from ct_fast.memory import meta_model
    from ct_fast.models import shape_config

    f = count_launches.scoring_flops("llama-1B", 2, 64)
    graph = ComputationGraph.from_model(meta_model(shape_config("llama-1B"), torch.bfloat16))
    assert f["product_flops"] == 2 * 128 * graph.d_model * graph.n_edges
    assert 0 < f["residual_flops"] < f["contribution_flops"] and 0.1 < f["scoring_vs_full"] < 0.5


def test_host_step_times_each_method():
    """``bench/host_step.py`` (the host time of a step at negligible compute) runs each method (its numbers are a
    benchmark's, committed in bench/results/cpu_host_step.json, not asserted here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import host_step

    recs = {r["method"]: r["host_ms_per_step"] for r in host_step.run(("full", "reused", "two_pass"), steps=2,
                                                                       repeats=2)}
    assert set(recs) == {"full", "reused", "two_pass"} and all(v > 0 for v in recs.values())
