"""Timing built into the loop: the speed phase's clock, per-phase step timers, peak memory.

The speed phase is warm-up steps (not timed), then timed windows, then profiled steps. A window is
timed at its two ends only: one device synchronization before reading the clock at its start and one
at its end, nothing inside a step, so the window runs the loop exactly as `trainer train` does and
whatever overlap pinned memory, prefetching or CUDA graphs buy is in the throughput. The breakdown by
phase (data, augmentation, forwards, loss, backward, optimizer, EMA) needs a synchronization at every
phase boundary on a GPU, which would remove that overlap; it is therefore measured on separate
profiled steps after the windows and never mixed into the throughput.

Where the DataLoader has workers, the speed phase ends with the start of an epoch: the loader's iterator
is made afresh, as every epoch makes it (non-persistent workers are started again, by `fork` where that
is the start method, and the parent's first writes to memory it shares with them are copied), and the
steps after it are timed as one more window. Their time over the windows' step time is the epoch's start
cost, and `throughput_img_s` is the windows' median with that cost spread over the epoch's steps, as a
training run pays it; the windows alone would not see it, since the speed phase runs inside the first
epoch, whose workers started before the clock.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from trainer.events import PHASES


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is synchronous already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall time per phase of a step, for profiled steps only. On CUDA every region is
    synchronized, so a phase's time is the work it launched, not the time to queue it; on the CPU the
    work is synchronous already. When disabled it costs nothing and adds no synchronization."""

    def __init__(self, device: torch.device):
        self.device = device
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
        synchronize(self.device)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {p: 1000.0 * self.totals.get(p, 0.0) / max(1, steps) for p in PHASES}


