"""How the public circuit-tuning code does a step, re-implemented on HF models — for timing only (bench/).

Per step, as the reference code (Siriuslala/circuit-tuning) does it:
1. forward hooks store per-node activation differences ``a_u - mean(a_u)``, one ``[B, T, d]`` buffer per
   upstream node (stacked: ``[n_up, B, T, d]``);
2. a metric backward in which every downstream node reads its own residual copy and a backward hook on that
   copy scores its edges against all stored differences (einsum);
3. top-N selection;
4. ``requires_grad`` toggled on for the circuit's parameters, off for the rest;
5. a second, full forward and backward;
6. gradient slices outside the circuit zeroed;
7. a dense ``torch.optim.AdamW`` step.
It shares ct_fast's graph (node names, parameter slices) so that both select comparable circuits.
"""

from __future__ import annotations

import torch

from ct_fast import ComputationGraph, EdgeScores
from ct_fast.attribution import model_inputs
from ct_fast.capture import Capture
from ct_fast.testing import node_activations, PrivateCopies


class ReferenceCircuitTuning:
    def __init__(self, model, top_n: int, lr: float = 1e-4, fused: bool = False):
        self.model, self.top_n = model, top_n
        self.graph = ComputationGraph.from_model(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused)

    def step(self, batch: dict) -> float:
        model, graph = self.model, self.graph
        inputs = model_inputs(batch)
        # 1. per-node activation differences, materialised
        with torch.no_grad(), Capture(model, store={g.capture for g in graph.upstream_groups}) as cap:
            model(**inputs)
        acts = node_activations(model, graph, cap.stored)
        deltas = torch.stack([acts[u] - acts[u].reshape(-1, acts[u].shape[-1]).mean(0) for u in graph.upstream_nodes])
        del acts, cap
        # 2. metric backward with per-node residual copies; backward hooks score their edges
        scores = torch.zeros(len(graph.upstream_nodes), len(graph.downstream_nodes), device=deltas.device)
        shape = inputs["input_ids"].shape + (graph.d_model,)
        eps = {}

        def scorer(j):
            def hook(grad):
                scores[:, j] += torch.einsum("ubtd,btd->u", deltas, grad.to(deltas.dtype))
            return hook

        for j, name in enumerate(graph.downstream_nodes):
            e = torch.zeros(shape, device=deltas.device, dtype=deltas.dtype, requires_grad=True)
            e.register_hook(scorer(j))
            eps[name] = e
        with PrivateCopies(model, graph, eps):
            loss = model(**inputs).loss
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        # 3. selection
        circuit = EdgeScores((scores / shape[0]).abs() * graph.edge_mask.to(scores.device), graph).top_n(self.top_n)
        masks = circuit.param_masks(model, graph)
        # 4. requires_grad toggling; 5. a second full forward/backward
        for name, p in model.named_parameters():
            p.requires_grad_(bool(masks[name].any()))
        loss = model(**inputs).loss
        if loss.requires_grad:  # a circuit of parameter-free edges (embed -> logits) has nothing to train
            loss.backward()
        # 6. zero the gradient slices outside the circuit; 7. dense optimizer step
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.mul_(masks[name])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        return loss.item()
