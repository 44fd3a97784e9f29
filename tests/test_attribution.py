"""Exact EAP: ct_fast.attribute against the brute-force private-copy oracle (validated by finite
differences), for every architecture, ablation, positions and pooling; plus memory and error checks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ct_fast
from ct_fast import ComputationGraph, CTFastError, NonFiniteError, attribute
from ct_fast.testing import (assert_close, brute_force_scores, edge_directions, metric_with_copies, random_batch,
                             tiny_model)


def _corrupted(batch, seed=7):
    g = torch.Generator().manual_seed(seed)
    c = dict(batch)
    c["input_ids"] = torch.randint(1, 37, batch["input_ids"].shape, generator=g)
    return c


def _positions(batch):
    pos = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    pos[:, 1] = True
    pos[0, 4] = True
    pos[2, -1] = True  # padding in row 2: dropped
    return pos


@pytest.mark.parametrize("ablation", ["mean", "zero", "corrupted"])
@pytest.mark.parametrize("mlp_head_dim", [None, 8])
def test_scores_match_private_copy_oracle(arch, model, batch, ablation, mlp_head_dim):
    g = ComputationGraph.from_model(model, mlp_head_dim=mlp_head_dim)
    corrupted = _corrupted(batch) if ablation == "corrupted" else None
    got = attribute(model, batch, ablation=ablation, graph=g, corrupted_batch=corrupted)
    want = brute_force_scores(model, batch, ablation=ablation, graph=g, corrupted_batch=corrupted)
    assert got.scores.dtype == torch.float32 and got.scores.shape == g.edge_mask.shape
    assert (got.scores[~g.edge_mask] == 0).all()
    assert (want > 0).sum() > 0.9 * g.n_edges  # the oracle sees (nearly) every edge
    assert_close(got.scores, want.float(), name=f"{arch} {ablation} scores")


@pytest.mark.parametrize("span", [1, 3, 5])
def test_scores_match_the_oracle_at_every_span(span, monkeypatch):
    """``CT_FAST_SCORE_SPAN`` (``attribution.SCORE_SPAN``, default 2): 1 layer, 3 (a partial first span) or more than
    the model has, the scores are the oracle's."""
    monkeypatch.setattr(ct_fast.attribution, "SCORE_SPAN", span)
    model = tiny_model("llama", num_hidden_layers=4)
    batch = random_batch(37, batch=3, seq=7)
    g = ComputationGraph.from_model(model, mlp_head_dim=8)
    assert_close(attribute(model, batch, graph=g).scores, brute_force_scores(model, batch, graph=g).float())


