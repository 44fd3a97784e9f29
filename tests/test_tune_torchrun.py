"""``ct-fast tune`` under ``torchrun --nproc-per-node 2`` (gloo on CPU, a tiny Qwen2 saved to disk): DDP and
FSDP2 runs equal one process on the same global batches, only rank 0 writes the run directory, and a run resumed
after its processes end equals an uninterrupted one bit for bit (FSDP2: the model through
torch.distributed.checkpoint, an optimizer file per rank). Launch errors name their fix."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from ct_fast.app.cli import main
from ct_fast.app.tasks import AgreementWorld, word_tokenizer
from ct_fast.testing import tiny_model

ARGS = ["--batch-size", "4", "--top-n", "12", "--lr", "1e-2", "--no-progress", "--save-every", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a completion dataset (one label token per example: every rank holds as many label
    tokens, so the mean of the ranks' losses is the global batch's)."""
    root = tmp_path_factory.mktemp("torchrun")
    world = AgreementWorld()
    tok = word_tokenizer(world.vocabulary())
    model = tiny_model("qwen2", vocab_size=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(24):
            ex = world.task_example(rng)
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.disagree}) + "\n")
    return root


def _torchrun(*argv, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "ct_fast", *argv], capture_output=True, text=True, timeout=600, env=env)
    return proc


def _tune(setup, out, *extra, nproc=2):
    proc = _torchrun("tune", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--out", str(out),
                     *ARGS, *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _log(run):
    return [json.loads(line) for line in open(run / "log.jsonl")]


def _weights(run):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(run / "model").state_dict()


def _interrupt(run, steps):
    """Turn a finished short run into one killed after its last checkpoint, with ``steps`` to go."""
    conf = json.loads((run / "config.json").read_text())
    conf["steps"] = steps
    (run / "config.json").write_text(json.dumps(conf))
    os.remove(run / "summary.json")
    with open(run / "log.jsonl", "a") as f:  # a record written after the checkpoint, before the kill
        f.write(json.dumps({"step": 2, "loss": -1.0}) + "\n")


@pytest.fixture(scope="module")
def single(setup):
    out = setup / "single"
    assert main(["tune", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--out", str(out),
                 "--steps", "4", *ARGS]) == 0
    return out


def _same_as_single(run, single):
    one, two = _log(single), _log(run)
    assert [r["step"] for r in two] == [0, 1, 2, 3]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["circuit_edges"] for r in two] == [r["circuit_edges"] for r in one]
    assert all(r["comm_bytes"] > 0 for r in two) and "comm_bytes" not in one[0]
    want = _weights(single)
    for k, v in _weights(run).items():  # Adam's first steps amplify rounding: fp32-level agreement
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5)
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert not [n for n in os.listdir(run) if ".tmp" in n]


def test_ddp_equals_one_process_and_extends(setup, single):
    """Two DDP ranks for 2 steps, then ``--resume --steps 4`` (new processes): the 4 steps of one process."""
    run = setup / "ddp"
    proc = _tune(setup, run, "--steps", "2")
    assert proc.stdout.count("tuned model:") == 1  # rank 0 alone prints and writes
    assert sorted(os.listdir(run / "checkpoints" / "step-000002")) == ["state.pt"]  # replicated: rank 0 writes it
    proc = _torchrun("tune", "--resume", str(run), "--steps", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same_as_single(run, single)
    os.remove(run / "summary.json")  # killed while rank 0 wrote the model: every step done, no summary — the other
    proc = _torchrun("tune", "--resume", str(run), "--no-progress")  # ranks ran no step (their log was empty)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.load(open(run / "summary.json"))["steps"] == 4 and proc.stdout.count("tuned model:") == 1
    with pytest.warns(UserWarning, match="written by 2 process"):  # replicated state resumes on one process too
        assert main(["tune", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    assert [r["step"] for r in _log(run)] == [0, 1, 2, 3, 4]


def test_fsdp_equals_one_process_and_resumes_exactly(setup, single):
    """FSDP2 ranks (sharded parameters and optimizer state) equal one process; killed after step 2 and resumed in
    new processes, the run equals the uninterrupted one bit for bit."""
    whole, part = setup / "fsdp-whole", setup / "fsdp-part"
    _tune(setup, whole, "--steps", "4", "--parallel", "fsdp")
    _same_as_single(whole, single)
    assert sorted(os.listdir(whole / "checkpoints")) == ["latest", "step-000002", "step-000004"]
    assert sorted(os.listdir(whole / "checkpoints" / "step-000004")) == [
        "model", "optimizer-rank-0.pt", "optimizer-rank-1.pt", "state.pt"]  # model: torch.distributed.checkpoint

    _tune(setup, part, "--steps", "2", "--parallel", "fsdp")
    _interrupt(part, steps=4)
    proc = _torchrun("tune", "--resume", str(part), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["loss"] for r in _log(part)] == [r["loss"] for r in _log(whole)]  # bit-exact
    want = _weights(whole)
    for k, v in _weights(part).items():
        assert torch.equal(v, want[k]), k
    # a sharded checkpoint needs the launch that wrote it
    assert main(["tune", "--resume", str(part), "--steps", "6", "--no-progress"]) == 2


def test_a_global_batch_must_split_evenly():
    from ct_fast.app.launch import Launch
    from ct_fast.errors import CTFastError

    launch = Launch(world=2, rank=1, parallel="ddp")
    assert launch.split(list(range(6))) == [3, 4, 5]
    with pytest.raises(CTFastError, match="does not split over 2 processes; choose a multiple of 2"):
        launch.split(list(range(3)))
