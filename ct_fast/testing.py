"""Test helpers shared by tests/ and bench/: tiny models, the tolerance policy, and the brute-force EAP
oracle in which every downstream node reads its own private copy of the residual stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attribution import TokenRows, evaluate_metric, model_inputs, resolve_positions, valid_tokens
from .graph import ComputationGraph

def devices() -> list[str]:
    """The devices tests run on: always "cpu", plus "cuda" when a GPU is present (the one place that asks)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- tolerance policy (STYLE.md 8) ----------------------------------------------------------------
TOLERANCES = {torch.float64: (1e-10, 1e-7), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2),
              torch.float16: (1e-3, 5e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, name: str = "tensor"):
    """``torch.testing.assert_close`` with the per-dtype (atol, rtol) of this project; the first
    mismatches are printed by index."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    bad = ~torch.isclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [f"  {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} mismatches (atol={atol}, rtol={rtol}):\n"
                             + "\n".join(rows))


# ---- tiny models -------------------------------------------------------------------------------
TINY_ARCHS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str, **overrides):
    """A few-layer config of ``arch`` with awkward sizes (GQA for the Llama family)."""
    import transformers as tf

    if arch == "gpt2":
        kw = dict(n_layer=2, n_embd=24, n_head=3, n_inner=40, vocab_size=37, n_positions=32,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Config(**{**kw, **overrides})
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[arch]
    kw = dict(num_hidden_layers=2, hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
              intermediate_size=40, vocab_size=37, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
              pad_token_id=0, tie_word_embeddings=False)
    if arch == "qwen3":
        kw["head_dim"] = 8  # q/k norms over a head_dim that differs from hidden/heads
    return cls(**{**kw, **overrides})


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, **overrides) -> nn.Module:
    """A randomly initialised causal LM of ``arch`` from ``tiny_config`` (no download), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    # HF initialises biases to zero; random biases make every bias path visible to the tests
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


def random_batch(vocab: int, batch: int = 3, seq: int = 7, pad: bool = True, seed: int = 1) -> dict:
    """``input_ids``/``attention_mask``/``labels`` with right padding on some rows when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):
            mask[b, seq - b:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- brute-force oracle ------------------------------------------------------------------------

def node_activations(model: nn.Module, graph: ComputationGraph, stored: dict) -> dict[str, torch.Tensor]:
    """Per-node residual contributions ``[B, T, d]`` of every upstream node, materialised naively."""
    params = dict(model.named_parameters())
    acts = {}
    for g in graph.upstream_groups:
        x = stored[g.capture]
        if g.writer is None:
            acts[g.names[0]] = x
            continue
        wr, W = g.writer, params[g.writer.weight]
        for j, name in enumerate(g.names):
            a, b = wr.offset + j * wr.width, wr.offset + (j + 1) * wr.width
            w = W[:, a:b].T if wr.layout == "linear" else W[a:b, :]
            acts[name] = x[..., a:b] @ w
    return acts


class PrivateCopies:
    """Hooks that make every downstream node read ``norm(x + eps_d)`` through its own weight slice, so
    that ``d metric / d eps_d`` is node d's residual gradient through its own path only."""

    def __init__(self, model, graph: ComputationGraph, eps: dict[str, torch.Tensor]):
        self.model, self.graph, self.eps, self.handles, self.resid = model, graph, eps, [], {}

    def __enter__(self):
        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        for name in {g.norm for g in self.graph.downstream_groups if g.norm}:
            self.handles.append(modules[name].register_forward_pre_hook(self._keep(name)))
        for g in self.graph.downstream_groups:
            if g.reader is not None:
                self.handles.append(modules[g.reader.module].register_forward_hook(self._read_heads(g, modules, params)))
            elif g.norm is not None:
                self.handles.append(modules[g.tap[0]].register_forward_pre_hook(self._read_whole(g, modules)))
            else:
                self.handles.append(modules[g.tap[0]].register_forward_pre_hook(
                    lambda m, args, g=g: (args[0] + self.eps[g.names[0]],) + args[1:]))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _keep(self, name):
        def hook(module, args):
            self.resid[name] = args[0]
        return hook

    def _read_whole(self, g, modules):
        def hook(module, args):
            return (modules[g.norm].forward(self.resid[g.norm] + self.eps[g.names[0]]),) + args[1:]
        return hook

    def _read_heads(self, g, modules, params):
        r = g.reader
        W, bias = params[r.weight], params.get(r.bias) if r.has_bias else None

        def hook(module, args, out):
            out = out.clone()
            for j, name in enumerate(g.names):
                a, b = r.offset + j * r.width, r.offset + (j + 1) * r.width
                n = modules[g.norm].forward(self.resid[g.norm] + self.eps[name])
                y = F.linear(n, W[a:b]) if r.layout == "linear" else n @ W[:, a:b]
                out[..., a:b] = y if bias is None else y + bias[a:b]
            return out
        return hook


