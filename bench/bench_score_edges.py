"""Fused attribution scoring (ct_fast.attribute) vs a materialising EAP implementation that keeps
per-node activation and gradient buffers (as the public EAP tools do: here the package's brute-force
oracle, which gives every downstream node its own residual copy) — equal results, time and peak memory.
``python bench/bench_score_edges.py [--device cuda] [--layers 4 --d-model 256 --heads 8 --batch 8 --seq 64]``"""

import argparse
import os
import sys

import torch

from ct_fast.app import harness  # noqa: E402

import ct_fast  # noqa: E402
from ct_fast.testing import brute_force_scores  # noqa: E402


def model_and_batch(layers, d_model, heads, batch, seq, vocab, device):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, vocab_size=vocab, n_positions=seq,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return model, {"input_ids": ids, "labels": ids}


def run(device="cpu", layers=4, d_model=256, heads=8, batch=8, seq=64, vocab=1000):
    model, b = model_and_batch(layers, d_model, heads, batch, seq, vocab, device)
    graph = ct_fast.ComputationGraph.from_model(model)
    ours = ct_fast.attribute(model, b, graph=graph).scores
    theirs = brute_force_scores(model, b, graph=graph).float()
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    t_ours = harness.median_time(lambda: ct_fast.attribute(model, b, graph=graph), device, warmup=1, reps=3)
    t_mat = harness.median_time(lambda: brute_force_scores(model, b, graph=graph), device, warmup=1, reps=3)
    m_ours = harness.peak_bytes(lambda: ct_fast.attribute(model, b, graph=graph), device)
    m_mat = harness.peak_bytes(lambda: brute_force_scores(model, b, graph=graph), device)
    return {"bench": "score_edges", "device": device, "layers": layers, "d_model": d_model, "heads": heads,
            "tokens": batch * seq, "n_upstream": len(graph.upstream_nodes), "n_downstream": len(graph.downstream_nodes),
            "max_rel_diff": err, "fused_ms": t_ours * 1e3, "materialising_ms": t_mat * 1e3,
            "fused_peak_mib": m_ours / 2**20, "materialising_peak_mib": m_mat / 2**20,
            "memory_ratio": m_mat / max(1, m_ours), "speed_ratio": t_mat / t_ours}


def test_attribute(benchmark):
    model, b = model_and_batch(2, 64, 4, 2, 16, 100, "cpu")
    graph = ct_fast.ComputationGraph.from_model(model)
    benchmark(ct_fast.attribute, model, b, graph=graph)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    r = run(a.device, a.layers, a.d_model, a.heads, a.batch, a.seq)
    print(f"fused {r['fused_ms']:.0f} ms, {r['fused_peak_mib']:.1f} MiB | materialising {r['materialising_ms']:.0f} ms, "
          f"{r['materialising_peak_mib']:.1f} MiB | memory {r['memory_ratio']:.1f}x less, {r['speed_ratio']:.1f}x faster,"
          f" max rel diff {r['max_rel_diff']:.1e}")
    print(harness.write(f"{a.device}_score_edges", [r], a.out))