def test_scores_match_the_oracle_with_split_products(monkeypatch):
    """``CT_FAST_PRODUCT_SPLIT`` (on a GPU: ``measured.product_split``, from the GPU check's timings): the torch
    path's score products split over 4 token blocks — sub-chunks of 4 rows, each span's shorter last one a single
    GEMM — give the oracle's scores."""
    from ct_fast.ops import gemm

    monkeypatch.setenv("CT_FAST_PRODUCT_SPLIT", "4")
    model = tiny_model("llama", num_hidden_layers=3)
    batch = random_batch(37, batch=3, seq=7)
    g = ComputationGraph.from_model(model)
    monkeypatch.setattr(ct_fast.attribution, "CHUNK_ELEMENTS", 7 * g.d_model * (2 * g.n_heads + 4 * g.n_kv_heads + 2))
    monkeypatch.setattr(ct_fast.attribution, "MIN_CHUNK_ROWS", 1)
    calls, real = [], gemm.split_mm
    monkeypatch.setattr(gemm, "split_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    got = attribute(model, batch, graph=g).scores
    assert calls and all(shape[1] == 4 for shape in calls)
    assert_close(got, brute_force_scores(model, batch, graph=g).float())


def test_score_span_setting_is_checked(monkeypatch):
    monkeypatch.setenv("CT_FAST_SCORE_SPAN", "0")
    with pytest.raises(ct_fast.CTFastError, match="CT_FAST_SCORE_SPAN='0'"):
        ct_fast.attribution._score_span()
    monkeypatch.setenv("CT_FAST_SCORE_SPAN", "3")
    assert ct_fast.attribution._score_span() == 3
    # the GPU's scoring block (elements): at least 2^20, 2^28 unset
    for bad in ("0", "x", "-5", str((1 << 20) - 1)):
        monkeypatch.setenv("CT_FAST_SCORE_CHUNK_ELEMENTS", bad)
        with pytest.raises(ct_fast.CTFastError, match=f"CT_FAST_SCORE_CHUNK_ELEMENTS='{bad}'"):
            ct_fast.attribution._gpu_chunk_elements()
    monkeypatch.setenv("CT_FAST_SCORE_CHUNK_ELEMENTS", str(1 << 30))
    assert ct_fast.attribution._gpu_chunk_elements() == 1 << 30
    monkeypatch.delenv("CT_FAST_SCORE_CHUNK_ELEMENTS")
    assert ct_fast.attribution._gpu_chunk_elements() == ct_fast.attribution.GPU_CHUNK_ELEMENTS == 1 << 28


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("metric", ["loss", "logit_diff", "logprob_diff"])
def test_positions_pool_and_metrics(arch, model, batch, pool, metric):
    batch = dict(batch, target_pos=torch.tensor([4, 2, 3]), answer=torch.tensor([3, 5, 7]),
                 wrong_answer=torch.tensor([11, 2, 30]))
    pos = _positions(batch)
    got = attribute(model, batch, metric=metric, positions=pos, pool=pool)
    want = brute_force_scores(model, batch, metric=metric, positions=pos, pool=pool)
    assert_close(got.scores, want.float(), name=f"{arch} {metric} pool={pool}")


def test_callable_metric_and_positions_key(model, batch):
    def last_token_logit(logits, b):
        return logits[:, -1, 5].mean()

    batch = dict(batch, where=_positions(batch))
    got = attribute(model, batch, metric=last_token_logit, positions="where")
    want = brute_force_scores(model, batch, metric=last_token_logit, positions=batch["where"])
    assert_close(got.scores, want.float())


def _loss64(logits, batch):
    """Next-token cross-entropy in float64 (HF's loss upcasts to float32 only, too coarse for FD)."""
    lp = logits[:, :-1].double().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return -lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].mean()


def test_oracle_matches_finite_differences(arch):
    """d metric / d eps_d along (a_u - a~_u) on the positions equals the oracle's signed score * B."""
    model = tiny_model(arch, dtype=torch.float64)
    batch = random_batch(37)
    g = ComputationGraph.from_model(model)
    signed = brute_force_scores(model, batch, metric=_loss64, graph=g, signed=True)
    acts, base = edge_directions(model, g, batch, "mean")
    valid = batch["attention_mask"].bool()[..., None]
    zeros = {n: torch.zeros(batch["input_ids"].shape + (g.d_model,), dtype=torch.float64)
             for n in g.downstream_nodes}
    pairs = [("embed", "logits"), ("attn.0.1", "attn.1.0.k"), ("mlp.0", "attn.1.1.q"), ("attn.1.2", "mlp.1"),
             ("attn.0.0", "attn.1.1.v"), ("mlp.1", "logits")]
    for u, d in pairs:
        direction = (acts[u] - base[u]) * valid
        h = 1e-2  # Llama-family norms compute in float32 even in a float64 model: a small h drowns in rounding
        plus = metric_with_copies(model, g, batch, _loss64, {**zeros, d: h * direction})
        minus = metric_with_copies(model, g, batch, _loss64, {**zeros, d: -h * direction})
        fd = (plus - minus).item() / (2 * h) / batch["input_ids"].shape[0]
        exact = signed[g.up_index[u], g.down_index[d]].item()
        assert abs(fd - exact) <= 1e-3 * abs(exact) + 1e-4 * signed.abs().max().item(), (u, d, fd, exact)


