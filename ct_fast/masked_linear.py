"""The thin autograd layer: linear layers whose backward computes the weight gradient of circuit rows only.

``MaskedLinears(model, graph)`` swaps, for its duration, the ``forward`` of every module that owns circuit
parameters (HF ``nn.Linear`` and GPT-2 ``Conv1D``; the model's structure is untouched) for
``_MaskedLinearFn``: the same output, a full input gradient, and a weight/bias gradient restricted to
the selected rows (output features) or columns (input features), written compactly as ``[k, other]``
in the selection's row order — frozen blocks cost neither FLOPs nor bytes. Two modes:

- *direct* (the selection is known before the backward: reused circuits, outcome-metric training pass):
  compact gradients are computed in the backward;
- *deferred* (faithful process mode, where one backward both scores edges and trains): per linear, the
  backward keeps whichever is smaller — ``(input, grad_output)``, or the dense fp32 weight gradient (the
  smaller one once a batch has more tokens than about ``in * out / (in + out)``) — and
  ``finish(selection)`` turns it into the compact gradients of the selection afterwards. With a
  ``pruner`` (``ct_fast.pruning``: one backward, one process) a linear keeps ``(input, grad_output)`` only
  until ``resolve`` names its candidate rows, then computes the gradient of those rows alone.

Each function also takes a scalar ``anchor`` so ``torch.autograd.grad(loss, [anchor], allow_unused=True)`` runs
exactly the backward through all of them without touching frozen parameters (embeddings, norms, unembedding);
the anchor itself gets no gradient (see ``ct_fast.capture``).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .errors import CTFastError
from .graph import ComputationGraph


class _MaskedLinearFn(torch.autograd.Function):
    """``y = x @ W^T + b`` (linear) or ``x @ W + b`` (conv1d); backward: dx, and dW/db via ``owner``."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, owner, name, conv1d):
        ctx.owner, ctx.name, ctx.conv1d = owner, name, conv1d
        ctx.save_for_backward(x, weight)
        return _plain_linear(x, weight, bias, conv1d)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight if not ctx.conv1d else grad_out @ weight.t()
        ctx.owner._on_backward(ctx.name, x, grad_out)
        return grad_x, None, None, None, None, None, None  # no anchor gradient: it only routes the backward


def _plain_linear(x, weight, bias, conv1d: bool):
    """``_MaskedLinearFn.forward``'s output without the function: autograd's own linear (C++), input gradient only
    (``weight``/``bias`` detached)."""
    if conv1d:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
        return out.view(*x.shape[:-1], weight.shape[1])
    return F.linear(x, weight, bias)


