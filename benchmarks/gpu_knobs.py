"""Each speed knob of a search space alone against the space's baseline, then the knobs together, on
this machine's device, measured interleaved. Not a test; prints a table (and writes JSON with --json).

The trainer alone does the measuring (no Ray, no Optuna), so this runs where only torch, torchvision,
pydantic, PyYAML and scikit-learn are installed: each row is `trainer.engine.train(config,
speed_only=True)` of the space's base + baseline + one variant, with the space's trial protocol (warm-up,
timed windows that synchronize only at their ends, profiled steps after them). Rounds alternate the rows
so drift hits all alike; the table gives the median over rounds, the ratio to the baseline of the same
round, compile time, peak memory, and for compiled rows the break-even step (after how many steps the
compiled run is ahead of the same config in eager mode, counting compile time).

    python benchmarks/gpu_knobs.py                                  # search_spaces/gpu.yaml, 2 rounds
    python benchmarks/gpu_knobs.py --rounds 1 --only baseline,bf16,compile
    python benchmarks/gpu_knobs.py --space search_spaces/speed.yaml --rounds 3 --no-compile   # a CPU
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import ConfigError, TrainConfig  # noqa: E402
from trainer.engine import train  # noqa: E402
from trainer.knobs import knob_class  # noqa: E402
from trainer.measure import break_even_steps, cpu_model  # noqa: E402
from trainer.table import format_table  # noqa: E402

#: name -> (overrides on top of the baseline, the knob's class as trainer/knobs.py declares it)
#: name -> overrides on top of the baseline
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "tf32": {"system.tf32": True},
    "cudnn_benchmark": {"system.cudnn_benchmark": True},
    "bf16": {"system.precision": "bf16"},
    "fp16 + scaler": {"system.precision": "fp16"},
    "channels_last": {"system.channels_last": True},
    "fused AdamW": {"optim.fused": True},
    "pin_memory": {"system.pin_memory": True},
    "workers 8, prefetch 4, persistent": {"system.num_workers": 8, "system.prefetch_factor": 4,
                                           "system.persistent_workers": True},
    "local crops 2": {"crops.local_crops": 2},
    "out_dim 16384": {"model.head.out_dim": 16384},
    "batch 256": {"optim.batch_size": 256},
    "system knobs together": {"system.tf32": True, "system.precision": "bf16", "system.channels_last": True,
                               "optim.fused": True, "system.pin_memory": True},
    "compile (default)": {"system.compile": "default"},
    "compile (default, static shapes)": {"system.compile": "default", "system.compile_dynamic": False},
    "compile (reduce-overhead)": {"system.compile": "reduce-overhead"},
    "system knobs + compile": {"system.tf32": True, "system.precision": "bf16", "system.channels_last": True,
                                "optim.fused": True, "system.pin_memory": True, "system.compile": "default"},
    "all + crops 2, batch 256": {"system.tf32": True, "system.precision": "bf16", "system.channels_last": True,
                                  "optim.fused": True, "system.pin_memory": True, "system.compile": "default",
                                  "crops.local_crops": 2, "optim.batch_size": 256},
    "compile (max-autotune)": {"system.compile": "max-autotune"},
}


def variant_class(overrides: dict) -> str:
    """The widest class (trainer/knobs.py) of the knobs a variant changes: method > approximate > exact."""
    classes = {knob_class(path) for path in overrides}
    return next((c for c in ("method", "approximate", "exact") if c in classes), "")


def space_config(path: Path) -> tuple[TrainConfig, str]:
    """The space's base config, baseline and trial protocol as one TrainConfig (speed phase only)."""
    space = yaml.safe_load(path.read_text())
    base = (space.get("base") or {})
    cfg = TrainConfig.load(base.get("config"))  # None: the embedded default, as the tuner does
    trial = space.get("trial") or {}
    protocol = {"measure.warmup_steps": trial.get("warmup_steps", 2), "measure.window_steps": trial.get("window_steps", 3),
                "measure.windows": trial.get("windows", 3), "measure.profile_steps": trial.get("profile_steps", 1),
                "eval.every_steps": 0, "eval.every_epochs": 0}
    overrides = {**(base.get("overrides") or {}), **(space.get("baseline") or {}), **protocol}
    return cfg.with_overrides(overrides, source=str(path)), space.get("name", path.stem)


def eager_of(overrides: dict) -> dict:
    """The same variant without torch.compile (compile "off" is the default, so it is left out)."""
    return {k: v for k, v in overrides.items() if k not in ("system.compile", "system.compile_dynamic")}


def reuse_data_sets() -> None:
    """Build each data set once per process: every row uses the same data, and building the digits
    canvases takes seconds a row (it is not part of what is measured, but of the time this takes)."""
    from trainer import data, engine

    built: dict[str, object] = {}
    build = data.build_splits

    def cached(cfg):
        key = cfg.model_dump_json()
        if key not in built:
            built[key] = build(cfg)
        return built[key]

    engine.build_splits = cached


