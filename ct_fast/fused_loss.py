"""The causal-LM training loss without the logits: the unembedding and the cross-entropy in token chunks
(as Liger-Kernel's fused linear cross-entropy).

A plain Hugging Face step materialises the logits ``[B, T, vocab]`` in the model's dtype, an fp32 copy for the
loss, its log-softmax and the gradient of the logits — at B x T = 8 x 2048 and a 128K vocabulary, tens of
GiB. ``linear_cross_entropy`` computes, chunk by chunk of tokens, the logits, their log-sum-exp and the
gradients with respect to the hidden states (and the unembedding, when it trains) during the forward, so at
most one ``[chunk, vocab]`` block lives at a time; the backward only scales the saved gradients.

``causal_lm_loss(model, batch)`` runs an unmodified transformers causal LM this way: the model is called
without labels and with ``logits_to_keep`` empty (its ``lm_head`` sees no position), the final hidden states
are taken from its base model, and the loss equals the model's own (``ForCausalLMLoss``: labels shifted by
one, -100 ignored, the mean over the label tokens), in the same dtypes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import CTFastError

CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MiB in fp32)
_TRACE_CHUNKS: list = [None]  # the memory plan's meta trace: compute this many chunks only (see traced_chunks)


@contextlib.contextmanager
def traced_chunks(n: int = 1):
    """Only for the memory plan's meta-device trace: every chunk allocates alike, so computing the first ``n``
    keeps the allocation log the same at every batch size (the loss is then wrong; its sizes are right)."""
    _TRACE_CHUNKS[0] = n
    try:
        yield
    finally:
        _TRACE_CHUNKS[0] = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        valid = targets != -100
        count = valid.sum().clamp(min=1)  # no host sync
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 math for bf16/fp16 models, fp64 stays fp64
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        starts = range(0, n, chunk)
        for a in starts if _TRACE_CHUNKS[0] is None else starts[:_TRACE_CHUNKS[0]]:
            h, t, v = hidden[a:a + chunk], targets[a:a + chunk], valid[a:a + chunk]
            logits = h @ weight.t()  # as the model's lm_head, then upcast as the HF loss does
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lse = torch.logsumexp(logits, -1)
            picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            loss += torch.where(v, lse - picked, 0.0).sum()
            g = torch.softmax(logits, -1)  # d loss_sum / d logits = softmax - onehot, on the label tokens only
            g.scatter_add_(1, t.clamp(min=0)[:, None], -torch.ones_like(picked)[:, None])
            g.mul_(v[:, None].to(acc) / count)
            g = g.to(weight.dtype)
            grad_h[a:a + chunk] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.t().to(acc), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.weight_dtype = grad_w is not None, weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has_w else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` (mean over targets != -100) without the ``[N, vocab]`` logits.

    hidden ``[N, d]``, weight ``[vocab, d]``, targets long ``[N]`` -> fp32 scalar. ``chunk``: tokens per block
    (default: ``CHUNK_ELEMENTS / vocab``)."""
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1]):
        raise CTFastError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                          f"targets {tuple(targets.shape)} do not fit ([N, d], [vocab, d], [N])")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def causal_lm_loss(model: nn.Module, batch: dict):
    """The outputs of a transformers causal LM on ``batch`` (``input_ids``, ``attention_mask``, ``labels``)
    with ``outputs.loss`` computed by ``linear_cross_entropy`` (see the module docstring) and ``outputs.logits``
    empty. ``model`` may be a ``DistributedDataParallel`` wrapper.

    Example::

        loss = ct_fast.causal_lm_loss(model, batch).loss   # instead of model(**batch).loss
        loss.backward()
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    base, head = getattr(inner, "base_model", None), inner.get_output_embeddings()
    config = getattr(model, "config", None)
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
              if getattr(config, k, None) not in (None, 1, 1.0)]
    if scaled:
        raise CTFastError(f"fused_loss computes logits as hidden @ lm_head.weight^T, but this model also rescales "
                          f"them ({scaled[0]}={getattr(config, scaled[0])!r}): its loss would differ — use the "
                          "model's own loss (fused_loss=False)")
    if base is None or base is inner or head is None or getattr(head, "bias", None) is not None:
        raise CTFastError(f"fused_loss needs a causal LM with a base model and a bias-free lm_head; "
                          f"{type(inner).__name__} has neither: use fused_loss=False")
    labels = batch.get("labels")
    if labels is None:
        raise CTFastError("the training loss needs 'labels' in every batch (e.g. input_ids with -100 on padding)")
    seen = []
    handle = base.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                         else out.last_hidden_state))
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=labels.device))
    finally:
        handle.remove()
    hidden = seen[-1]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts label t + 1
    out["loss"] = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1))
    return out
