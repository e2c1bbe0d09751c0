"""`system.host_allocator`: what glibc does with large CPU blocks, counted in page faults, not seconds.

With glibc as it comes, a block over its mmap threshold is mapped on `malloc` and unmapped on `free`, so
every reuse faults its pages in again; `retain` keeps freed memory in the process. The fault counts come
from the kernel (`ru_minflt`); each measurement runs in a fresh interpreter so no earlier test's
allocations (or allocator settings) count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_tiny import one_thread, tiny_config  # noqa: F401 (a fixture)

from trainer import engine
from trainer.allocator import host_allocator, set_host_allocator

pytestmark = pytest.mark.skipif(host_allocator() == "unsupported", reason="needs glibc (Linux) to set mallopt")

# Allocates, touches and frees a 64 MiB tensor (over glibc's largest mmap threshold) `n` times under each
# policy in turn, and prints the page faults those allocations cost once the policy's heap is warm.
PROBE = """
import json, resource, sys, threading
import torch
from trainer.allocator import set_host_allocator, host_allocator
def faults(n):
    for _ in range(8):  # the first allocations of a policy may fault in fresh pages either way: the heap grows
        torch.ones(16 * 2**20)  # until small blocks carved out of freed large ones no longer leave them too short
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(16 * 2**20)  # 64 MiB, written in full, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def in_thread(n):  # as Ray Tune runs a trial: in a thread started after the policy was set
    got = []
    t = threading.Thread(target=lambda: got.append(faults(n)))
    t.start()
    t.join()
    return got[0]
out = {}
for arg in sys.argv[1:]:
    policy, _, where = arg.partition(":")
    set_host_allocator(policy)
    out[arg] = [host_allocator(), in_thread(10) if where == "thread" else faults(10)]
print(json.dumps(out))
"""


def _probe(*policies: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *policies], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_retain_stops_large_blocks_faulting_in_again():
    out = _probe("system", "retain")
    pages = 64 * 2**20 // 4096  # one 64 MiB block in 4 KiB pages
    (now_s, system), (now_r, retain) = out["system"], out["retain"]
    assert (now_s, now_r) == ("system", "retain")
    assert system >= 10 * pages * 0.9  # under glibc as it comes every reuse faults the whole block in again
    assert retain < pages  # the freed block is reused in place: at most stray pages fault


def test_retain_holds_in_a_thread_started_afterwards():
    # as Ray Tune runs a trial; a thread's own glibc arena would map every large block afresh whatever the
    # mmap settings say, so `retain` limits glibc to one arena
    pages = 64 * 2**20 // 4096
    now, system = _probe("system:thread")["system:thread"]
    assert now == "system" and system >= 10 * pages * 0.9
    now, retain = _probe("retain:thread")["retain:thread"]
    # the thread's heap still grows now and then (0-2 blocks' pages over ten reuses measured), not every reuse
    assert now == "retain" and retain <= 3 * pages


def test_a_run_records_the_policy_and_each_run_peak_is_its_own_under_retain(one_thread):
    big = engine.train(tiny_config(budget__steps=2, eval__at_start=False, model__head__out_dim=65536,
                                   model__head__hidden_dim=512, model__head__bottleneck_dim=256))
    small = engine.train(tiny_config(budget__steps=2, eval__at_start=False))
    try:
        plain = engine.train(tiny_config(budget__steps=2, eval__at_start=False, system__host_allocator="system"))
        assert host_allocator() == "system"
    finally:
        set_host_allocator("retain")  # the default, as the other tests' runs leave it
    assert big.status == small.status == plain.status == "ok"
    assert (big.summary["host_allocator"], small.summary["host_allocator"], plain.summary["host_allocator"]) == \
        ("retain", "retain", "system")  # retain is the default
    # the big run's freed memory went back to the kernel before the small one started
    assert big.summary["peak_memory_mb"] > small.summary["peak_memory_mb"] + 100
    # the same arithmetic: the policy only decides where freed memory goes
    assert small.losses == plain.losses