def test_bf16_scores_close_to_fp32():
    m32 = tiny_model("llama")
    m16 = tiny_model("llama", dtype=torch.bfloat16)
    batch = random_batch(37)
    s32 = attribute(m32, batch).scores
    s16 = attribute(m16, batch).scores
    assert s16.dtype == torch.float32
    rel = (s16 - s32).norm() / s32.norm()
    assert rel < 0.05


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_bf16_scoring_policy(arch, backend, monkeypatch):
    """bf16 scoring operands (the GPU policy for bf16 models, forced here on CPU) stay within the bf16 band of
    the fp64 oracle and keep the top circuit, on the torch path and the fused Triton kernel (tensor-core dots;
    the interpreter here); the default on CPU is the exact fp32 path."""
    if backend == "triton":
        if ct_fast.ops.triton_available(torch.device("cpu")) is not None:
            pytest.skip(ct_fast.ops.triton_available(torch.device("cpu")))
        monkeypatch.setenv("CT_FAST_BACKEND", "triton")
    model = tiny_model(arch)
    batch = random_batch(37, batch=4, seq=16)
    g = ComputationGraph.from_model(model)
    oracle = brute_force_scores(tiny_model(arch, dtype=torch.float64), batch, graph=g).float()
    low = attribute(model, batch, graph=g, score_dtype=torch.bfloat16).scores
    exact = attribute(model, batch, graph=g).scores
    assert ct_fast.attribution.scoring_dtype(next(model.parameters())) == torch.float32
    rel = ((low - oracle).abs().sum() / oracle.abs().sum()).item()
    assert 1e-4 < rel < 5e-2, rel  # bf16 operands: measurably inexact, within the band
    assert ((exact - oracle).abs().sum() / oracle.abs().sum()).item() < 1e-5
    top = set(oracle.flatten().topk(30).indices.tolist())
    assert len(top & set(low.flatten().topk(30).indices.tolist())) >= 27


def test_no_per_node_activation_buffer_and_no_weight_grads(monkeypatch):
    """Scoring buffers are bounded by CHUNK_ELEMENTS whatever the token count: never [nodes, tokens, d]."""
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=16)
    batch = random_batch(16, batch=4, seq=24)
    g = ComputationGraph.from_model(model)
    per_layer_nodes = g.n_heads + 2 * g.n_kv_heads + 1
    bound = per_layer_nodes * 24 * g.d_model  # one layer's gradients over 24 of the 90 scored tokens
    monkeypatch.setattr(ct_fast.attribution, "CHUNK_ELEMENTS", bound)
    monkeypatch.setattr(ct_fast.attribution, "MIN_CHUNK_ROWS", 4)
    fired = []
    for p in model.parameters():
        p.register_hook(lambda grad: fired.append(grad.shape))
    with _LargestTensor() as mode:
        got = attribute(model, batch, graph=g)
    tokens = batch["attention_mask"].sum().item()
    assert fired == []  # no weight gradient was computed
    assert all(p.grad is None for p in model.parameters())
    assert tokens > 3 * 24 and mode.largest <= bound
    assert_close(got.scores, attribute(model, batch, graph=g).scores)  # chunking changes nothing but rounding


def test_training_forwards_build_no_kv_cache():
    """Every forward ct_fast runs passes ``use_cache=False``: HF builds a KV cache by default even in training (a copy
    of every layer's keys and values, held with the output), which no step reads; and a tuner step's backward
    forms no gradient for the scalar that routes it through the taps (it only routes)."""
    from ct_fast.attribution import model_inputs

    model = tiny_model("llama", num_hidden_layers=2, vocab_size=16)
    batch = random_batch(16, batch=2, seq=8)
    assert model_inputs(batch)["use_cache"] is False
    assert model(**model_inputs(batch)).past_key_values is None
    tuner = ct_fast.CircuitTuner(model, ct_fast.CircuitAdamW(model.parameters(), lr=1e-3), top_n=5,
                                 memory_mode="two_pass")
    updates = []
    hook = tuner.session.anchor.register_hook(lambda g: updates.append(g))
    tuner.step(batch)
    hook.remove()
    assert all(g is None for g in updates) and tuner.session.anchor.grad is None  # (hooks may see None)


