"""Timing built into the loop: per-phase step timers, windowed throughput, peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict

import torch

from trainer.events import PHASES


class PhaseTimer:
    """Accumulates wall time per phase of a step. On CUDA every region is synchronized, so a phase's
    time is the work it launched, not the time to queue it; on the CPU the work is synchronous already.
    When disabled it costs nothing and adds no synchronization (used after the speed phase)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark (or `start`) to `phase`."""
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.totals[phase] += now - self._last
            self._last = now

    def reset(self) -> None:
        self.totals.clear()

    def _sync(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {p: 1000.0 * self.totals.get(p, 0.0) / max(1, steps) for p in PHASES}


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak device memory on CUDA, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "cpu_peak_rss"


def summarize_windows(throughputs: list[float]) -> tuple[float, float]:
    """Median throughput and relative spread ((max - min) / median) over timed windows."""
    median = statistics.median(throughputs)
    spread = (max(throughputs) - min(throughputs)) / median if median > 0 else 0.0
    return median, spread
