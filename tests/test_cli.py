"""End-to-end command line: tune (circuit/full/lora, three data formats), resume, discover, plot, demo,
and user errors reported without a traceback. Tiny models saved to a temp dir; no download."""

import copy
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
    assert main(["demo", "--world", "synthetic", "--quick", "--out", str(out), "--no-progress", "--methods", "circuit,full"]) == 0
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
    assert main(["demo", "--world", "synthetic", "--quick", "--out", str(out), "--no-progress", "--methods", "circuit"]) == 0
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
    assert "tune_steps must be >= 1" in _err(capsys, ["demo", "--world", "synthetic", "--quick", "--tune-steps", "0", "--out",
                                                      str(tmp_path / "d0"), "--no-progress"])
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"],
                                                        "--device", "cuda", "--out", str(tmp_path / "r4")])


# ---- the rough edges a new user hit (issue 11) ------------------------------------------------------------------

def _no_tmp(root):
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if ".tmp" in n]


def test_failed_starts_leave_no_run_directory(model_dir, datasets, tmp_path, capsys, monkeypatch):
    """Each user error: one line, exit 2, and no run directory (validated before loading where possible)."""
    import ct_fast.models

    notok = tmp_path / "no-tokenizer"
    tiny_model("llama", vocab_size=40).save_pretrained(notok)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "the dog runs ."}\n{"text": "caf\xe9 au lait"}\n')
    monkeypatch.setattr(ct_fast.models, "_hub_reachable", lambda timeout=3.0: False)
    capsys.readouterr()
    cases = [
        (["--top-n", "0"], "top_n must be >= 1"),
        (["--method", "full", "--lr", "-1"], "lr must be a positive number"),
        (["--method", "lora", "--lr", "-1"], "lr must be a positive number"),
        (["--top-n", "100000"], "top_n=100000 is larger than"),
        (["--top-n-end", "20"], "top_n_end needs a top_n_schedule"),
        (["--model", str(notok)], "has no tokenizer"),
        (["--data", str(latin1)], "latin1.jsonl:2: not UTF-8 text"),
        (["--model", "no-such-org/no-such-model"], "Hugging Face hub cannot be reached"),
        (["--model", str(latin1)], "is a file, not a model directory"),
        (["--data", str(tmp_path)], "is a directory, not a JSONL file"),
        (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (["--seed", "-1"], "--seed must be in 0 .. 2^32 - 1"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        argv = ["tune", "--model", model_dir, "--data", datasets["text"], "--out", str(out), "--steps", "2",
                "--no-progress", *extra]
        err = _err(capsys, argv)
        assert message in err and err.count("\n") == 1, (extra, err)
        assert not out.exists(), extra
    # an --out that holds a model folder (here the model being tuned) is refused, the model untouched
    project = tmp_path / "project"
    tiny_model("llama", vocab_size=40).save_pretrained(project / "model")
    weights = (project / "model" / "model.safetensors").read_bytes()
    assert "already holds 'model'" in _err(capsys, ["tune", "--model", str(project / "model"), "--data",
                                                    datasets["text"], "--out", str(project), "--no-progress"])
    assert (project / "model" / "model.safetensors").read_bytes() == weights
    # --out inside a file, or in a read-only directory, is refused before loading
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "not a writable directory" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"],
                                                       "--out", str(blocker / "run"), "--no-progress"])
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        assert "not a writable directory" in _err(capsys, ["tune", "--model", model_dir, "--data", datasets["text"],
                                                           "--out", str(readonly / "run"), "--no-progress"])


def test_bare_hub_name_fails_fast_offline(monkeypatch):
    import time

    import ct_fast.models
    from ct_fast import CTFastError, load_model

    monkeypatch.setattr(ct_fast.models, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(CTFastError, match="not a local directory and the Hugging Face hub cannot be reached"):
        load_model("gpt2-no-such-model")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(CTFastError, match="does not exist"):
        load_model("./no/such/dir")
    with pytest.raises(CTFastError, match="GGUF file"):
        load_model("missing.gguf")
    t0 = time.perf_counter()
    ct_fast.models.__dict__["_hub_reachable"]  # the real probe is bounded by its timeout
    monkeypatch.undo()
    ct_fast.models._hub_reachable(timeout=1.0)
    assert time.perf_counter() - t0 < 4


@pytest.mark.parametrize("fail_at", [1, 2])
def test_full_disk_leaves_no_temporary_files(model_dir, datasets, tmp_path, capsys, monkeypatch, fail_at):
    """A write that fails (full disk) ends with one line and exit 2; no .tmp-* checkpoint stays; a run that
    fails before its first checkpoint leaves no directory, a later one stays resumable."""
    import errno

    import ct_fast.app.run as run_mod

    real_save, calls = run_mod.torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(run_mod.torch, "save", save)
    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1 and "Traceback" not in err
    if fail_at == 1:
        assert not out.exists()
    else:
        assert not _no_tmp(out)
        assert open(out / "checkpoints" / "latest").read() == "step-000002"
        monkeypatch.undo()
        assert main(["tune", "--resume", str(out), "--no-progress"]) == 0
        assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2, 3]


def test_resume_from_any_directory_and_extend(model_dir, datasets, tmp_path, capsys, monkeypatch):
    """Paths are stored absolute; --resume --steps N extends a finished run and equals an N-step run; a
    finished run without --steps, or with other options, is refused clearly."""
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(datasets["completion"], work / "data.jsonl")
    shutil.copytree(model_dir, work / "model")
    monkeypatch.chdir(work)
    assert _tune("model", "data.jsonl", "run", "--steps", "2") == 0
    config = json.load(open(work / "run" / "config.json"))
    assert config["model"] == str(work / "model") and config["data"] == str(work / "data.jsonl")
    monkeypatch.chdir(elsewhere)
    assert "already finished its 2 steps" in _err(capsys, ["tune", "--resume", "../work/run"])
    assert "--lr cannot be changed" in _err(capsys, ["tune", "--resume", "../work/run", "--lr", "1"])
    assert "at least 2" in _err(capsys, ["tune", "--resume", "../work/run", "--steps", "1"])
    assert main(["tune", "--resume", "../work/run", "--steps", "4", "--no-progress"]) == 0
    assert _tune(model_dir, datasets["completion"], tmp_path / "whole") == 0
    a = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    b = [json.loads(line) for line in open(work / "run" / "log.jsonl")]
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert json.load(open(work / "run" / "config.json"))["steps"] == 4


def test_an_extension_cut_short_while_saving_its_model_resumes(model_dir, datasets, tmp_path, capsys, monkeypatch):
    """An extension interrupted after its last checkpoint, while saving its model: the summary there is the
    extended run's (2 steps), not this one's — resume writes the 4-step model (it was refused as finished,
    pointing at the 2-step model)."""
    from ct_fast.app import cli

    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out, "--steps", "2") == 0
    real = cli.save_model

    def cut(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "save_model", cut)
    assert main(["tune", "--resume", str(out), "--steps", "4", "--no-progress"]) != 0  # "interrupted; ..."
    assert open(out / "checkpoints" / "latest").read() == "step-000004"
    monkeypatch.setattr(cli, "save_model", real)
    assert main(["tune", "--resume", str(out), "--no-progress"]) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 4
    assert "already finished its 4 steps" in _err(capsys, ["tune", "--resume", str(out)])


