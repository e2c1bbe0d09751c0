"""`system.host_allocator`: the trainer's speed phase with glibc as it comes against `retain`.

Not a test. Each measurement is `trainer bench` in a fresh process (so the allocator starts as a user's
process does), the two policies alternating and each first in turn; the page faults and the kernel's CPU
time each process cost come from `getrusage(RUSAGE_CHILDREN)`. Prints a table per configuration: the
median throughput of each policy over the rounds, the median per-round ratio and its range.

    .venv/bin/python benchmarks/host_allocator.py                   # the classic baseline and a small config
    .venv/bin/python benchmarks/host_allocator.py --rounds 5 --config "crops.local_crops=2 optim.batch_size=128"
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import trainer_bench  # noqa: E402
from trainer.measure import cpu_model  # noqa: E402
from trainer.table import format_table  # noqa: E402

CONFIGS = {
    # the speed study's baseline (search_spaces/speed.yaml): the classic recipe
    "classic (2+8 crops, 65536, batch 64, 4 workers)": "crops.local_crops=8 model.head.out_dim=65536 "
                                                       "model.head.hidden_dim=2048 optim.batch_size=64 system.num_workers=4",
    # the kind of configuration the speed study picks: no local crops, a small head, a large batch
    "small (2+0 crops, 16384, batch 128, 1 worker)": "crops.local_crops=0 model.head.out_dim=16384 "
                                                     "model.head.hidden_dim=1024 optim.batch_size=128 system.num_workers=1",
}


def bench(overrides: str, policy: str) -> dict:
    """`trainer bench default ... --json` in a fresh process, with what it cost the kernel."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = trainer_bench(["default", *overrides.split(), f"system.host_allocator={policy}"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"img_s": result["throughput_img_s"], "peak_mb": result["peak_memory_mb"],
            "faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration")
    p.add_argument("--config", action="append", help="KEY=VALUE overrides of the default config, space-separated "
                   "(repeatable; default: the classic baseline and a small configuration)")
    args = p.parse_args(argv)
    configs = {c: c for c in args.config} if args.config else CONFIGS
    print(f"CPU: {cpu_model()}; trainer bench in a fresh process per measurement, {args.rounds} rounds", flush=True)
    rows = []
    for label, overrides in configs.items():
        got: dict[str, list[dict]] = {"system": [], "retain": []}
        for r in range(args.rounds):
            for policy in (("system", "retain") if r % 2 == 0 else ("retain", "system")):
                got[policy].append(bench(overrides, policy))
                m = got[policy][-1]
                print(f"  {label} round {r + 1} {policy:6s} {m['img_s']:7.1f} img/s  {m['faults']:>9,} page faults  "
                      f"{m['sys_s']:5.1f} s kernel  peak {m['peak_mb']:.0f} MiB", file=sys.stderr, flush=True)
        ratios = [r["img_s"] / s["img_s"] for r, s in zip(got["retain"], got["system"])]
        med = {k: {f: statistics.median(m[f] for m in v) for f in ("img_s", "faults", "sys_s", "peak_mb")}
               for k, v in got.items()}
        rows.append((label, f"{med['system']['img_s']:.1f}", f"{med['retain']['img_s']:.1f}",
                     f"x{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                     f"{med['system']['faults'] / 1e6:.2f}M / {med['retain']['faults'] / 1e6:.2f}M",
                     f"{med['system']['sys_s']:.1f} / {med['retain']['sys_s']:.1f}",
                     f"{med['system']['peak_mb']:.0f} / {med['retain']['peak_mb']:.0f}"))
    print(format_table(["config", "system img/s", "retain img/s", "retain / system (range)",
                        "page faults (system / retain)", "kernel s", "peak MiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