@pytest.mark.triton
def test_fused_scoring_is_chunk_invariant(monkeypatch):
    """The fused path (Triton scoring and residual kernels) in many token chunks — each chunk slicing the norms'
    statistics made once per span, the ablation mean taken out once per span — equals one chunk."""
    if ct_fast.ops.triton_available(torch.device("cpu")) is not None:
        pytest.skip(ct_fast.ops.triton_available(torch.device("cpu")))
    monkeypatch.setenv("CT_FAST_BACKEND", "triton")
    model = tiny_model("llama", num_hidden_layers=3, vocab_size=16).to(torch.bfloat16)
    batch = random_batch(16, batch=3, seq=20)
    g = ComputationGraph.from_model(model)
    whole = attribute(model, batch, graph=g).scores
    monkeypatch.setattr(ct_fast.attribution, "CHUNK_ELEMENTS", 70 * g.d_model)  # a few rows per chunk
    chunked = attribute(model, batch, graph=g).scores
    assert ((whole - chunked).abs().sum() / whole.abs().sum()).item() < 1e-5


def _bf16_case_in_many_chunks(arch: str, layers: int, positions: bool, monkeypatch):
    """``(model, graph, batch, scores)``: a bf16 tiny model scored in several token chunks and sub-chunks, ``scores()``
    the raw scores of ``batch`` attributed as two micro-batches (rows 0 and 1..2), at a positions subset or not."""
    model = tiny_model(arch, num_hidden_layers=layers, vocab_size=16, dtype=torch.bfloat16)
    batch = random_batch(16, batch=3, seq=20)
    batch["scored"] = _positions(batch)
    graph = ComputationGraph.from_model(model)
    monkeypatch.setattr(ct_fast.attribution, "CHUNK_ELEMENTS", 70 * graph.d_model)

    def scores():
        run = ct_fast.AttributionRun(model, graph, positions="scored" if positions else None)
        for rows in (slice(0, 1), slice(1, 3)):
            _, value = run.forward({k: v[rows] for k, v in batch.items()})
            run.backward(value)
        return run.scores().scores

    return model, graph, batch, scores


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_split_score_products_leave_half_precision_scores(arch, monkeypatch):
    """A bf16 model's score products split over 4 token blocks (``CT_FAST_PRODUCT_SPLIT``) — the contributions'
    and the stacked residual sources' alike, in many chunks over two micro-batches — give the one-GEMM sums within
    bf16 rounding of the partial products."""
    from ct_fast.ops import gemm

    model, _, _, scores = _bf16_case_in_many_chunks(arch, 3, False, monkeypatch)
    monkeypatch.setattr(ct_fast.attribution, "MIN_CHUNK_ROWS", 1)
    plain = scores()
    monkeypatch.setenv("CT_FAST_PRODUCT_SPLIT", "4")
    calls, where, real, real_stacked = [], [], gemm.split_mm, ct_fast.attribution.EdgeScorer._accumulate_stacked
    monkeypatch.setattr(gemm, "split_mm", lambda a, b: calls.append("stacked" if where else "contributions")
                        or real(a, b))
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_accumulate_stacked",
                        lambda self, *a: (where.append(1), real_stacked(self, *a), where.clear()))
    split = scores()
    assert set(calls) == {"stacked", "contributions"}
    assert ((split - plain).abs().sum() / plain.abs().sum()).item() < 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_query_key_value_gradients_are_one_product(arch, monkeypatch):
    """On the torch path a layer's query, key and value blocks (one projection each, read through one folded norm)
    are made by one batched product per chunk (``EdgeScorer._project_run``: GPT-2's from one tap at three offsets,
    Llama's from three taps) — the scores equal those made block by block, and the oracle's."""
    model = tiny_model(arch, num_hidden_layers=3)
    batch = random_batch(37, batch=3, seq=7)
    g = ComputationGraph.from_model(model)
    monkeypatch.setattr(ct_fast.attribution, "CHUNK_ELEMENTS", 5 * g.d_model * 40)  # several chunks
    runs, real = [], ct_fast.attribution.EdgeScorer._project_run
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_project_run",
                        lambda self, blocks, W, *a: (runs.append((len(blocks), W.shape[0])), real(self, blocks, W, *a)))
    together = attribute(model, batch, graph=g).scores
    assert runs and set(runs) == {(3, g.n_heads + 2 * g.n_kv_heads)}
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_fold_run", lambda *a: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_fold_norm_weights", _fold_without_runs)
    apart = attribute(model, batch, graph=g).scores
    assert ((together - apart).abs().max() / apart.abs().max()).item() < 1e-6
    assert_close(together, brute_force_scores(model, batch, graph=g).float())