def test_lagged_run_saves_the_circuits_its_steps_applied(model_dir, datasets, tmp_path):
    """circuits/step-N.json is the circuit step N updated, as its log record says (lagged: the previous step's
    selection — the tuner's newest circuit is the next step's)."""
    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out, "--memory-mode", "lagged", "--circuit-every", "1") == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    saved = [json.load(open(out / "circuits" / f"step-{r['step']:06d}.json")) for r in log]
    assert [(len(c["edges"]), len(c["nodes"]), c["num_params"]) for c in saved] == \
        [(r["circuit_edges"], r["circuit_nodes"], r["tuned_params"]) for r in log]
    assert len({c["num_params"] for c in saved}) > 1  # (the circuits differ: a file one step off would not match)


def test_a_torn_last_log_line_is_dropped_on_resume(model_dir, datasets, tmp_path):
    """A log line cut short (a full disk, a kill mid-write) does not block the resume: it is dropped, and the step
    it recorded is redone from the checkpoint."""
    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out, "--steps", "2") == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lr": 0.01, "loss": 4.5')
    assert main(["tune", "--resume", str(out), "--steps", "4", "--no-progress"]) == 0
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2, 3]


def test_examples_beyond_the_models_positions_are_refused(model_dir, tmp_path, capsys):
    """Texts longer than the positions the model takes (with a --max-length past them): a one-line error naming
    --max-length, not an index error in the forward."""
    limit = json.load(open(os.path.join(model_dir, "config.json")))["max_position_embeddings"]
    data = _write(tmp_path / "long.jsonl", [{"text": " ".join(["the dog runs ."] * limit)}] * 4)
    err = _err(capsys, ["tune", "--model", model_dir, "--data", data, "--out", str(tmp_path / "r"),
                        "--max-length", str(2 * limit), "--no-progress"])
    assert f"an example's length (--max-length)={2 * limit} is longer than the {limit} positions" in err


def test_parallel_fsdp_in_one_process_runs_unsharded(model_dir, datasets, tmp_path, capsys):
    """--parallel fsdp without torchrun: said, and the run is recorded as what it was (unsharded), so that it
    resumes as such."""
    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out, "--steps", "2", "--parallel", "fsdp") == 0
    assert "--parallel fsdp has no effect in a single process" in capsys.readouterr().err
    assert json.load(open(out / "config.json"))["parallel"] is None


def test_top_n_end_is_reached_at_the_last_step(model_dir, datasets, tmp_path):
    out = tmp_path / "run"
    assert _tune(model_dir, datasets["text"], out, "--top-n-end", "20", "--top-n-schedule", "linear") == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["top_n"] for r in log] == [12, 15, 17, 20]


