"""What the host's C allocator does with large blocks (`system.host_allocator`).

PyTorch takes CPU tensors from the C library's `malloc`. glibc serves a block larger than its mmap
threshold (at most 32 MiB) with a fresh `mmap` and gives it back to the kernel on `free`, so a training
step whose activations, logits and gradients are that large maps, faults in page by page, zeroes and
unmaps the same hundreds of megabytes on every step. How much that costs depends on the machine (a virtual
machine pays more per page fault than bare metal): on a 2-core AMD EPYC VM, 27% of the classic recipe's
step, which also made that configuration's throughput swing with the host's state more than others'.

- ``retain`` (the trainer's default): no block is served by `mmap` and freed memory is not trimmed back to
  the kernel, so a step reuses the pages the previous step freed. glibc is also held to one arena: a
  thread's own arena maps large blocks whatever the settings, and a run in such a thread (as a Ray Tune
  trial is) measured the classic recipe 23-39% slower than in the main thread. The limit only keeps
  threads that start later on the main heap while no other arena exists yet, so the tuner starts its
  Ray workers with MALLOC_ARENA_MAX=1, which holds from their first allocation. It changes no
  arithmetic; the process holds its peak memory while it runs (a run's peak grows by a few percent:
  where blocks land in the heap).
- ``system``: glibc as it comes (a process this module never changed is left alone).

The setting belongs to the process and outlives a run, so each run sets it on its way in, and first hands
what an earlier run left free back to the kernel (`malloc_trim`), so each run's peak memory is its own.
Going back from ``retain`` to ``system`` in one process sets the values glibc's dynamic threshold reaches
in a long-running process (32 MiB mmap threshold, 64 MiB trim threshold), but blocks already in the heap
keep serving large requests without faults, so such a run is not what a fresh process would measure:
that is why this is not a knob a study varies (trainer/knobs.py), and every run of a study shares one.
Elsewhere than glibc (macOS, musl) both leave the allocator alone and `host_allocator()` says `unsupported`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from typing import Literal

Policy = Literal["system", "retain"]

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
# One arena: a thread gets an arena of its own at its first allocation, whose heaps are at most 64 MiB, so
# a larger block there is mapped whatever M_MMAP_MAX says; with one arena every thread started afterwards
# (Ray Tune runs each trial in a new thread) allocates from the main heap, which keeps freed blocks.
_RETAIN = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
# glibc's defaults once its dynamic mmap threshold has met a block of its maximum (DEFAULT_MMAP_THRESHOLD_MAX),
# and its default arena limit (8 per core on 64-bit)
_SYSTEM = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 64 * 2**20),
           (M_ARENA_MAX, 8 * (os.cpu_count() or 1)))

_state: dict[str, str] = {"policy": "system"}


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def host_allocator() -> str:
    """The policy in effect in this process: `system`, `retain`, or `unsupported` (not glibc)."""
    return _state["policy"] if _glibc() is not None else "unsupported"


def set_host_allocator(policy: Policy) -> str:
    """Put this process's allocator under `policy`; returns what is in effect (see `host_allocator`)."""
    libc = _glibc()
    if libc is None:
        return "unsupported"
    if policy != _state["policy"]:
        for param, value in (_RETAIN if policy == "retain" else _SYSTEM):
            if libc.mallopt(param, value) != 1:
                raise RuntimeError(f"mallopt({param}, {value}) refused")
        _state["policy"] = policy
    # what an earlier run left free goes back to the kernel, so this run's peak memory is its own
    libc.malloc_trim(0)
    return policy
