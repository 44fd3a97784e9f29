"""Phase timings of a step, taken without stalling the device unless asked.

``PhaseTimer(device, enabled)`` accumulates seconds per phase. On CPU every kernel is synchronous, so
``perf_counter`` is exact and costs nothing: timings are always on. On CUDA timings are taken only when
``enabled`` (``CircuitTuner(..., profile=True)``), with CUDA events recorded on the current stream and read
once, in ``seconds()`` — no ``synchronize`` per phase or per tap.

Example::

    timer = PhaseTimer(device, enabled=True)
    with timer.span("forward"):
        out = model(**batch)
    timer.seconds()        # {"forward": 0.012}
"""

from __future__ import annotations

import contextlib
import time

import torch


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.active = enabled or not self.cuda
        self._host: dict[str, float] = {}
        self._events: dict[str, list] = {}

    @contextlib.contextmanager
    def span(self, phase: str):
        """Time the enclosed block into ``phase`` (nested spans each count their own time)."""
        if not self.active:
            yield
            return
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                stop.record()
                self._events.setdefault(phase, []).append((start, stop))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[phase] = self._host.get(phase, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (on CUDA: one synchronisation, here)."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for phase, pairs in self._events.items():
                out[phase] = out.get(phase, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return out