def test_lora_is_reproducible_with_seed(model_dir, datasets, tmp_path):
    pytest.importorskip("peft")
    import transformers

    def run(name, seed):
        torch.manual_seed(len(name) * 7919)  # a different global RNG state before each run
        assert _tune(model_dir, datasets["text"], tmp_path / name, "--method", "lora", "--lora-r", "2",
                     "--seed", str(seed)) == 0
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")

    a, b, c = run("a", 3), run("bb", 3), run("ccc", 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_every_option_has_help_with_its_default():
    from ct_fast.app.cli import HelpFormatter, build_parser

    parser = build_parser()
    import argparse

    import ct_fast.app.step_bench as sb
    captured = {}
    real_parse = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["bench"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            sb.main([])
    finally:
        argparse.ArgumentParser.parse_args = real_parse
    subs = dict(parser.subcommands, bench=captured["bench"])
    assert set(subs) == {"demo", "tune", "discover", "plot", "profile", "plan", "bench"}
    for name, sub in subs.items():
        fmt = HelpFormatter(name)
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = fmt._get_help_string(action)
            assert action.help and "default" in text, (name, action.option_strings)


def test_no_progress_silences_transformers_bars(model_dir, datasets, tmp_path, capfd):
    from ct_fast import load_model

    load_model(model_dir)  # transformers draws its loading bar by default ...
    assert "Loading weights" in capfd.readouterr().err
    assert _tune(model_dir, datasets["text"], tmp_path / "run") == 0  # ... and not with --no-progress
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "%|" not in captured.err + captured.out
    load_model(model_dir, progress=False)
    assert "Loading weights" not in capfd.readouterr().err


def test_demo_and_discover_options_are_checked_before_loading(tmp_path, capsys, model_dir):
    out = tmp_path / "d"
    for argv, message in [
        (["demo", "--world", "synthetic", "--model", "smollm2"], "--model belong to --world smollm2"),
        (["demo", "--top-n", "0"], "top_n must be >= 1"),
        (["demo", "--tune-lr", "-1"], "must be > 0"),
        (["demo", "--sweep-top-n", "10,x"], "comma-separated integers"),
        (["demo", "--methods", "circuit,sgd"], "unknown ['sgd']"),
        (["demo", "--pretrain-steps", "5"], "belongs to --world synthetic"),
        (["discover", "--model", model_dir], "either --data FILE.jsonl or --task sv"),
        (["discover", "--model", model_dir, "--task", "sv", "--top-n", "0"], "--top-n must be >= 1"),
    ]:
        err = _err(capsys, argv + ["--out", str(out), "--no-progress"])
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not out.exists(), argv


def test_fused_loss_run_matches_the_plain_run(model_dir, datasets, tmp_path, capsys):
    """--fused-loss (no logits) gives the same circuits and, to rounding, the same losses; it refuses what
    needs logits."""
    assert _tune(model_dir, datasets["completion"], tmp_path / "plain", "--steps", "2") == 0
    assert _tune(model_dir, datasets["completion"], tmp_path / "fused", "--steps", "2", "--fused-loss") == 0
    a = [json.loads(line) for line in open(tmp_path / "plain" / "log.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "fused" / "log.jsonl")]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["circuit_edges"] for r in b] == [r["circuit_edges"] for r in a]
    assert json.load(open(tmp_path / "fused" / "config.json"))["fused_loss"] is True
    assert _tune(model_dir, datasets["contrastive"], tmp_path / "ld", "--fused-loss", "--metric", "logit_diff") == 2
    assert "--metric logit_diff" in capsys.readouterr().err


def test_sv_evaluation_reads_through_a_peft_wrapper():
    """The real-model demo evaluates its LoRA model too: through peft's wrapper (whose .base_model is not the
    decoder) the disagreement metrics equal the unwrapped model's (LoRA starts as the identity)."""
    peft = pytest.importorskip("peft")
    from ct_fast.app.data import Example
    from ct_fast.app.demo import evaluate_sv

    model = tiny_model("llama")
    probes = [Example([1, 2, 3, 4], [-100, -100, -100, 5], target_pos=2, answer=5, wrong_answer=6 + i)
              for i in range(3)]
    general = [Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])]
    want = evaluate_sv(model, probes, general, 0)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert evaluate_sv(wrapped, probes, general, 0) == pytest.approx(want)


def test_profile_and_bench_argument_errors(capsys):
    """Bad profile/bench arguments: a one-line error and exit status 2, not a traceback (or exit 1)."""
    cases = [(["profile", "--heads", "4", "--kv-heads", "3"], "--kv-heads 3 must divide --heads 4"),
             (["profile", "--steps", "0"], "--steps must be >= 1"),
             (["bench", "--models", "nope"], "--models: unknown ['nope']"),
             (["bench", "--methods", "bogus"], "--methods: unknown ['bogus']"),
             (["bench", "--steps", "0"], "--steps must be >= 1"),  # (one step was timed)
             (["bench", "--batch", "0"], "--batch must be >= 1")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
