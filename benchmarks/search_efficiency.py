"""How close the tuner's sampler and pruner get to the exhaustive grid's best, and for how many trial-seconds.

    .venv/bin/python benchmarks/search_efficiency.py --measure --replicates 3
                                                                 # once: the real grid, 3 times (78 real trials)
    .venv/bin/python benchmarks/search_efficiency.py             # then: 10 seeds over the measured table (2 min)
    .venv/bin/python benchmarks/search_efficiency.py --sampler gp --sampler-args '{"n_startup_trials": 2}' --pruner none
                                                                 # another sampler / speed-phase pruner, same table

The space is benchmarks/search_efficiency.yaml: 4 knobs, 24 configurations of the smoke study's shrunk
model, with the speed study's sampler (GP after 2 startup trials, shown throughput alone) and speed-phase
MedianPruner.

`--measure` is real: `tuner.runner.run` runs the whole grid (sampler `grid`, no pruner, the baseline at
its 2 seeds) through Ray Tune with real trials, and writes each configuration's measured throughput, kNN,
trial seconds and the seconds at which its speed phase ended to benchmarks/search_efficiency_grid.json.
With `--replicates R` it runs the grid R times, each in another shuffled order, and the table takes each
configuration's median (one measurement per configuration on a noisy machine is not a truth to search
for: the two-speed states of a shared VM move single figures by 20-30%); the noise is then the pooled
spread within configurations, else that of the baseline configuration's 3 measurements.

The search is a simulation over that table: the project's real `StudySearcher` (Optuna ask/tell on a
study made by `open_study`, define-by-run sampling, constraints, baseline seeds first), `PruningBridge`
(the pruner) and the space's sampler at each seed, without Ray and without training. Each trial's
throughput is the table's times a log-normal factor, its kNN the table's plus a normal term (both with
the spread the baseline's replicates showed); a trial costs its configuration's measured seconds, a
pruned one the seconds until its speed phase ended. Each seed runs trials while their seconds fit in
`--budget` (default 30%) of the grid's; the trial the budget ends in does not count, as under a time limit.
The study then goes on, up to the grid's own trial-seconds, to show when its pick first came within 5%. Its pick is `best_feasible` (as `tuner export` picks), judged by
the table's throughput against the grid's best feasible configuration (feasible: the table's kNN within
the tolerance of the baseline's mean kNN).

The budget counts the baseline's seeds (they are trials of the study, needed for the noise); the line
under the table gives the same seeds' picks when they are not counted (the budget's seconds all for the
search trials), and the last line is the row of docs/results.md's comparison table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.arguments import OneLineParser  # noqa: E402
from trainer.table import format_table  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from tuner.space import SAMPLERS, SearchSpace  # noqa: E402

SPACE = Path(__file__).resolve().parent / "search_efficiency.yaml"
TABLE = Path(__file__).resolve().parent / "search_efficiency_grid.json"


def load_space(**changes) -> SearchSpace:
    import yaml

    data = yaml.safe_load(SPACE.read_text())
    data.update(changes)
    return SearchSpace.from_dict(data, source=str(SPACE), root=SPACE.parent)


def config_key(space: SearchSpace, config: dict) -> str:
    """A configuration's knob values, as one string: "crops.local_crops=6,model.head.out_dim=4096,..."."""
    parts = []
    for path in space.params:
        node = config
        for part in path.split("."):
            node = node[part]
        parts.append(f"{path}={node}")
    return ",".join(parts)


# ---- --measure: the real grid --------------------------------------------------------------------