def _fold_without_runs(self, plan, down_weight, stats):
    """``EdgeScorer._fold_norm_weights`` folding every projection on its own (no runs): the block-by-block path."""
    folded = {}
    for norm, _, _ in plan.norms:
        if norm is not None and ct_fast.ops.reference.norm_kind(self.norms[norm]) != "generic":
            folded[norm] = ct_fast.ops.reference.norm_kind(self.norms[norm])
    for _, _, groups in plan.blocks:
        for grp in groups:
            if grp.norm in folded and down_weight[grp.index] is not None:
                gamma = self._norm_stats(grp.norm, stats)[2]
                down_weight[grp.index] = ct_fast.ops.reference.fold_norm_weight(down_weight[grp.index], gamma)
    return folded, {}


def test_aligned_score_gemms_leave_the_scores(monkeypatch):
    """The GPU's padded score GEMMs (``ops.gemm``: score blocks of n_d nodes written into 16-byte aligned rows, on
    the contributions block's path and the stacked sources' path), forced on the CPU: the same scores."""
    model, _, _, scores = _bf16_case_in_many_chunks("llama", 3, False, monkeypatch)
    plain = scores()
    padded, stacked = [], []
    real, real_stacked = torch.mm, ct_fast.attribution.EdgeScorer._accumulate_stacked
    monkeypatch.setattr(ct_fast.ops.gemm, "aligns", lambda device: True)
    monkeypatch.setattr(torch, "mm", lambda a, b, out: (padded.append(out.stride(0) - out.shape[1]),
                                                        real(a, b, out=out))[1])
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_accumulate_stacked",
                        lambda self, *a: (stacked.append(len(padded)), real_stacked(self, *a),
                                          stacked.append(len(padded))))
    aligned = scores()
    assert padded and max(padded) > 0 and any(b > a for a, b in zip(stacked[::2], stacked[1::2]))  # both paths
    assert ((aligned - plain).abs().sum() / plain.abs().sum()).item() < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", [False, True])