def brute_force_scores(model: nn.Module, batch: dict, metric="loss", ablation: str = "mean", positions=None,
                       pool: bool = False, graph: ComputationGraph | None = None,
                       corrupted_batch: dict | None = None, signed: bool = False) -> torch.Tensor:
    """EAP scores computed the slow, obvious way: materialise every node's activation, give every
    downstream node a private residual copy ``x + eps_d``, take ``d metric / d eps_d`` by autograd and dot.

    Returns ``[n_up, n_down]`` (``|.|/B`` on edges, 0 elsewhere; ``signed=True``: the signed sum / B).
    """
    graph = graph or ComputationGraph.from_model(model)
    acts, base = edge_directions(model, graph, batch, ablation, corrupted_batch)
    param = next(model.parameters())  # the model's device and dtype (a GPU benchmark runs this oracle there)
    eps = {n: torch.zeros(batch["input_ids"].shape + (graph.d_model,), dtype=param.dtype, device=param.device,
                          requires_grad=True) for n in graph.downstream_nodes}
    value = metric_with_copies(model, graph, batch, metric, eps)
    grads = torch.autograd.grad(value, [eps[n] for n in graph.downstream_nodes], allow_unused=True)
    rows = TokenRows(resolve_positions(batch, positions), pool)
    raw = torch.zeros(len(graph.upstream_nodes), len(graph.downstream_nodes), dtype=torch.float64, device=param.device)
    for i, u in enumerate(graph.upstream_nodes):
        du = rows.compact(acts[u] - base[u]).double()
        for j, g in enumerate(grads):
            if graph.edge_mask[i, j] and g is not None:
                raw[i, j] = (du * rows.compact(g).double()).sum()
    raw /= batch["input_ids"].shape[0]
    return raw if signed else raw.abs()


def edge_directions(model, graph, batch, ablation, corrupted_batch=None):
    """``(a_u, a~_u)`` per upstream node name, each ``[B, T, d]`` (the baseline broadcastable)."""
    from .capture import Capture

    keys = {g.capture for g in graph.upstream_groups}
    with torch.no_grad():  # (the products with the weights too: no autograd graph kept alive by what is scored)
        with Capture(model, store=keys) as cap:
            model(**model_inputs(batch))
        acts = node_activations(model, graph, cap.stored)
        if ablation == "zero":
            base = {n: torch.zeros_like(a) for n, a in acts.items()}
        elif ablation == "corrupted":
            with Capture(model, store=keys) as cap2:
                model(**model_inputs(corrupted_batch))
            base = node_activations(model, graph, cap2.stored)
        else:
            valid = valid_tokens(batch)
            base = {n: a[valid].mean(0) for n, a in acts.items()}
    return acts, base


def metric_with_copies(model, graph, batch, metric, eps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The metric of a forward in which downstream node d reads ``norm(x + eps[d])`` (see PrivateCopies)."""
    with PrivateCopies(model, graph, eps):
        out = model(**model_inputs(batch))
    return evaluate_metric(metric, out, batch)