class SpeedClock:
    """The speed phase of a run: `warmup` steps, `windows` timed windows of `window_steps` steps,
    `profile_steps` profiled steps, then `epoch_start_steps` steps timed after the caller made its loader's
    iterator afresh (0 where there are no workers to start; see the module docstring). Step indices are the
    run's optimizer steps."""

    def __init__(self, warmup: int, windows: int, window_steps: int, profile_steps: int, device: torch.device,
                 timer: PhaseTimer, images_per_step: int, epoch_start_steps: int = 0):
        self.warmup, self.n_windows, self.window_steps, self.profile_steps = warmup, windows, window_steps, profile_steps
        self.device, self.timer, self.images_per_step = device, timer, images_per_step
        self.epoch_start_steps = epoch_start_steps
        self.epoch_start_s: float | None = None  # seconds of the epoch-start probe, once measured
        self.windows: list[float] = []  # throughput of each window, images/s
        self.window_s: list[float] = []  # seconds of each window
        self.profile_s: list[float] = []  # seconds of each profiled step
        self.step_s: list[float] = []  # host seconds of each windowed step (a fallback for a cut-short phase)
        self._t_window = self._paused = 0.0
        self._t_epoch: float | None = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.n_windows * self.window_steps + self.profile_steps + self.epoch_start_steps

    @property
    def window_range(self) -> list[int]:
        """[first, last + 1) optimizer steps of the timed windows."""
        return [self.warmup, self.warmup + self.n_windows * self.window_steps]

    @property
    def profile_range(self) -> list[int]:
        """[first, last + 1) optimizer steps of the profiled steps."""
        return [self.window_range[1], self.window_range[1] + self.profile_steps]

    @property
    def epoch_start_range(self) -> list[int]:
        """[first, last + 1) optimizer steps timed after the loader's iterator was made afresh."""
        return [self.profile_range[1], self.total_steps]

    def opens_epoch_start(self, step: int) -> bool:
        """Whether the caller must make the loader's iterator afresh (after calling `open_epoch_start`) before `step`."""
        return self.epoch_start_steps > 0 and step == self.epoch_start_range[0]

    def open_epoch_start(self) -> None:
        """Start the epoch-start probe's clock (synchronized), right before the loader's iterator is made."""
        synchronize(self.device)
        self._t_epoch, self._paused = time.perf_counter(), 0.0

    def _window_index(self, step: int) -> int | None:
        k = step - self.warmup
        return k if 0 <= k < self.n_windows * self.window_steps else None

    def before_step(self, step: int) -> None:
        """Open a window (synchronize, read the clock) when `step` starts one; time phases on profiled steps."""
        k = self._window_index(step)
        self.timer.enabled = self.profile_range[0] <= step < self.profile_range[1]
        if k is not None and k % self.window_steps == 0:
            synchronize(self.device)
            self._t_window, self._paused = time.perf_counter(), 0.0

    def after_step(self, step: int, host_s: float) -> float | None:
        """Close a window when `step` ends one (synchronize, read the clock); returns its throughput."""
        k = self._window_index(step)
        if self.timer.enabled:
            self.profile_s.append(host_s)
        if step == self.total_steps - 1 and self._t_epoch is not None:
            synchronize(self.device)
            self.epoch_start_s = time.perf_counter() - self._t_epoch - self._paused
        if k is None:
            return None
        self.step_s.append(host_s)
        if (k + 1) % self.window_steps:
            return None
        synchronize(self.device)
        seconds = time.perf_counter() - self._t_window - self._paused
        self.window_s.append(seconds)
        self.windows.append(self.window_steps * self.images_per_step / seconds)
        return self.windows[-1]

    def set_aside(self, since: float) -> float:
        """Leave the non-training work (an evaluation, a checkpoint) since `since` (a `time.perf_counter()`
        reading) out of an open window; its seconds, for the caller's own intervals."""
        seconds = time.perf_counter() - since
        self._paused += seconds
        return seconds

    @property
    def done(self) -> bool:
        return (len(self.windows) == self.n_windows and len(self.profile_s) >= self.profile_steps
                and (self.epoch_start_s is not None or not self.epoch_start_steps))

    def epoch_start_cost(self, step_s: float) -> float | None:
        """Seconds an epoch's start adds: the probe's time over `epoch_start_steps` steps of `step_s` (the
        windows' time per step), at least 0; None when it was not measured."""
        if self.epoch_start_s is None:
            return None
        return max(0.0, self.epoch_start_s - self.epoch_start_steps * step_s)


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak memory afresh, so a process that runs several (`tuner confirm`, a Ray actor
    reused between trials, a benchmark) reports each run's own peak, not the largest so far. On Linux
    the resident set's high-water mark is reset through /proc/self/clear_refs; where that is not
    possible the CPU figure stays the process's peak (`peak_memory_mb` then reads `ru_maxrss`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak device memory on CUDA, else the process's peak resident set size, in MiB, since the last
    `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0, "cpu_peak_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "cpu_peak_rss"


def summarize_windows(throughputs: list[float]) -> tuple[float, float]:
    """Median throughput and relative spread ((max - min) / median) over timed windows."""
    median = statistics.median(throughputs)
    spread = (max(throughputs) - min(throughputs)) / median if median > 0 else 0.0
    return median, spread


def cpu_model() -> str:
    """The CPU's model name and its widest vector instructions, e.g. `AMD EPYC (AVX-512, BF16)` (written
    beside every figure: speedups hold only on the machine measured). The instructions are there because a
    virtual machine's model name may not tell them apart (`AMD EPYC` with AVX2 or with AVX-512 and bf16),
    and they decide, for one, whether bf16 runs about 30x slower than fp32 or is a winning knob."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith(("flags", "Features"))), set())
    isa = vector_isa(flags)
    return f"{name} ({isa})" if isa else name


def vector_isa(flags: set[str]) -> str:
    """The widest x86 vector instructions in a /proc/cpuinfo `flags` set and its native bf16 arithmetic:
    `AVX-512, AMX, BF16`, `AVX-512, BF16`, `AVX-512`, `AVX2`, or `` (none of these, or not x86)."""
    parts = ["AVX-512"] if "avx512f" in flags else ["AVX2"] if "avx2" in flags else []
    if "amx_bf16" in flags:
        parts.append("AMX")
    if parts and ({"avx512_bf16", "amx_bf16"} & flags):
        parts.append("BF16")
    return ", ".join(parts)


def break_even_steps(compile_s: float, eager_step_s: float, compiled_step_s: float) -> float | None:
    """After how many optimizer steps a compiled run, compile time included, is ahead of running eager
    (None: the compiled step is not faster, so never)."""
    saved_per_step = eager_step_s - compiled_step_s
    return compile_s / saved_per_step if saved_per_step > 0 else None
