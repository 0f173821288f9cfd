"""Per-phase memory and time trace: CUDA allocated/peak/reserved (peak reset per phase), host RSS."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class TracePoint:
    phase: str
    t: float                            # seconds since the tracer started
    device_allocated_bytes: int | None  # None on CPU
    device_peak_bytes: int | None       # peak since the previous mark
    device_reserved_bytes: int | None
    host_rss_bytes: int


@dataclass
class MemoryTracer:
    """Call mark(phase) at the end of each phase. Cheap: a few counters, no synchronisation
    beyond what torch.cuda.memory_allocated does."""

    device: torch.device
    enabled: bool = True
    trace: list[TracePoint] = field(default_factory=list)
    peak_host_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self._process = psutil.Process()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def mark(self, phase: str) -> None:
        rss = self._process.memory_info().rss
        self.peak_host_rss_bytes = max(self.peak_host_rss_bytes, rss)
        alloc = peak = reserved = None
        if self._cuda:
            alloc = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            self.peak_device_bytes = max(self.peak_device_bytes or 0, peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.enabled:
            self.trace.append(TracePoint(phase, time.perf_counter() - self._t0, alloc, peak,
                                         reserved, rss))

    def sample(self) -> None:
        """Update the host peak between marks (called at chunk boundaries)."""
        self.peak_host_rss_bytes = max(self.peak_host_rss_bytes, self._process.memory_info().rss)
