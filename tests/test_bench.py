"""`ct-fast bench` runs end to end on a tiny model, and README's results table is generated from the
committed results (not typed by hand)."""

import json
import pathlib
import sys

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