def test_stacked_residual_sources_score_as_gathered_ones(arch, positions, monkeypatch):
    """A half-precision model's residual-vector sources (embeddings, MLP outputs) are captured into one buffer and on
    the torch path scored straight from it, one GEMM per run of them and token chunk, into a block with those rows
    last: the same sums as copying each source into the contributions block — in many token chunks, with a positions
    subset, over two micro-batches — and the stacked slots hold exactly what the model computed."""
    from ct_fast.capture import Capture

    model, g, batch, scores = _bf16_case_in_many_chunks(arch, 3, positions, monkeypatch)
    scored = []
    real = ct_fast.attribution.EdgeScorer._accumulate_stacked
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_accumulate_stacked",
                        lambda self, *a: (scored.append(self.stack.shape), real(self, *a)))

    stacked = scores()
    assert scored and all(shape[0] == g.n_layers + 1 for shape in scored)  # the embedding and every MLP
    monkeypatch.setattr(ct_fast.attribution.AttributionRun, "_stack_keys", lambda self, derived: [])
    gathered = scores()
    assert ((stacked - gathered).abs().sum() / gathered.abs().sum()).item() < 1e-5
    keys = [u.capture for u in g.upstream_groups if u.writer is None]
    with Capture(model, stack=keys) as stacking, torch.no_grad():
        model(input_ids=batch["input_ids"])
    with Capture(model, store=keys) as plain, torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert stacking.stacked == set(keys) and stacking.stack_buffer.shape[0] == len(keys)
    for i, key in enumerate(keys):
        assert stacking.stored[key].data_ptr() == stacking.stack_buffer[i].data_ptr()
        assert torch.equal(stacking.stored[key], plain.stored[key])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("positions", [False, True])
def test_several_layers_heads_score_as_one_batch(arch, positions, monkeypatch):
    """With a half-precision model's residual vectors stacked (the torch path), the attention heads of consecutive
    layers scored together are one batch per token chunk — their rows copied side by side, their output projections
    stacked once — with the same sums as one GEMM per layer: in many chunks, with a positions subset, over two
    micro-batches. The batch of the last layer's readers holds every earlier layer's heads."""
    model, g, batch, scores = _bf16_case_in_many_chunks(arch, 4, positions, monkeypatch)
    runs = []
    real = ct_fast.attribution.EdgeScorer._head_run
    monkeypatch.setattr(ct_fast.attribution.EdgeScorer, "_head_run",
                        lambda self, k, slot, n, *a: (runs.append(n), real(self, k, slot, n, *a))[1])

    batched = scores()
    assert max(runs) == g.n_layers - 1
    monkeypatch.setattr(ct_fast.attribution, "_head_slots", lambda graph, modules: {})
    runs.clear()
    per_layer = scores()
    assert not runs
    assert ((batched - per_layer).abs().sum() / per_layer.abs().sum()).item() < 1e-5
    # beyond HEAD_WEIGHTS_ELEMENTS (an 8B model's output projections) each layer's heads are scored alone
    monkeypatch.undo()
    monkeypatch.setattr(ct_fast.attribution, "HEAD_WEIGHTS_ELEMENTS", 3 * g.d_model ** 2)
    assert ct_fast.attribution._head_slots(g, dict(model.named_modules())) == {}


def test_scoring_chunk_rule():
    """Token chunks: GPU blocks are larger than CPU ones; fused scoring (contributions made on chip) is bounded by
    the stacked gradients alone, the torch path also by the contributions of the groups scored together."""
    from ct_fast.attribution import (CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, MIN_CHUNK_ROWS, chunk_elements,
                                     scoring_chunk, scoring_chunks)

    assert chunk_elements(torch.device("cpu")) == CHUNK_ELEMENTS < GPU_CHUNK_ELEMENTS == chunk_elements("cuda")
    # llama-1B: a span of 2 layers (2 x 49 nodes) reading 16 x 33 + 1 upstream nodes, d_model 2048
    assert scoring_chunk(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=True) == GPU_CHUNK_ELEMENTS // (98 * 2048) == 1337
    assert scoring_chunk(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=False) == GPU_CHUNK_ELEMENTS // (529 * 2048)
    assert scoring_chunk(98, 10 ** 5, 2048, CHUNK_ELEMENTS, fused=False) == MIN_CHUNK_ROWS
    assert scoring_chunk(10 ** 6, 10 ** 6, 4096, CHUNK_ELEMENTS, fused=True) == 1
    # G's chunk is the fused one on both paths, a whole number of the torch path's scoring sub-chunks
    assert scoring_chunks(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=True) == (1337, 1337)
    assert scoring_chunks(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=False) == (5 * 247, 247)
    assert scoring_chunks(98, 10 ** 5, 2048, CHUNK_ELEMENTS, fused=False) == (MIN_CHUNK_ROWS, MIN_CHUNK_ROWS)
    # products split over 8 token blocks: sub-chunks a multiple of 8 rows (the fused path does not split)
    assert scoring_chunks(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=False, split=8) == (5 * 240, 240)
    assert scoring_chunks(98, 529, 2048, GPU_CHUNK_ELEMENTS, fused=True, split=8) == (1337, 1337)
    assert scoring_chunks(98, 529, 2048, 5 * 529 * 2048, fused=False, split=8) == (24, 24)  # 26 rows: 24
    assert scoring_chunks(98, 529, 2048, 5 * 98 * 2048, fused=False, split=8) == (5, 5)  # fewer than 8: as is


