"""Does the kNN check have power? Harmful and harmless method changes against the baseline, over seeds.

Not a test. From the built-in warm start (`model.init: supervised`, trained on the embedded digits
canvases and cached), each variant trains the default recipe for `--steps` optimizer steps at each of
`--seeds` seeds, one thread per run, `--jobs` runs side by side (the numbers here are kNN, not speed, so
runs may share the machine). Then it applies the study's own rule: the tolerance is the larger of
`--tolerance` and the spread (max - min) of the baseline's kNN over its seeds, and a variant's run is
outside when its kNN is below the baseline's mean by more than that. Power means: the baseline's kNN moves
beyond its spread at every seed, harmful variants are outside at >= 4 of 5 seeds, harmless ones inside at
>= 4 of 5 (the quality issue's definition). Both backbones are judged: the teacher (DINO's evaluation)
and the student.

    python benchmarks/knn_power.py                          # 7 variants x 5 seeds x 200 steps
    python benchmarks/knn_power.py --out runs/ --table-only # print the table from finished runs

Runs are written to `--out` as JSON, one per (variant, seed); a run already there is not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.table import format_table  # noqa: E402

BASE = ["data.canvases_per_digit=4", "model.init=supervised", "eval.bn_stats=precise"]

#: name -> (kind, overrides, how we know) — harmful changes are ones whose harm is known independently of
#: this check: by DINO's own ablations, or by what they do to the optimizer.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "baseline": ("baseline", [], "the default recipe, 2+2 crops, 4096 prototypes"),
    "fused AdamW": ("harmless", ["optim.fused=true"], "same update, another kernel (round-off only)"),
    "out_dim 8192": ("harmless", ["model.head.out_dim=8192"], "DINO: 4096-65536 prototypes within ~1 point"),
    "local crops 4": ("harmless", ["crops.local_crops=4"], "DINO: more local crops help, never hurt"),
    "lr x20": ("harmful", ["optim.lr=1e-2"], "overshoots: the student's kNN falls steadily"),
    "no sharpening": ("harmful", ["loss.teacher_temp=0.1", "loss.warmup_teacher_temp=0.1"],
                      "teacher temp = student temp; DINO: collapses without sharpening"),
    "student copy teacher": ("harmful", ["optim.momentum_teacher=0.0"],
                             "teacher = student each step; DINO: collapses without the momentum teacher"),
}

ONE_RUN = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from trainer.config import TrainConfig
from trainer.engine import train
out, overrides = sys.argv[1], sys.argv[2:]
cfg = TrainConfig.load(None, overrides)
evals = []
def cb(event, payload):
    if event == "eval":
        evals.append({k: payload.get(k) for k in ("step", "knn_top1", "student_knn_top1", "eval_s")})
t = time.time()
r = train(cfg, callback=cb)
json.dump({"overrides": overrides, "status": r.status, "evals": evals, "wall_s": time.time() - t}, open(out, "w"))
"""


def run_one(out: Path, overrides: list[str]) -> None:
    if out.exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", ONE_RUN, str(out), *overrides], env=env, stdout=fh, stderr=fh, check=False)
    print(f"  {out.name}: {'done' if out.exists() else 'FAILED, see ' + str(log)}", flush=True)


def final(path: Path) -> tuple[float, float] | None:
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    if d["status"] != "ok" or not d["evals"]:
        return None
    e = d["evals"][-1]
    return e["knn_top1"], e["student_knn_top1"]


def table(out: Path, seeds: list[int], tolerance: float, initial: float | None) -> str:
    runs = {name: [final(out / f"{key(name)}_s{s}.json") for s in seeds] for name in VARIANTS}
    lines = []
    for b, label in ((0, "teacher"), (1, "student")):
        base = [r[b] for r in runs["baseline"] if r]
        if len(base) < 2:
            return "fewer than 2 baseline runs finished"
        mean, spread = statistics.mean(base), max(base) - min(base)
        tol = max(tolerance, spread)
        rows = []
        for name, (kind, _, why) in VARIANTS.items():
            vals = [r[b] if r else None for r in runs[name]]
            done = [v for v in vals if v is not None]
            if kind == "baseline":
                moved = sum(1 for v in done if initial is not None and abs(v - initial) > spread)
                verdict = f"moved beyond spread at {moved}/{len(done)}" if initial is not None else "-"
            else:
                outside = sum(1 for v in done if v < mean - tol)
                want = outside if kind == "harmful" else len(done) - outside
                verdict = (f"{'outside' if kind == 'harmful' else 'inside'} {want}/{len(done)}"
                           f" {'POWER' if want >= 4 and len(done) >= 5 else ('no power' if len(done) >= 5 else '')}")
            rows.append([name, kind, " ".join("-" if v is None else f"{v:.1f}" for v in vals),
                         f"{statistics.mean(done):.1f}" if done else "-", verdict, why])
        lines.append(f"{label} kNN after the run (start {initial if initial is not None else '?'}); baseline mean "
                     f"{mean:.2f}, spread {spread:.2f}, tolerance max({tolerance}, spread) = {tol:.2f}")
        lines.append(format_table(["variant", "kind", "kNN per seed", "mean", "verdict", "how we know"], rows))
    return "\n".join(lines)


def key(name: str) -> str:
    return name.replace(" ", "_")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("knn_power_runs"))
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, a.seeds + 1))
    start = a.out / "start.json"
    if not a.table_only:
        jobs = [(a.out / f"{key(name)}_s{s}.json", BASE + [f"budget.steps={a.steps}", "eval.at_start=false",
                                                          f"system.seed={s}"] + ov)
                for s in seeds for name, (_, ov, _) in VARIANTS.items()]
        print(f"{len(jobs)} runs of {a.steps} steps, {a.jobs} at a time, into {a.out}", flush=True)
        # the warm backbone's kNN before training (the same for every seed): one evaluation, no training
        run_one(start, BASE + ["budget.steps=1", "eval.at_start=true"])
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda job: run_one(*job), jobs))
    initial = json.loads(start.read_text())["evals"][0]["knn_top1"] if start.exists() else None
    print(table(a.out, seeds, a.tolerance, None if initial is None else round(initial, 2)))


if __name__ == "__main__":
    main()
