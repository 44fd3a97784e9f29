"""Forward capture and backward gradient taps on unmodified HF modules (hooks only, no model rewrite).

``Capture`` registers, for one forward pass:
- *store* hooks that keep (detached) a module's input or output: per-head ``z`` (output-projection
  input), MLP activations or MLP output, and the residual stream read by each norm;
- *tap* hooks that route a module's input or output through ``_Tap``, an identity autograd function
  whose backward hands the incoming gradient to a callback and passes it on unchanged. Every tap also
  takes a scalar ``anchor`` that requires grad, so ``torch.autograd.grad(metric, anchor, allow_unused=True)``
  runs exactly the backward that reaches all taps and computes no weight gradient. The anchor's own
  gradient is never formed (the taps return none for it): the engine runs a node because of the graph's
  edges, not the values sent along them, and a zero per tap would cost two launches each.

Example::

    with Capture(model, store=[("model.layers.0.self_attn.o_proj", "input")],
                 taps=[("model.norm", "input")], on_grad=print) as cap:
        out = model(input_ids)
    cap.stored[("model.layers.0.self_attn.o_proj", "input")]   # [B, T, H * d_head]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Key = tuple[str, str]  # (module name, "input" | "output")


class _Tap(torch.autograd.Function):
    """Identity in forward; in backward calls ``sink(key, grad)`` and returns the gradient unchanged."""

    @staticmethod
    def forward(ctx, x, anchor, key, sink):
        ctx.key, ctx.sink = key, sink
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(ctx.key, grad)
        return grad, None, None, None  # the anchor only routes the backward here: no gradient (no launches)


def _first_tensor(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _replace_first(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    k = next(iter(kwargs))
    return args, {**kwargs, k: value}


class Capture:
    """Context manager that stores and taps module inputs/outputs during one or more forwards.

    ``store``: keys whose tensors are kept detached in ``self.stored`` (a second forward overwrites).
    ``taps``: keys whose gradients are sent to ``on_grad(key, grad)`` during backward.
    ``anchor``: the scalar every tap takes (``requires_grad``); by default a fresh one on each ``__enter__``.
    ``stack``: stored keys (in order) whose tensors, all of one shape and dtype, are copied into the slots of one
    buffer ``self.stack_buffer [len(stack), *shape]`` as they come (``stored[key]`` is then its slot): tensors the
    scorer reads together, as one matrix, without gathering them per token chunk. ``self.stacked``: the keys that
    landed in it (a tensor of another shape or dtype is stored as it is).
    """

    def __init__(self, model: nn.Module, store=(), taps=(), on_grad: Callable | None = None,
                 anchor: torch.Tensor | None = None, stack=(), modules: dict | None = None):
        self.model, self._modules = model, modules  # modules: the model's named_modules, when the caller has them
        self.stack_keys = {key: i for i, key in enumerate(stack)}
        self.stack_buffer: torch.Tensor | None = None
        self.stacked: set = set()
        self.store_keys = set(store) | set(stack)
        self.tap_keys = set(taps)
        self.on_grad = on_grad
        self.stored: dict[Key, torch.Tensor] = {}
        self.anchor = anchor  # None: a fresh one per use
        self._own_anchor = anchor is None
        self._handles = []
        self.tapped: set = set()  # keys whose tap was applied (under autograd)

    def __enter__(self):
        modules = self._modules if self._modules is not None else dict(self.model.named_modules())
        names = {k[0] for k in self.store_keys | self.tap_keys}
        missing = sorted(n for n in names if n not in modules)
        if missing:
            raise KeyError(f"modules not found in {type(self.model).__name__}: {missing}")
        if self._own_anchor:
            param = next(self.model.parameters())
            self.anchor = torch.zeros((), device=param.device, dtype=param.dtype, requires_grad=bool(self.tap_keys))
        for name in names:
            m = modules[name]
            if (name, "input") in self.store_keys | self.tap_keys:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            if (name, "output") in self.store_keys | self.tap_keys:
                self._handles.append(m.register_forward_hook(self._post_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _process(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        if key in self.stack_keys:
            self.stored[key] = self._stack(key, x.detach())
        elif key in self.store_keys:
            self.stored[key] = x.detach()
        if key in self.tap_keys and torch.is_grad_enabled():
            x = _Tap.apply(x, self.anchor, key, self._dispatch)
            self.tapped.add(key)
        return x

    def _stack(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into its slot of the stack buffer (allocated at the first stacked tensor: the captures it
        replaces would hold as much by the end of the forward), or ``x`` itself if it does not fit the buffer."""
        buf = self.stack_buffer
        if buf is None:
            buf = self.stack_buffer = x.new_empty(len(self.stack_keys), *x.shape)
        if x.shape != buf.shape[1:] or x.dtype != buf.dtype:
            self.stacked.discard(key)
            return x
        slot = buf[self.stack_keys[key]]
        slot.copy_(x)
        self.stacked.add(key)
        return slot

    def _dispatch(self, key: Key, grad: torch.Tensor):
        if self.on_grad is not None:
            self.on_grad(key, grad)

    def _pre_hook(self, name):
        key = (name, "input")

        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            y = self._process(key, x)
            return None if y is x else _replace_first(args, kwargs, y)

        return hook

    def _post_hook(self, name):
        key = (name, "output")

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            y = self._process(key, x)
            if y is x:
                return None
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

        return hook