class MaskedLinears:
    """Context manager installing ``_MaskedLinearFn`` on the graph's tunable linear modules.

    ``selection``: ``{param: ParamSelection}`` for direct mode, ``None`` for deferred mode, or set
    ``active=False`` to make backwards record nothing (an attribution-only backward). With ``plain_outside`` a
    module the selection gives no rows runs a plain linear of its detached parameters (``_plain_linear``): no
    Python autograd function (on a GPU a reused-circuit step was host-bound on them: ~61 ms of kernels in a 78 ms
    step at llama-1B), and no backward at all below the circuit's first linear — nothing there requires a gradient.
    ``grad_rows``: ``{param: compact fp32 gradient}`` accumulated over backwards (for ``set_grad_rows``).
    ``stream``: in direct mode, called with each parameter whose compact gradient is final — every call its
    module made since the model's last forward began (``calls``, reset by ``new_forward``) has had its
    backward — so several ranks can start averaging it while the backward goes on.
    """

    def __init__(self, model: nn.Module, graph: ComputationGraph, anchor: torch.Tensor | None = None):
        self.model, self.graph = model, graph
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        names = sorted({p.rsplit(".", 1)[0] for p in graph.tunable_params})
        self.modules = {n: modules[n] for n in names}
        self.weight = {n: params[f"{n}.weight"] for n in names}
        self.bias = {n: params.get(f"{n}.bias") for n in names}
        self.conv1d = {n: type(modules[n]).__name__ == "Conv1D" for n in names}
        param = next(model.parameters())
        self.anchor = anchor if anchor is not None else torch.zeros((), device=param.device, dtype=param.dtype,
                                                                    requires_grad=True)
        self._plain: frozenset = frozenset()  # modules running plain linears (plain_outside)
        self._forwards: dict | None = None  # name -> the bound forward __enter__ installs
        self.selection: dict | None = None
        self.active = True
        self.saved: dict[str, list] = {}  # deferred: name -> [(x, grad_out), ...]
        self.dense: dict[str, list] = {}  # deferred: name -> [dW [out, in] fp32, db [out] fp32 or None]
        self.pruner = None  # deferred: a CandidatePruner deciding candidate rows during the backward
        self.candidates: dict[str, dict] = {}  # deferred + pruner: name -> {param: ParamSelection} candidate rows
        self.candidate_rows: dict[torch.Tensor, torch.Tensor] = {}  # ... and their compact fp32 gradients
        self.grad_rows: dict[torch.Tensor, torch.Tensor] = {}
        self.touched = False  # a backward reached a masked linear since the last clear()
        self.calls: dict[str, int] = {}  # grad-enabled calls per module since the model's last forward began
        self.stream = None
        self.refuse: str | None = None  # set: a backward reaching a masked linear raises this (a step concluded)
        self._indexed: dict[tuple, torch.Tensor] = {}  # (ParamSelection, device) -> its row index (_index)

    def plain_outside(self, selection: dict | None):
        """From the next forward on, modules ``selection`` gives no rows run plain linears (None: every module the
        function). Only for a selection known before the step's forwards and kept through its backwards (reused and
        lagged circuits): a forward recomputed in the backward (activation checkpointing, two_pass's retained graph)
        must make the same choice as the original. Unless it gives no module any rows: then every module keeps the
        function, so the backward still reaches one (``touched``)."""
        if selection is None:
            self._plain = frozenset()
            return
        plain = frozenset(n for n in self.modules if not any(
            p is not None and p.requires_grad and getattr(selection.get(p), "count", 0)
            for p in (self.weight[n], self.bias[n])))
        self._plain = frozenset() if len(plain) == len(self.modules) else plain

    def __enter__(self):
        if self._forwards is None:  # made once: __enter__ runs every step
            self._forwards = {name: types.MethodType(self._forward_of(name), m) for name, m in self.modules.items()}
        for name, m in self.modules.items():
            m.forward = self._forwards[name]
        return self

    def __exit__(self, *exc):
        for m in self.modules.values():
            m.__dict__.pop("forward", None)  # the class's forward again
        self.clear()
        return False

    def clear(self):
        """Drop what backwards recorded (kept pairs, dense and compact gradients)."""
        self.saved.clear()
        self.dense.clear()
        self.candidates.clear()
        self.candidate_rows = {}
        self.grad_rows = {}
        self.touched = False
        self.calls.clear()
        self.stream = None
        self.refuse = None

    def new_forward(self):
        """The model's forward begins: count this forward's module calls afresh."""
        self.calls.clear()

    def _forward_of(self, name):
        owner = self

        def forward(module, x):
            if not torch.is_grad_enabled() or module is not owner.modules[name]:  # no_grad, or a deepcopy
                return type(module).forward(module, x)
            # the parameters enter detached: no autograd edge reaches them (their dW is ours to compute); read from
            # the module, which under FSDP2 holds the unsharded tensors during its forward and backward
            weight, bias, device = module.weight.detach(), module.bias, x.device.type
            bias = None if bias is None else bias.detach()
            if name in owner._plain:  # no rows selected here: the input gradient is autograd's to compute
                return _plain_linear(x, weight, bias, owner.conv1d[name])
            owner.calls[name] = owner.calls.get(name, 0) + 1
            if torch.is_autocast_enabled(device):  # as autocast runs linear: operands in its dtype, saved so
                dtype = torch.get_autocast_dtype(device)
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
                with torch.autocast(device, enabled=False):
                    return _MaskedLinearFn.apply(x, weight, bias, owner.anchor, owner, name, owner.conv1d[name])
            return _MaskedLinearFn.apply(x, weight, bias, owner.anchor, owner, name, owner.conv1d[name])

        return forward

    # ---- backward side ----
    def _on_backward(self, name: str, x: torch.Tensor, grad_out: torch.Tensor):
        if self.refuse is not None:
            raise CTFastError(self.refuse)
        self.touched = True
        if not self.active:
            return
        if self.selection is not None:
            self._accumulate(name, x, grad_out, self.selection)
            if self.stream is not None:
                self.calls[name] = left = self.calls.get(name, 0) - 1
                if left == 0:
                    for p in (self.weight[name], self.bias[name]):
                        if p is not None and p in self.grad_rows:
                            self.stream(p)
        elif name in self.candidates:
            self._accumulate(name, x, grad_out, self.candidates[name], self.candidate_rows)
        elif self.pruner is None and (name in self.dense or self._keep_dense(name, [(x, grad_out)])):
            self._add_dense(name, x, grad_out)
        else:  # (with a pruner: until its nodes are decided)
            pairs = self.saved.setdefault(name, [])
            pairs.append((x, grad_out))
            if self.pruner is None and len(pairs) > 1 and self._keep_dense(name, pairs):
                for x, grad_out in pairs:  # several backwards (accumulation): keep their sum, not each pair
                    self._add_dense(name, x, grad_out)
                del self.saved[name]

    def resolve(self, name: str, candidates: dict):
        """Deferred mode with a pruner: only ``candidates`` (``{param: ParamSelection}``) of linear ``name`` can be
        in this step's circuit. Their gradient is computed from what was kept (and, from now on, in the backward);
        the rest is never computed."""
        self.candidates[name] = candidates
        for x, grad_out in self.saved.pop(name, ()):
            self._accumulate(name, x, grad_out, candidates, self.candidate_rows)

    @staticmethod
    def _kept_bytes(w: torch.Tensor, tokens: int, element_size: int) -> tuple[int, int]:
        """Deferred mode's two ways to keep a linear's gradient: ``(dense fp32 dW, (x, grad_out))`` bytes."""
        return 4 * w.numel(), tokens * sum(w.shape) * element_size

    def _keep_dense(self, name: str, pairs: list) -> bool:
        """Deferred mode: is the dense fp32 weight gradient of linear ``name`` smaller than the ``(x, grad_out)``
        ``pairs`` of its calls? (A frozen weight's is nothing: only its bias's gradient is kept.)"""
        w = self.weight[name]
        if not w.requires_grad:
            return True
        tokens = sum(x.numel() // x.shape[-1] for x, _ in pairs)
        dense, pair = self._kept_bytes(w, tokens, pairs[0][0].element_size())
        return dense < pair

    def deferred_bytes(self, tokens: int, element_size: int) -> int:
        """Bytes deferred mode keeps until selection for a batch of ``tokens`` (per linear: the smaller of
        ``(x, grad_out)`` and the dense fp32 weight gradient) — what ``memory_mode="auto"`` weighs."""
        return sum(min(self._kept_bytes(w, tokens, element_size)) for w in self.weight.values() if w.requires_grad)

    def _add_dense(self, name: str, x: torch.Tensor, grad_out: torch.Tensor):
        """Add this call's dense gradients to what the linear keeps: ``[dW fp32 [out, in] or None (frozen weight),
        db or None (no or frozen bias)]``."""
        w, b = self.weight[name], self.bias[name]
        train_b = b is not None and b.requires_grad
        if not (w.requires_grad or train_b):
            return
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        dw = ops.masked_weight_grad(x2, g2, None, True) if w.requires_grad else None  # feature-major for Conv1D too
        db = ops.masked_bias_grad(g2, None) if train_b else None
        prev = self.dense.get(name)
        if prev is None:
            self.dense[name] = [dw, db]
        else:
            for kept, new in zip(prev, (dw, db)):
                if new is not None:
                    kept.add_(new)

    def finish(self, selection: dict):
        """Deferred mode: compute the compact gradients of ``selection`` from what the backward kept."""
        if self.pruner is not None:  # the last scored span's decisions
            self.pruner.settle()
        for name, candidates in self.candidates.items():
            for p in (self.weight[name], self.bias[name]):
                sel = selection.get(p)
                if sel is None or not sel.count:
                    continue
                if p not in candidates:
                    raise AssertionError(f"pruning dropped {name}'s gradient, but the circuit selects its rows")
                rows = candidates[p].positions_of(sel)  # (raises if the circuit selects a row pruning dropped)
                g = self.candidate_rows.get(p)
                if g is not None:  # (None: the linear had no backward)
                    self._add(p, g if rows.full else g.index_select(0, rows.index(g.device)))
        for name, pairs in self.saved.items():
            for x, grad_out in pairs:
                self._accumulate(name, x, grad_out, selection)
        for name, (dw, db) in self.dense.items():
            weight, bias = self._targets(name, selection, (dw if dw is not None else db).device)
            if weight is not None and dw is not None:
                index, out_features = weight
                g = dw if out_features else dw.t()
                self._add(self.weight[name], g if index is None else g.index_select(0, index))
            if bias is not None and db is not None:
                self._add(self.bias[name], db if bias[0] is None else db.index_select(0, bias[0]))
        self.saved.clear()
        self.dense.clear()
        self.candidates.clear()
        self.candidate_rows = {}

    def _targets(self, name: str, selection: dict, device) -> tuple:
        """What ``selection`` asks of linear ``name``: ``((index, out_features) or None, (index,) or None)`` for
        its weight and bias (index None: every row); frozen parameters ask nothing."""
        w, b = self.weight[name], self.bias[name]
        sel = selection.get(w) if w.requires_grad else None
        sel_b = selection.get(b) if b is not None and b.requires_grad else None
        # output features are weight rows for nn.Linear, columns for Conv1D
        weight = None if sel is None else (self._index(sel, device), (sel.dim == 0) != self.conv1d[name])
        bias = None if sel_b is None else (self._index(sel_b, device),)
        return weight, bias

    def _index(self, sel, device) -> torch.Tensor | None:
        """``sel``'s rows as a long tensor on ``device`` (None: every row), built once per selection value — a reused
        circuit's steps, and the parameters a new circuit selects as before, build none (an ``arange`` per range
        and a ``cat`` each) — and kept for a few circuits' worth of selections."""
        if sel.full:
            return None
        key = (sel, str(device))
        index = self._indexed.get(key)
        if index is None:
            if len(self._indexed) >= 8 * len(self.modules):  # circuits drift: keep the cache bounded
                self._indexed.clear()
            index = self._indexed[key] = sel.index(device)
        return index

    def _accumulate(self, name, x, grad_out, selection, into: dict | None = None):
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        weight, bias = self._targets(name, selection, x.device)
        if weight is not None:
            self._add(self.weight[name], ops.masked_weight_grad(x2, g2, *weight), into)
        if bias is not None:
            self._add(self.bias[name], ops.masked_bias_grad(g2, bias[0]), into)

    def _add(self, p, g, into: dict | None = None):
        into = self.grad_rows if into is None else into
        prev = into.get(p)
        into[p] = g if prev is None else prev.add_(g)

    def take_grad_rows(self) -> dict:
        out, self.grad_rows = self.grad_rows, {}
        return out

