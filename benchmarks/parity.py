"""What a parity check costs and what it measures: every exact and approximate knob of the speed study,
each against its baseline, on this machine. Prints a table; not a test.

    .venv/bin/python benchmarks/parity.py                     # the embedded default config, 4 steps
    .venv/bin/python benchmarks/parity.py --classic           # the classic baseline (2+8 crops, 65536 prototypes)
    .venv/bin/python benchmarks/parity.py --bf16-width 16     # also bf16's band, on a width-16 ResNet-18

Knobs that only exist on a GPU (tf32) are checked too: on a CPU they change nothing, so they show 0.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.parity import DEFAULT_STEPS, QUANTITIES, check, trajectory
from trainer.table import format_table

KNOBS = [
    {"system.num_workers": 2},
    {"system.num_workers": 2, "system.prefetch_factor": 4, "system.persistent_workers": True},
    {"system.channels_last": True},
    {"optim.fused": True},
    {"system.grad_checkpointing": True},
    {"system.tf32": True},
]
CLASSIC = {"crops.local_crops": 8, "model.head.out_dim": 65536, "model.head.hidden_dim": 2048, "system.num_workers": 4}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--classic", action="store_true", help="the classic DINO baseline instead of the default config")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16-width", type=int, default=0, help="also measure bf16's band on a ResNet-18 of this width")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = TrainConfig.load()
    if args.classic:
        base = base.with_overrides({**CLASSIC, "system.num_workers": 0})
    print(f"# {cpu_model()}, {args.threads} thread(s), torch {torch.__version__}, {args.steps} steps per run")
    t0 = time.perf_counter()
    run = trajectory(base, args.steps)
    one_run = time.perf_counter() - t0
    reference = None
    rows = []
    for knob in KNOBS:
        result = check(base, base.with_overrides(knob), steps=args.steps, base=run, reference=reference)
        reference = result.reference
        worst = max(QUANTITIES, key=lambda q: result.worst[q]["ratio"])
        rows.append((", ".join(f"{k}={v}" for k, v in knob.items()), result.verdict, f"{result.max_diff:.1e}",
                     f"{result.worst[worst]['ratio']:.3f}", worst, f"{result.seconds:.1f}"))
    print(format_table(["knob", "verdict", "max rel. diff", "of tolerance", "closest quantity", "s"], rows))
    print(f"one run of {args.steps} steps (with build): {one_run:.1f} s; the round-off reference costs one more run")
    print("round-off reference (A with every batch reordered), worst step: "
          + ", ".join(f"{q} {max(reference[q]):.1e}" for q in QUANTITIES))
    if args.bf16_width:
        small = base.with_overrides({"model.width": args.bf16_width})
        bands: dict = {}
        result = check(small, small.with_overrides({"system.precision": "bf16"}), steps=args.steps, seeds=args.seeds,
                       bands=bands, progress=print)
        band = bands["system.precision=bf16"]
        print(f"bf16 band on width {args.bf16_width}, {args.seeds} seeds, worst step: "
              + ", ".join(f"{q} {max(band[q]):.1e}" for q in QUANTITIES))
        print(f"bf16 at seed {small.system.seed}: {result.line()} [{result.seconds:.1f} s]")


if __name__ == "__main__":
    main()
