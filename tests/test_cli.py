"""End-to-end command line: tune (circuit/full/lora, three data formats), resume, discover, plot, demo,
and user errors reported without a traceback. Tiny models saved to a temp dir; no download."""

import json
import os
import random

import pytest
import torch

from ct_fast.app.cli import main
from ct_fast.app.tasks import AgreementWorld, word_tokenizer
from ct_fast.testing import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen2 (GQA, q/k/v biases) with a word-level tokenizer, saved like a real checkpoint."""
    world = AgreementWorld()
    tok = word_tokenizer(world.vocabulary())
    model = tiny_model("qwen2", vocab_size=len(tok))
    path = tmp_path_factory.mktemp("model") / "tiny-qwen2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    world, rng = AgreementWorld(), random.Random(0)
    text = [{"text": world.sentence(rng)} for _ in range(24)]
    comp, pairs = [], []
    for _ in range(24):
        ex = world.task_example(rng)
        comp.append({"prompt": ex.prompt, "completion": ex.disagree})
        pairs.append({"prompt": ex.prompt, "answer": ex.disagree, "wrong_answer": ex.agree})
    return {"text": _write(d / "text.jsonl", text), "completion": _write(d / "comp.jsonl", comp),
            "contrastive": _write(d / "pairs.jsonl", pairs)}


def _tune(model_dir, data, out, *extra):
    return main(["tune", "--model", model_dir, "--data", data, "--out", str(out), "--steps", "4", "--batch-size", "4",
                 "--top-n", "12", "--lr", "1e-2", "--no-progress", "--circuit-every", "2", "--save-every", "2", *extra])


@pytest.mark.parametrize("fmt,extra", [("text", []),
                                       ("completion", ["--mlp-head-dim", "8", "--memory-mode", "two_pass",
                                                       "--state-capacity", "1.0"]),
                                       ("contrastive", ["--metric", "logit_diff", "--selection", "nodes"])])
def test_tune_writes_a_complete_run(model_dir, datasets, tmp_path, fmt, extra):
    out = tmp_path / "run"
    assert _tune(model_dir, datasets[fmt], out, *extra) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    for key in ("loss", "metric", "circuit_edges", "circuit_nodes", "tuned_params", "top_n", "lr", "step_time",
                "memory_mode", "state_rows", "state_pool_rows"):
        assert key in log[0], key
    assert all(r["state_rows"] <= r["state_pool_rows"] for r in log)
    config = json.load(open(out / "config.json"))
    if "--memory-mode" in extra:
        assert {r["memory_mode"] for r in log} == {"two_pass"} and config["state_capacity"] == 1.0
    assert config["top_n"] == 12 and config["model"] == model_dir
    assert sorted(os.listdir(out / "circuits")) == ["step-000000.json", "step-000002.json", "step-000003.json"]
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert (out / "dynamics.png").exists() and (out / "circuit_end.png").exists()
    import transformers
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [n for (n, p), q in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and not any("embed" in n or "norm" in n for n in changed)


def test_resume_continues_exactly(model_dir, datasets, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _tune(model_dir, datasets["completion"], whole) == 0
    assert _tune(model_dir, datasets["completion"], part, "--steps", "2") == 0  # "interrupted" after step 2
    cfg = json.load(open(part / "config.json"))
    cfg["steps"] = 4
    open(part / "config.json", "w").write(json.dumps(cfg))
    with open(part / "log.jsonl", "a") as f:  # a record written after the checkpoint, before the crash
        f.write(json.dumps({"step": 2, "loss": -1.0}) + "\n")
    assert main(["tune", "--resume", str(part), "--no-progress"]) == 0
    a = [json.loads(line) for line in open(whole / "log.jsonl")]
    b = [json.loads(line) for line in open(part / "log.jsonl")]
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    import transformers
    ma = transformers.AutoModelForCausalLM.from_pretrained(whole / "model")
    mb = transformers.AutoModelForCausalLM.from_pretrained(part / "model")
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(p, q)


def test_full_and_lora_methods(model_dir, datasets, tmp_path):
    assert _tune(model_dir, datasets["text"], tmp_path / "full", "--method", "full") == 0
    pytest.importorskip("peft")
    assert _tune(model_dir, datasets["text"], tmp_path / "lora", "--method", "lora", "--lora-r", "2") == 0
    log = [json.loads(line) for line in open(tmp_path / "lora" / "log.jsonl")]
    assert 0 < log[0]["tuned_fraction"] < 1


def test_discover_and_plot(model_dir, datasets, tmp_path, capsys):
    out = tmp_path / "disc"
    assert main(["discover", "--model", model_dir, "--data", datasets["contrastive"], "--out", str(out),
                 "--metric", "logprob_diff", "--top-n", "15", "--batch-size", "5", "--no-progress"]) == 0
    circuit = json.load(open(out / "circuit.json"))
    assert len(circuit["edges"]) == 15 and circuit["graph"]["arch"] == "qwen2"
    assert (out / "circuit.png").exists() and (out / "scores.pt").exists()
    os.remove(out / "circuit.png")
    assert main(["plot", str(out)]) == 0
    assert (out / "circuit.png").exists()


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--methods", "circuit,full"]) == 0
    summary = json.load(open(out / "summary.json"))
    for m in ("circuit", "full"):
        r = summary["methods"][m]
        for key in ("target_accuracy_before", "target_accuracy_after", "general_loss_before", "general_loss_after",
                    "tuned_param_fraction", "seconds"):
            assert isinstance(r[key], float), key
    assert summary["methods"]["circuit"]["tuned_param_fraction"] < summary["methods"]["full"]["tuned_param_fraction"]
    assert (out / "comparison.png").exists() and (out / "dynamics.png").exists()
    # the cached base model is reused by a second run
    mtime = os.path.getmtime(out / "base" / "config.json")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--methods", "circuit"]) == 0
    assert os.path.getmtime(out / "base" / "config.json") == mtime


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_user_errors(model_dir, datasets, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"text": "the dog runs ."}, {"prompt": "the dog"}])
    assert "bad.jsonl:2: missing fields" in _err(capsys, ["tune", "--model", model_dir, "--data", bad,
                                                          "--out", str(tmp_path / "r1"), "--no-progress"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n')
    assert "broken.jsonl:2: not valid JSON" in _err(capsys, ["tune", "--model", model_dir, "--data", str(broken),
                                                             "--no-progress"])
    assert "does not exist" in _err(capsys, ["tune", "--model", str(tmp_path / "nope"), "--data", datasets["text"]])
    assert "top_n=100000" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"], "--top-n", "100000",
                                           "--out", str(tmp_path / "r2"), "--no-progress"])
    assert "needs contrastive data" in _err(capsys, ["discover", "--model", model_dir, "--data", datasets["text"],
                                                     "--metric", "logit_diff", "--out", str(tmp_path / "d")])
    assert "--resume" in _err(capsys, ["tune", "--resume", str(tmp_path / "never")])
    assert "does not exist" in _err(capsys, ["plot", str(tmp_path / "never")])
    assert "save_every must be >= 1" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"],
                                                      "--save-every", "0", "--out", str(tmp_path / "r3")])
    assert "tune_steps must be >= 1" in _err(capsys, ["demo", "--quick", "--tune-steps", "0", "--out",
                                                      str(tmp_path / "d0"), "--no-progress"])
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"],
                                                        "--device", "cuda", "--out", str(tmp_path / "r4")])