def measure(out: Path, reuse_actors: bool = False, replicates: int = 1) -> None:
    """The whole grid `replicates` times, each in its own shuffled order (the grid sampler's seed), one after
    another in one Ray session; every measurement is written, and the table takes each configuration's median."""
    import optuna
    import ray

    from tuner import runner
    from tuner.searcher import StudySearcher
    from tuner.study import hardware_fingerprint

    speed_s: dict[int, float] = {}
    original = StudySearcher.on_trial_result

    def on_trial_result(self, trial_id, result):  # where the speed phase ended: a pruned trial's cost
        live = self.live.get(trial_id)
        if live is not None and result.get("phase") == "speed":
            speed_s[live.trial.number] = float(result["time_total_s"])
        return original(self, trial_id, result)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="tuner-search-efficiency-", dir="/tmp"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    cwd = os.getcwd()
    os.chdir(tmp)  # Ray Tune's result folder: studies/<name>/ under the working folder
    t0 = time.perf_counter()
    rows = []
    try:
        for run in range(replicates):
            space = load_space(sampler={"name": "grid", "seed": run}, pruner={"speed": "none", "quality": "none"},
                               ray={**load_space().ray.model_dump(exclude_unset=True), "reuse_actors": reuse_actors})
            url = f"sqlite:///{tmp}/grid{run}.db"
            speed_s.clear()
            print(f"--- the grid, replicate {run + 1} of {replicates} ---")
            with mock.patch.object(StudySearcher, "on_trial_result", on_trial_result):
                runner.run(space, storage=url, progress=print, confirm_rounds=0)
            study = optuna.load_study(study_name=space.name, storage=url)
            for t in study.get_trials(deepcopy=False):
                u = t.user_attrs
                rows.append({"run": run, "number": t.number, "role": u.get("role"), "state": t.state.name,
                             "key": config_key(space, u["config"]), "throughput_img_s": u.get("throughput_img_s"),
                             "knn_top1": t.values[1] if t.values else None, "time_s": u.get("time_s"),
                             "speed_s": speed_s.get(t.number), "fail_reason": u.get("fail_reason")})
    finally:
        os.chdir(cwd)
        ray.shutdown()
    wall = time.perf_counter() - t0
    shutil.copy(f"{tmp}/grid0.db", REPO / "studies" / "search-efficiency-grid.db")  # a source for report_render
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    hw = hardware_fingerprint()
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_model": hw["cpu_model"], "cpu_cores": hw["cpu_cores"],
                               "torch": hw["torch"], "wall_s": wall, "space": SPACE.name, "reuse_actors": reuse_actors,
                               "replicates": replicates, "trials": rows}, indent=1) + "\n")
    print(f"wrote {out} ({len(rows)} trials, {wall:.0f} s); the first replicate's study: studies/search-efficiency-grid.db")


# ---- the simulation over the measured table ---------------------------------------------------------

class Table:
    """The measured grid: per configuration (throughput, kNN, seconds, speed-phase seconds), and the noise.

    With several replicates of the grid, each configuration's figures are the medians of its measurements
    (the baseline configuration's include its seeds' trials), and the throughput's noise is the pooled
    spread within configurations; with one, the noise is the baseline's replicates' spread."""

    def __init__(self, data: dict, tolerance_points: float):
        trials = [t for t in data["trials"] if t["state"] == "COMPLETE" and not t.get("fail_reason")]
        base_key = next(t["key"] for t in trials if t["role"] == "baseline")
        by_key: dict[str, list[dict]] = {}
        for t in trials:
            by_key.setdefault(t["key"], []).append(t)
        replicates = by_key[base_key]
        self.runs = len({t.get("run", 0) for t in trials})
        self.rows = {}
        for key, ts in by_key.items():
            searched = [t for t in ts if t["role"] == "search"]
            if not searched:
                continue
            self.rows[key] = {"key": key, "measurements": [t["throughput_img_s"] for t in ts],
                              "throughput_img_s": statistics.median(t["throughput_img_s"] for t in ts),
                              "knn_top1": statistics.median(t["knn_top1"] for t in ts),
                              "time_s": statistics.median(t["time_s"] for t in searched),
                              "speed_s": statistics.median(t["speed_s"] for t in searched)}
        if self.runs > 1:  # pooled within-configuration spread of log throughput
            variances = [statistics.variance([math.log(v) for v in r["measurements"]]) for r in self.rows.values()
                         if len(r["measurements"]) > 1]
            self.tp_sigma = math.sqrt(statistics.fmean(variances))
        else:
            logs = [math.log(t["throughput_img_s"]) for t in replicates]
            self.tp_sigma = statistics.stdev(logs) if len(logs) > 1 else 0.05
        seeds = [t for t in replicates if t["role"] != "search"]
        self.knn_sigma = statistics.stdev([t["knn_top1"] for t in replicates]) if len(replicates) > 1 else 1.0
        self.base_knn = statistics.fmean(t["knn_top1"] for t in seeds)
        self.base_key = base_key
        # The study's own tolerance: the space's, raised to the kNN spread of one study's baseline seeds
        # (the median over the replicates).
        spreads = []
        for run in sorted({t.get("run", 0) for t in seeds}):
            knns = [t["knn_top1"] for t in seeds if t.get("run", 0) == run]
            spreads.append(max(knns) - min(knns))
        self.tolerance = max(tolerance_points, statistics.median(spreads))
        self.grid_s = sum(r["time_s"] for r in self.rows.values())
        self.feasible = {k: r for k, r in self.rows.items() if r["knn_top1"] >= self.base_knn - self.tolerance}
        self.best_key = max(self.feasible, key=lambda k: self.feasible[k]["throughput_img_s"])
        self.best_tp = self.feasible[self.best_key]["throughput_img_s"]
        self.all_best_tp = max(r["throughput_img_s"] for r in self.rows.values())
        self.within_5 = sorted(k for k, r in self.feasible.items() if r["throughput_img_s"] >= 0.95 * self.best_tp)

    def row(self, key: str) -> dict:
        return self.rows[key]