# ---- bad input ----

def test_positions_errors(model, batch):
    with pytest.raises(CTFastError, match=r"positions has shape \(3, 6\)"):
        attribute(model, batch, positions=torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(CTFastError, match="positions is a torch.float32 tensor"):  # (0.3 read as True)
        attribute(model, batch, positions=torch.full(batch["input_ids"].shape, 0.3))
    pos = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    pos[0, 1] = True
    pos[2, -1] = True  # only padding in row 2, nothing in row 1
    with pytest.raises(CTFastError, match=r"examples \[1, 2\] have no valid"):
        attribute(model, batch, positions=pos)
    with pytest.raises(CTFastError, match="names no batch key"):
        attribute(model, batch, positions="nope")


def test_ablation_errors(model, batch):
    with pytest.raises(CTFastError, match="needs corrupted_batch"):
        attribute(model, batch, ablation="corrupted")
    short = {k: v[:, :5] for k, v in batch.items()}
    with pytest.raises(CTFastError, match=r"corrupted_batch has shape \(3, 5\)"):
        attribute(model, batch, ablation="corrupted", corrupted_batch=short)
    with pytest.raises(CTFastError, match="not one of"):
        attribute(model, batch, ablation="resample")
    with pytest.raises(CTFastError, match="needs 'labels'"):
        attribute(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(CTFastError, match="target_pos"):
        attribute(model, batch, metric="logit_diff")


def test_nan_metric_and_scores_are_refused(model, batch):
    with pytest.raises(NonFiniteError, match="non-finite"):
        attribute(model, batch, metric=lambda logits, b: logits.sum() * float("nan"))
    with torch.no_grad():
        dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if "layers.0" in n or "h.0" in n)
                                       ].fill_(float("inf"))
    with pytest.raises(NonFiniteError):
        attribute(model, batch)


def test_bad_inputs_get_clear_errors():
    """Inputs attribution cannot use are named with their fix, instead of a raw KeyError / autograd error or a
    silently wrong score (a negative or padded target position reading another logit)."""
    model = tiny_model("llama")
    batch = random_batch(37)  # right padding on some rows
    task = dict(batch, target_pos=torch.tensor([2, 1, 3]), answer=torch.tensor([1, 2, 3]),
                wrong_answer=torch.tensor([4, 5, 6]))
    B, T = batch["input_ids"].shape
    padded = int((batch["attention_mask"] == 0).nonzero()[0, 0])  # an example with padding, at its last position
    cases = [
        (dict(batch, attention_mask=torch.ones(B, 1, T, T, dtype=torch.bool)), "loss", "4-D masks"),
        ({"labels": batch["labels"]}, "loss", "no 'input_ids' tensor"),
        (dict(task, target_pos=torch.tensor([[2], [1], [3]])), "logit_diff", r"expected one integer position"),
        (dict(task, target_pos=torch.tensor([-1, 1, 3])), "logit_diff", r"target_pos of examples \[0\] \(\[-1\]\)"),
        (dict(task, target_pos=torch.tensor([T - 1] * B)), "logit_diff", rf"examples \[{padded}"),
        (dict(batch, labels=torch.full_like(batch["labels"], -100)), "loss", "all -100"),
        (batch, lambda logits, b: torch.tensor(1.0), "does not depend on the model's output"),
    ]
    for b, metric, match in cases:
        with pytest.raises(CTFastError, match=match):
            attribute(model, b, metric=metric)
    with torch.no_grad(), pytest.raises(CTFastError, match=r"under torch.no_grad\(\)"):
        attribute(model, batch)
    attribute(model, dict(task, target_pos=[2, 1, 3]), metric="logit_diff")  # a list is a position per example


