"""Phase timings of a step, taken without stalling the device unless asked.

``PhaseTimer(device, enabled)`` accumulates seconds per phase. On CPU every kernel is synchronous, so
``perf_counter`` is exact and costs nothing: timings are always on. On CUDA timings are taken only when
``enabled`` (``CircuitTuner(..., profile=True)``), with CUDA events recorded on the current stream and read
once, in ``seconds()`` — no ``synchronize`` per phase or per tap. ``host_seconds()``: the host's own time in each
phase (issuing its work), beside the device's: a phase whose device time is about its host time kept the device
waiting for the host (host-bound), one whose device time is well above it ran ahead of the device.

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
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.active = enabled or not self.cuda
        self._host: dict[str, float] = {}  # host seconds per phase (on the CPU: the phases' times)
        self._events: dict[str, list] = {}

    @contextlib.contextmanager
    def span(self, phase: str):
        """Time the enclosed block into ``phase`` (nested spans each count their own time)."""
        if not self.active:
            yield
            return
        start = stop = None
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))  # the model's GPU, current or not
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[phase] = self._host.get(phase, 0.0) + time.perf_counter() - t0
            if stop is not None:
                stop.record(torch.cuda.current_stream(self.device))
                self._events.setdefault(phase, []).append((start, stop))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far: the device's on CUDA (one synchronisation, here), else the host's."""
        if not self.cuda:
            return dict(self._host)
        out = {}
        if self._events:
            torch.cuda.synchronize(self.device)
            for phase, pairs in self._events.items():
                out[phase] = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return out

    def host_seconds(self) -> dict[str, float]:
        """The host's seconds per phase so far (on the CPU the same as ``seconds()``)."""
        return dict(self._host)
