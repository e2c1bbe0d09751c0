"""How close the tuner's sampler and pruner get to the exhaustive grid's best, and for how many trial-seconds.

    .venv/bin/python benchmarks/search_efficiency.py --measure   # once: the real grid (26 real trials, 7 min on 2 loaded cores)
    .venv/bin/python benchmarks/search_efficiency.py             # then: 10 seeds over the measured table (2 min)

The space is benchmarks/search_efficiency.yaml: 4 knobs, 24 configurations of the smoke study's shrunk
model, with the speed study's sampler (TPE, multivariate, constant liar) and speed-phase MedianPruner.

`--measure` is real: `tuner.runner.run` runs the whole grid (sampler `grid`, no pruner, the baseline at
its 2 seeds) through Ray Tune with real trials, and writes each configuration's measured throughput, kNN,
trial seconds and the seconds at which its speed phase ended to benchmarks/search_efficiency_grid.json
(the baseline configuration, measured 3 times, gives the noise).

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
"""

from __future__ import annotations

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
from tuner.space import SearchSpace  # noqa: E402

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

def measure(out: Path) -> None:
    import optuna
    import ray

    from tuner import runner
    from tuner.searcher import StudySearcher
    from tuner.study import hardware_fingerprint

    space = load_space(sampler={"name": "grid"}, pruner={"speed": "none", "quality": "none"})
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
    url = f"sqlite:///{tmp}/grid.db"
    cwd = os.getcwd()
    os.chdir(tmp)  # Ray Tune's result folder: studies/<name>/ under the working folder
    t0 = time.perf_counter()
    try:
        with mock.patch.object(StudySearcher, "on_trial_result", on_trial_result):
            runner.run(space, storage=url, progress=print, confirm_rounds=0)
    finally:
        os.chdir(cwd)
        ray.shutdown()
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=space.name, storage=url)
    rows = []
    for t in study.get_trials(deepcopy=False):
        u = t.user_attrs
        rows.append({"number": t.number, "role": u.get("role"), "state": t.state.name,
                     "key": config_key(space, u["config"]), "throughput_img_s": u.get("throughput_img_s"),
                     "knn_top1": t.values[1] if t.values else None, "time_s": u.get("time_s"),
                     "speed_s": speed_s.get(t.number), "fail_reason": u.get("fail_reason")})
    shutil.copy(f"{tmp}/grid.db", REPO / "studies" / "search-efficiency-grid.db")  # a source for report_render
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    hw = hardware_fingerprint()
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_model": hw["cpu_model"], "cpu_cores": hw["cpu_cores"],
                               "torch": hw["torch"], "wall_s": wall, "space": SPACE.name, "trials": rows}, indent=1) + "\n")
    print(f"wrote {out} ({len(rows)} trials, {wall:.0f} s); the study: studies/search-efficiency-grid.db")


# ---- the simulation over the measured table ---------------------------------------------------------