def test_token_budget_is_a_rescaled_subset(model, batch):
    """With a budget, scores equal the exact scores of the chosen positions times n_positions / budget."""
    g = ComputationGraph.from_model(model)
    budget = 16  # of 18 valid tokens: every example keeps some (the oracle needs that)
    run = ct_fast.AttributionRun(model, g, ablation="zero", token_budget=budget)
    pos = ct_fast.attribution.resolve_positions(batch, None)
    chosen, factor = ct_fast.AttributionRun(model, g, ablation="zero", token_budget=budget)._budget(pos)
    assert int(chosen.sum()) == budget and factor == pos.sum().item() / budget and not (chosen & ~pos).any()
    _, value = run.forward(batch)
    run.backward(value)
    want = brute_force_scores(model, batch, ablation="zero", positions=chosen, graph=g) * factor
    assert_close(run.scores().scores, want.float())
    with pytest.raises(CTFastError, match="token_budget"):
        ct_fast.AttributionRun(model, g, token_budget=4, pool=True)


def test_activation_checkpointing_gives_the_same_scores(arch):
    import copy
    model = tiny_model(arch)
    batch = random_batch(37)
    plain = attribute(model, batch).scores
    ckpt = ct_fast.enable_activation_checkpointing(copy.deepcopy(model)).train()
    assert_close(attribute(ckpt, batch).scores, plain)
    a, b = copy.deepcopy(model), ct_fast.enable_activation_checkpointing(copy.deepcopy(model)).train()
    ra = ct_fast.CircuitTuner(a, ct_fast.CircuitAdamW(a.parameters(), lr=1e-2), top_n=15).step(batch)
    rb = ct_fast.CircuitTuner(b, ct_fast.CircuitAdamW(b.parameters(), lr=1e-2), top_n=15).step(batch)
    assert ra.circuit.edges == rb.circuit.edges
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p)


@pytest.mark.parametrize("ablation,pool", [("zero", False), ("mean", False), ("mean", True)])
def test_micro_batches_equal_the_whole_batch(model, batch, ablation, pool):
    """Scores accumulated over micro-batches equal the whole batch's (mean ablation: every micro-batch is
    re-centred on the whole batch's mean)."""
    g = ComputationGraph.from_model(model)
    whole = attribute(model, batch, graph=g, ablation=ablation, pool=pool)
    run = ct_fast.AttributionRun(model, g, ablation=ablation, pool=pool)
    tokens = (batch["labels"][:, 1:] != -100).sum()
    for rows in (slice(0, 1), slice(1, 3)):
        part = {k: v[rows] for k, v in batch.items()}
        _, value = run.forward(part)
        run.backward(value, scale=((part["labels"][:, 1:] != -100).sum() / tokens).item())
    assert_close(run.scores().scores, whole.scores)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scoring_runs_outside_the_callers_autocast(arch):
    """``attribute()`` called under bf16 autocast: the forward runs in bf16 as asked, the scoring products do not
    (the scorer's fp32 GEMMs came out bf16, and mean-ablation centring magnified it: 8% of the top score on GPT-2)
    — the same scores as that autocast forward's backward scored outside autocast."""
    model, batch = tiny_model(arch), random_batch(37)
    graph = ComputationGraph.from_model(model)
    run = ct_fast.AttributionRun(model, graph, ablation="mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, value = run.forward(batch)
    run.backward(value)
    want = run.scores().scores
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attribute(model, batch, graph=graph).scores
    assert_close(got, want)
