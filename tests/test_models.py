"""Loading real checkpoints (save_pretrained to a temp dir, no download) and the command line."""

import json

import pytest
import torch

from ct_fast import CTFastError, UnsupportedArchitectureError, attribute, load_model
from ct_fast.app.cli import main
from ct_fast.testing import random_batch, tiny_model


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_load_model_from_local_dir(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / arch)
    loaded, graph = load_model(str(tmp_path / arch), dtype="bf16", mlp_head_dim=8)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert graph.arch == arch and graph.mlp_head_dim == 8
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), n
    s = attribute(loaded.float(), random_batch(37), graph=graph)
    assert s.scores.shape == graph.edge_mask.shape


def test_load_model_errors(tmp_path):
    with pytest.raises(CTFastError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    import transformers
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32, vocab_size=20))
    neox.save_pretrained(tmp_path / "neox")
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox"):
        load_model(str(tmp_path / "neox"))
    with pytest.raises(CTFastError, match="dtype"):
        load_model(str(tmp_path / "neox"), dtype="int3")


def test_cli_profile(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = main(["profile", "--layers", "2", "--d-model", "32", "--heads", "4", "--vocab", "50", "--batch", "2",
               "--seq", "8", "--top-n", "20", "--steps", "2", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["median_s"]) == {"forward", "attribution", "selection", "backward", "optimizer", "total"}
    assert "attribution" in capsys.readouterr().out


def test_cli_user_error_has_no_traceback(capsys):
    rc = main(["profile", "--layers", "1", "--d-model", "16", "--heads", "2", "--vocab", "20", "--batch", "1",
               "--seq", "4", "--top-n", "100000", "--steps", "1", "--warmup", "0"])
    assert rc == 2
    assert "out of range" in capsys.readouterr().err