def simulate(space: SearchSpace, table: Table, seed: int, budget_s: float, folder: Path) -> dict:
    """One study at `seed` through the real searcher and pruning bridge, the table standing in for training.

    The pick is taken when the budget ends (the trial it ends in does not count, as under a time limit);
    the study then goes on up to the grid's own trial-seconds to find when its pick first came within 5%.
    """
    from ray.tune.search import Searcher

    from tuner.pruning import PruningBridge
    from tuner.searcher import StudySearcher
    from tuner.select import best_feasible
    from tuner.study import BASELINE_ROLES, open_study

    def picked() -> str | None:
        best = best_feasible(study)
        return config_key(space, best.user_attrs["config"]) if best is not None else None

    rng = random.Random(seed)
    space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"seed": seed})})
    study = open_study(space, f"sqlite:///{folder}/seed{seed}.db")
    bridge = PruningBridge(space.pruner, knn_metric=space.constraints.knn_metric)
    searcher = StudySearcher(study, space, bridge, None, 2)
    spent, trials, pruned, reached_s, at_budget = 0.0, 0, 0, None, None
    baseline_s, search_only = 0.0, None  # the baseline's seeds' seconds; the pick when they are not counted
    for i in range(10 * len(table.rows)):
        trial_id = f"sim-{i}"
        spec = searcher.suggest(trial_id)
        if spec is None or spec == Searcher.FINISHED:
            break
        row = table.row(config_key(space, spec["config"]))
        throughput = row["throughput_img_s"] * math.exp(rng.gauss(0.0, table.tp_sigma))
        knn = row["knn_top1"] + rng.gauss(0.0, table.knn_sigma)
        speed = {"phase": "speed", "step": 0, "throughput_img_s": throughput, "throughput_spread": 0.0,
                 "peak_memory_mb": 0.0}
        decision = bridge.observe(trial_id, speed)  # what PruningScheduler does with each result
        searcher.on_trial_result(trial_id, speed)
        cost = row["speed_s"] if decision is not None else row["time_s"]
        if at_budget is None and spent + cost > budget_s:
            at_budget = {"trials": trials, "pruned": pruned, "spent": spent, "key": picked()}
        if search_only is None and spec["role"] not in BASELINE_ROLES and spent - baseline_s + cost > budget_s:
            search_only = {"trials": trials, "spent": spent - baseline_s, "key": picked()}
        if spent + cost > table.grid_s:
            break
        if decision is not None:
            searcher.on_trial_complete(trial_id, {**speed, "time_total_s": cost})
            pruned += 1
        else:
            searcher.on_trial_complete(trial_id, {"phase": "done", "throughput_img_s": throughput, "knn_top1": knn,
                                                  "student_knn_top1": knn, "peak_memory_mb": 0.0, "evals": {},
                                                  "student_evals": {}, "time_total_s": cost})
        spent += cost
        trials += 1
        if spec["role"] in BASELINE_ROLES:
            baseline_s += cost
        key = picked()
        if reached_s is None and key is not None and table.row(key)["throughput_img_s"] >= 0.95 * table.best_tp:
            reached_s = spent
    result = at_budget or {"trials": trials, "pruned": pruned, "spent": spent, "key": picked()}
    search_only = search_only or {"trials": trials, "spent": spent - baseline_s, "key": picked()}
    key = result["key"]

    def true_tp(key: str | None) -> float:
        return table.row(key)["throughput_img_s"] if key else 0.0

    return {**result, "seed": seed, "true_tp": true_tp(key), "truly_feasible": key in table.feasible if key else False,
            "reached_s": reached_s, "baseline_s": baseline_s,
            "search_only": {**search_only, "true_tp": true_tp(search_only["key"])}}