def measure(cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    try:
        result = train(cfg, speed_only=True)
    except ConfigError as exc:  # e.g. a batch larger than the data set: that row is skipped, the rest run
        return {"status": "invalid_config", "message": str(exc), "wall_s": 0.0}
    if result.status != "ok" or result.speed is None:
        failure = result.failure or {}
        return {"status": failure.get("reason", "error"), "message": str(failure.get("message", ""))[:200],
                "wall_s": time.perf_counter() - t0}
    s = result.speed
    return {"status": "ok", "img_s": s.throughput_img_s, "spread": s.throughput_spread, "step_ms": s.step_ms,
            "compile_s": s.compile_s, "peak_mb": s.peak_memory_mb, "images_per_step": s.images_per_step,
            "phases_ms": s.phases_ms, "wall_s": time.perf_counter() - t0}


def break_even(compiled: dict, eager: dict) -> str:
    """Steps after which the compiled run (compile time + its steps) is ahead of eager."""
    if compiled.get("status") != "ok" or eager.get("status") != "ok":
        return ""
    steps = break_even_steps(compiled["compile_s"], eager["step_ms"] / 1000, compiled["step_ms"] / 1000)
    return "never" if steps is None else str(int(steps) + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", type=Path, default=Path("search_spaces/gpu.yaml"))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (compiled rows run in the first only)")
    p.add_argument("--only", default="", help="comma-separated variant names or prefixes (baseline always runs)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    p.add_argument("--device", default="", help="override system.device (default: the space's)")
    p.add_argument("--json", type=Path, help="also write every measurement here (rewritten after each one)")
    args = p.parse_args(argv)
    if not args.space.is_file():
        p.error(f"--space: no such file: {args.space}")

    reuse_data_sets()
    base, name = space_config(args.space)
    if args.device:
        base = base.with_overrides({"system.device": args.device})
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    rows = [v for v in VARIANTS if v == "baseline" or not wanted or any(v.startswith(w) for w in wanted)]
    if args.no_compile:
        rows = [v for v in rows if VARIANTS[v].get("system.compile", "off") == "off"]
    device = torch.cuda.get_device_name(0) if base.system.device == "cuda" and torch.cuda.is_available() else cpu_model()
    print(f"space {name}: {len(rows)} rows x {args.rounds} rounds on {device}; torch {torch.__version__}", flush=True)

    results: dict[str, list[dict]] = {v: [] for v in rows}
    signal.signal(signal.SIGTERM, _interrupt)  # a `timeout` still gets the table of what was measured
    try:
        for r in range(args.rounds):
            for v in rows:
                overrides = VARIANTS[v]
                if r > 0 and overrides.get("system.compile", "off") != "off":
                    continue  # compiling again measures the same thing at a minute a row
                m = measure(base.with_overrides(overrides, source=v))
                if STOPPED:  # the trainer may have caught the interrupt and returned a failed run
                    raise KeyboardInterrupt
                results[v].append(m)
                shown = (f"{m['img_s']:9.1f} img/s  compile {m['compile_s']:.1f} s" if m["status"] == "ok"
                         else f"{m['status']}: {m['message']}")
                print(f"round {r + 1}/{args.rounds}  {v:<36} {shown}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "space": name,
                                                     "results": results}, indent=1, default=float))
    except KeyboardInterrupt:
        print("interrupted: the table holds what was measured", flush=True)
    print()
    print(format_table(["variant", "class", "img/s", "vs baseline", "ms/step", "compile s", "break-even step",
                        "peak MB"], table_rows(rows, results)))
    return 0


STOPPED = False


def _interrupt(*_):
    global STOPPED
    STOPPED = True
    raise KeyboardInterrupt


def table_rows(rows: list[str], results: dict[str, list[dict]]) -> list[list]:
    base_rounds = [m.get("img_s") for m in results["baseline"]]
    table = []
    for v in rows:
        ok = [m for m in results[v] if m["status"] == "ok"]
        if not ok:
            table.append([v, variant_class(VARIANTS[v]), results[v][0]["status"] if results[v] else "not run", "", "", "", "", ""])
            continue
        ratios = [m["img_s"] / b for m, b in zip(results[v], base_rounds) if m["status"] == "ok" and b]
        compiled = VARIANTS[v].get("system.compile", "off") != "off"
        eager_name = next((e for e in rows if compiled and VARIANTS[e] == eager_of(VARIANTS[v])), None)
        even = break_even(ok[0], results[eager_name][0]) if eager_name and results[eager_name] else ""
        table.append([v, variant_class(VARIANTS[v]), f"{statistics.median(m['img_s'] for m in ok):.1f}",
                      f"x{statistics.median(ratios):.2f}" if ratios else "", f"{ok[0]['step_ms']:.1f}",
                      f"{ok[0]['compile_s']:.1f}" if ok[0]["compile_s"] else "", even, f"{ok[0]['peak_mb']:.0f}"])
    return table


if __name__ == "__main__":
    sys.exit(main())