class Table:
    """The measured grid: per configuration (throughput, kNN, seconds, speed-phase seconds), and the noise."""

    def __init__(self, data: dict, tolerance_points: float):
        trials = [t for t in data["trials"] if t["state"] == "COMPLETE" and not t.get("fail_reason")]
        base_key = next(t["key"] for t in trials if t["role"] == "baseline")
        replicates = [t for t in trials if t["key"] == base_key]
        self.rows = {t["key"]: t for t in trials if t["role"] == "search"}
        logs = [math.log(t["throughput_img_s"]) for t in replicates]
        self.tp_sigma = statistics.stdev(logs) if len(logs) > 1 else 0.05
        self.knn_sigma = statistics.stdev([t["knn_top1"] for t in replicates]) if len(replicates) > 1 else 1.0
        self.base_knn = statistics.fmean(t["knn_top1"] for t in replicates if t["role"] != "search")
        self.base_key = base_key
        # The study's own tolerance: the space's, raised to the kNN spread of the baseline's seeds.
        seeds = [t["knn_top1"] for t in replicates if t["role"] != "search"]
        self.tolerance = max(tolerance_points, max(seeds) - min(seeds))
        self.grid_s = sum(t["time_s"] for t in self.rows.values())
        self.feasible = {k: r for k, r in self.rows.items() if r["knn_top1"] >= self.base_knn - self.tolerance}
        self.best_key = max(self.feasible, key=lambda k: self.feasible[k]["throughput_img_s"])
        self.best_tp = self.feasible[self.best_key]["throughput_img_s"]
        self.all_best_tp = max(r["throughput_img_s"] for r in self.rows.values())

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
    from tuner.study import open_study

    def picked() -> str | None:
        best = best_feasible(study)
        return config_key(space, best.user_attrs["config"]) if best is not None else None

    rng = random.Random(seed)
    space = space.model_copy(update={"sampler": space.sampler.model_copy(update={"seed": seed})})
    study = open_study(space, f"sqlite:///{folder}/seed{seed}.db")
    bridge = PruningBridge(space.pruner, knn_metric=space.constraints.knn_metric)
    searcher = StudySearcher(study, space, bridge, None, 2)
    spent, trials, pruned, reached_s, at_budget = 0.0, 0, 0, None, None
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
        key = picked()
        if reached_s is None and key is not None and table.row(key)["throughput_img_s"] >= 0.95 * table.best_tp:
            reached_s = spent
    result = at_budget or {"trials": trials, "pruned": pruned, "spent": spent, "key": picked()}
    key = result["key"]
    return {**result, "seed": seed, "true_tp": table.row(key)["throughput_img_s"] if key else 0.0,
            "truly_feasible": key in table.feasible if key else False, "reached_s": reached_s}


def short(key: str | None) -> str:
    if key is None:
        return "none"
    return " ".join(part.split("=")[1] for part in key.split(","))


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="run the real grid and write the table (slow)")
    p.add_argument("--table", type=Path, default=TABLE, help=f"the measured grid (default {TABLE.name})")
    p.add_argument("--seeds", type=int, default=10, help="sampler seeds (default 10: seeds 0-9)")
    p.add_argument("--budget", type=float, default=0.30, help="trial-seconds per seed, as a fraction of the grid's (0.30)")
    args = p.parse_args()
    if args.seeds < 1 or not 0 < args.budget <= 1:
        p.error("--seeds must be at least 1 and --budget in (0, 1]")
    if args.measure:
        measure(args.table)
        return 0
    if not args.table.exists():
        p.error(f"{args.table}: no measured grid; run with --measure first")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    data = json.loads(args.table.read_text())
    space = load_space()
    table = Table(data, space.constraints.knn_tolerance_points)
    budget_s = args.budget * table.grid_s
    folder = Path(tempfile.mkdtemp(prefix="tuner-search-efficiency-", dir="/tmp"))
    try:
        runs = [simulate(space, table, seed, budget_s, folder) for seed in range(args.seeds)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    names = ", ".join(space.params)
    print(f"measured grid: {data['date']}, {data['cpu_model']} ({data['cpu_cores']} cores), torch {data['torch']}")
    print(f"knobs ({names}); {len(table.rows)} configurations, {table.grid_s:.0f} trial-seconds; "
          f"{len(table.feasible)} feasible (kNN >= {table.base_knn:.1f} - {table.tolerance:.1f})")
    print(f"grid's best feasible: {short(table.best_key)} at {table.best_tp:.1f} img/s "
          f"(best of all: {table.all_best_tp:.1f}); noise: throughput x exp(N(0, {table.tp_sigma:.3f})), "
          f"kNN + N(0, {table.knn_sigma:.2f})")
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
    print(f"\ntarget (mean pick within 5% of the grid's best in <= 30% of its trial-seconds): "
          f"{'met' if met and args.budget <= 0.30 else 'not met'} (mean {100 * statistics.fmean(ratios):.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