def short(key: str | None) -> str:
    if key is None:
        return "none"
    return " ".join(part.split("=")[1] for part in key.split(","))


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="run the real grid and write the table (slow)")
    p.add_argument("--table", type=Path, default=TABLE, help=f"the measured grid (default {TABLE.name})")
    p.add_argument("--replicates", type=int, default=1,
                   help="with --measure: run the whole grid this many times, each in another order (default 1); "
                   "the table takes each configuration's median")
    p.add_argument("--reuse-actors", action="store_true",
                   help="with --measure: run the grid's trials in one reused Ray actor (ray.reuse_actors)")
    p.add_argument("--seeds", type=int, default=10, help="sampler seeds (default 10: seeds 0-9)")
    p.add_argument("--budget", type=float, default=0.30, help="trial-seconds per seed, as a fraction of the grid's (0.30)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS),
                   help="this sampler instead of the space's (gp), with --sampler-args as its arguments")
    p.add_argument("--sampler-args", type=json_object, default=None, metavar="JSON",
                   help="the sampler's keyword arguments instead of the space's, e.g. '{\"n_startup_trials\": 3}'")
    p.add_argument("--objective", choices=["throughput", "pareto"],
                   help="what the sampler models instead of the space's (sampler.objective)")
    p.add_argument("--pruner", help="the speed phase's pruner instead of the space's (MedianPruner, "
                   "n_startup_trials 4): an Optuna pruner class name, or none")
    p.add_argument("--pruner-args", type=json_object, default=None, metavar="JSON",
                   help="the speed pruner's keyword arguments instead of the space's")
    args = p.parse_args()
    if args.replicates < 1:
        p.error("--replicates must be at least 1")
    if args.seeds < 1 or not 0 < args.budget <= 1:
        p.error("--seeds must be at least 1 and --budget in (0, 1]")
    if args.measure and (args.sampler or args.sampler_args is not None or args.objective or args.pruner
                         or args.pruner_args is not None):
        p.error("--measure runs the grid (no sampler choice, no pruner); --sampler and --pruner are for the simulation")
    if args.measure:
        measure(args.table, args.reuse_actors, args.replicates)
        return 0
    if not args.table.exists():
        p.error(f"{args.table}: no measured grid; run with --measure first")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    data = json.loads(args.table.read_text())
    try:
        space = load_space(**changed_sections(load_space(), args))
    except ConfigError as exc:
        p.error(str(exc))
    table = Table(data, space.constraints.knn_tolerance_points)
    budget_s = args.budget * table.grid_s
    folder = Path(tempfile.mkdtemp(prefix="tuner-search-efficiency-", dir="/tmp"))
    try:
        runs = [simulate(space, table, seed, budget_s, folder) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    names = ", ".join(space.params)
    print(f"sampler: {describe_sampler(space)}; speed pruner: {describe_pruner(space)}")
    print(f"measured grid: {data['date']}, {data['cpu_model']} ({data['cpu_cores']} cores), torch {data['torch']}, "
          f"{table.runs} replicate(s) (each configuration's median)")
    print(f"knobs ({names}); {len(table.rows)} configurations, {table.grid_s:.0f} trial-seconds; "
          f"{len(table.feasible)} feasible (kNN >= {table.base_knn:.1f} - {table.tolerance:.1f})")
    print(f"grid's best feasible: {short(table.best_key)} at {table.best_tp:.1f} img/s "
          f"(best of all: {table.all_best_tp:.1f}); noise: throughput x exp(N(0, {table.tp_sigma:.3f})), "
          f"kNN + N(0, {table.knn_sigma:.2f}); {len(table.within_5)} configuration(s) within 5% of it")
    print(f"budget per seed: {100 * args.budget:.0f}% of the grid's trial-seconds = {budget_s:.0f} s\n")
    rows = [(r["seed"], r["trials"], r["pruned"], r["spent"], r["spent"] / table.grid_s, short(r["key"]), r["true_tp"],
             r["true_tp"] / table.best_tp, "yes" if r["truly_feasible"] else "no",
             f"{r['reached_s'] / table.grid_s:.2f}" if r["reached_s"] is not None else "-") for r in runs]
    ratios = [r["true_tp"] / table.best_tp for r in runs]
    rows.append(("mean", statistics.fmean(r["trials"] for r in runs), statistics.fmean(r["pruned"] for r in runs),
                 statistics.fmean(r["spent"] for r in runs), statistics.fmean(r["spent"] for r in runs) / table.grid_s,
                 "", statistics.fmean(r["true_tp"] for r in runs), statistics.fmean(ratios),
                 f"{sum(r['truly_feasible'] for r in runs)}/{len(runs)}",
                 f"{sum(r['reached_s'] is not None for r in runs)}/{len(runs)} reached"))
    print(format_table(["seed", "trials", "pruned", "trial-s", "of grid", "pick", "pick img/s (table)",
                        "of grid best", "feasible", "within 5% from (of grid)"], rows))
    met = statistics.fmean(ratios) >= 0.95
    within = sum(r >= 0.95 for r in ratios)
    print(f"\ntarget (mean pick within 5% of the grid's best in <= 30% of its trial-seconds): "
          f"{'met' if met and args.budget <= 0.30 else 'not met'} (mean {100 * statistics.fmean(ratios):.1f}%; "
          f"{within} of {len(runs)} picks within 5%)")
    alone = [r["search_only"] for r in runs]
    alone_ratios = [a["true_tp"] / table.best_tp for a in alone]
    print(f"the baseline's {space.constraints.knn_noise_seeds} seeds cost "
          f"{statistics.fmean(r['baseline_s'] for r in runs):.0f} s of the {budget_s:.0f}; not counted against the "
          f"budget, the picks would be: mean {statistics.fmean(alone_ratios):.2f} of the grid's best "
          f"({min(alone_ratios):.2f}-{max(alone_ratios):.2f}), {sum(r >= 0.95 for r in alone_ratios)} of {len(runs)} "
          f"within 5%, {statistics.fmean(a['trials'] for a in alone):.1f} trials per seed (baseline's included)")
    print(f"\nrow: | {describe_sampler(space)} | {describe_pruner(space)} | {statistics.fmean(ratios):.2f} | "
          f"{min(ratios):.2f}-{max(ratios):.2f} | {within} of {len(runs)} | "
          f"{statistics.fmean(r['trials'] for r in runs):.1f} ({statistics.fmean(r['pruned'] for r in runs):.1f}) | "
          f"{statistics.fmean(alone_ratios):.2f}, {sum(r >= 0.95 for r in alone_ratios)} of {len(runs)} |")
    return 0


def json_object(text: str) -> dict:
    """A command line's JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"n_startup_trials\": 3}'")
    return value


def changed_sections(space: SearchSpace, args) -> dict:
    """The space's sampler and pruner sections as the command line changes them."""
    changes = {}
    if args.sampler or args.sampler_args is not None or args.objective:
        changes["sampler"] = {"name": args.sampler or space.sampler.name, "seed": space.sampler.seed,
                              "args": args.sampler_args if args.sampler_args is not None else
                              (space.sampler.args if not args.sampler else {}),
                              "objective": args.objective or space.sampler.objective}
    if args.pruner or args.pruner_args is not None:
        speed = space.pruner.speed
        name = args.pruner or (speed.name if speed else None)
        if name is None or name.lower() in ("none", "off"):
            if args.pruner_args:
                raise ConfigError("--pruner-args: no pruner to take them (--pruner none)")
            speed = "none"
        else:
            speed = {"name": name, "args": args.pruner_args if args.pruner_args is not None else
                     (speed.args if speed and not args.pruner else {})}
        changes["pruner"] = {"speed": speed, "quality": space.pruner.quality.model_dump() if space.pruner.quality else "none"}
    return changes


def describe_sampler(space: SearchSpace) -> str:
    """The sampler as built, with the arguments the tuner adds (tpe: multivariate, constant liar)."""
    inner = ", ".join(f"{k}={v}" for k, v in space.sampler_args().items())
    name = f"{space.sampler.name}({inner})" if inner else space.sampler.name
    return f"{name}, objective {space.sampler.objective}"


def describe_pruner(space: SearchSpace) -> str:
    speed = space.pruner.speed
    if speed is None:
        return "none"
    inner = ", ".join(f"{k}={v}" for k, v in speed.args.items())
    return f"{speed.name}({inner})"


if __name__ == "__main__":
    raise SystemExit(main())
