"""The tuner's own cost per trial: a study through the real path against the same trials called directly.

    .venv/bin/python benchmarks/overhead.py                      # N = 10 and 50 (a few minutes)
    .venv/bin/python benchmarks/overhead.py --trials 10 50 200   # the issue's set
    .venv/bin/python benchmarks/overhead.py --profile 200        # + a cProfile of the driver at N=200

What is real: `tuner.runner.run` on a search space (default `search_spaces/speed.yaml`: its 11 knobs with
conditions, TPE sampler (multivariate, constant liar), MedianPruner on the speed phase, 2 baseline seeds),
with its storage replaced by a SQLite file in a temporary folder and `confirm_rounds=0`. So the driver lock,
`open_study`, baseline enqueueing, `StudySearcher` (ask, define-by-run sampling, `TrainConfig`
validation, tell with attributes and constraints, the progress line), the `PruningBridge` and
`PruningScheduler`, Ray Tune's controller and its trial actors are the project's own code path.

What is substituted: `tuner.runner.run_trial` (the one trainable `run` hands Ray Tune) is replaced by
a trivial trainable that sleeps `--work` seconds and reports what `tuner.trial.run_trial` reports: a
``phase: "speed"`` result (throughput) and a ``phase: "done"`` result (throughput, kNN). Its throughput
is a fixed function of the config (fewer crops, smaller head: faster), so the sampler and the pruner see
a landscape, and some trials are pruned as in a real study. It imports neither torch nor the trainer.

The direct run calls the same trivial work for the same trials (the configs the study stored), in one
process: no Ray, no study. Orchestration = study wall - direct wall. Per-trial overhead is the time
between two consecutive finished trials (the searcher's progress line) less the trial's own work; the
first trial (Ray's first actor, the study's creation) is shown apart as "first s". Of it, "searcher" is
the time in `StudySearcher.suggest` and `on_trial_complete` (sampling, validation, the database), and
"actor start" the time from `suggest` handing Ray the trial to the trainable's first line (Ray Tune
creating the trial's actor in a fresh worker process; the rest is Ray Tune's controller loop and the
actor's teardown).

Ray: one local Ray (num_cpus=2, no dashboard, a temporary _temp_dir under /tmp), started before the
studies and counted in none of them; Ray Tune's result folders go to the temporary folder.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
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


def synthetic_result(config: dict) -> tuple[float, float]:
    """Throughput and kNN of a config: a fixed, plausible function (fewer crops and a smaller head are faster)."""
    crops, head = config["crops"], config["model"]["head"]
    cost = (crops["global_crops"] + 0.4 * crops["local_crops"]) * (1.0 + head["out_dim"] * head["hidden_dim"] / 2.0 ** 27)
    throughput = 100.0 / cost * (1.1 if config["system"]["precision"] == "fp32" else 0.5)
    knn = 30.0 + crops["local_crops"] * 0.2 - (0.5 if config["optim"]["batch_size"] == 32 else 0.0)
    return throughput, knn


def trivial_work(spec: dict, report, work_s: float, started_at: float = 0.0) -> None:
    """The substituted trial: sleep, then report as `tuner.trial.run_trial` does (speed, then done).
    `started_at` (when the trainable began, time.time()) rides along for the timeline."""
    t0 = time.perf_counter()
    throughput, knn = synthetic_result(spec["config"])
    time.sleep(work_s)
    report({"phase": "speed", "step": 0, "throughput_img_s": throughput, "throughput_spread": 0.0, "peak_memory_mb": 0.0,
            "started_at": started_at})
    report({"phase": "done", "throughput_img_s": throughput, "throughput_spread": 0.0, "knn_top1": knn,
            "knn_top1_initial": knn - 1.0, "student_knn_top1": knn, "steps": 8, "wall_s": time.perf_counter() - t0,
            "peak_memory_mb": 0.0, "evals": {}, "student_evals": {}, "started_at": started_at})


def make_trainable(work_s: float, imports: bool):
    """The Ray Tune function trainable around `trivial_work` (a closure: Ray pickles it by value). With
    `imports`, it first imports what `tuner.trial.run_trial` imports (torch, the trainer), as a real trial
    does in its fresh Ray actor; the direct run has them imported once."""
    def trivial_trial(spec: dict) -> None:
        started_at = time.time()
        from ray import tune

        if imports:
            import torch

            from trainer import TrainConfig, train  # noqa: F401
            from tuner.study import hardware_fingerprint

            torch.set_num_threads(1)
            hardware_fingerprint()
        trivial_work(spec, tune.report, work_s, started_at)
    return trivial_trial


def study_run(space_path: Path, n: int, work_s: float, folder: Path, profile: bool, imports: bool) -> dict:
    """One study of `n` trials through `tuner.runner.run`; wall, per-trial finish times, the stored configs."""
    import optuna

    from tuner import runner
    from tuner.searcher import StudySearcher
    from tuner.space import SearchSpace

    space = SearchSpace.load(space_path)
    url = f"sqlite:///{folder}/overhead-{n}.db"
    stamps: list[float] = []

    def progress(line: str) -> None:
        if line.startswith("trial "):
            stamps.append(time.perf_counter())

    profiler = cProfile.Profile() if profile else None
    searcher_s: dict[str, float] = {}  # per Ray trial id: seconds in StudySearcher.suggest + on_trial_complete
    finished: list[str] = []  # trial ids in the order they finished
    given: dict[str, float] = {}  # when suggest handed Ray the trial (time.time())
    actor_s: dict[str, float] = {}  # from then until the trainable began: Ray's actor start

    def timed(method, last: bool):
        def wrapper(self, trial_id, *args, **kwargs):
            t = time.perf_counter()
            out = None
            try:
                out = method(self, trial_id, *args, **kwargs)
                return out
            finally:
                searcher_s[trial_id] = searcher_s.get(trial_id, 0.0) + time.perf_counter() - t
                if not last and isinstance(out, dict):
                    given[trial_id] = time.time()
                if last:
                    finished.append(trial_id)
                    result = (args[0] if args else kwargs.get("result")) or {}
                    if result.get("started_at") and trial_id in given:
                        actor_s[trial_id] = result["started_at"] - given[trial_id]
        return wrapper

    cwd = os.getcwd()
    os.chdir(folder)  # Ray Tune's result folder is studies/<name>/ under the working folder
    try:
        with mock.patch.object(runner, "run_trial", make_trainable(work_s, imports)), \
                mock.patch.object(StudySearcher, "suggest", timed(StudySearcher.suggest, False)), \
                mock.patch.object(StudySearcher, "on_trial_complete", timed(StudySearcher.on_trial_complete, True)):
            t0 = time.perf_counter()
            if profiler:
                profiler.enable()
            runner.run(space, n_trials=n, storage=url, progress=progress, confirm_rounds=0)
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    study = optuna.load_study(study_name=space.name, storage=url)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    return {"wall": wall, "t0": t0, "stamps": stamps, "configs": [t.user_attrs["config"] for t in trials],
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"), "profiler": profiler,
            "searcher_s": [searcher_s[i] for i in finished], "actor_s": [actor_s.get(i, 0.0) for i in finished]}


def direct_run(configs: list[dict], work_s: float) -> list[float]:
    """The same trials' work called one after another in this process; each one's seconds."""
    times = []
    for config in configs:
        t0 = time.perf_counter()
        trivial_work({"config": config}, lambda result: None, work_s)
        times.append(time.perf_counter() - t0)
    return times


def tenth(values: list[float], last: bool) -> float:
    k = max(1, len(values) // 10)
    return statistics.fmean(values[-k:] if last else values[:k])


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, nargs="+", default=[10, 50], help="study sizes (default: 10 50)")
    p.add_argument("--space", type=Path, default=REPO / "search_spaces" / "speed.yaml", help="search space YAML")
    p.add_argument("--work", type=float, default=0.2, help="seconds each trivial trial sleeps (default 0.2)")
    p.add_argument("--trial-s", type=float, default=49.0,
                   help="a typical trial of the real study, in seconds, for the last column (default 49: the median "
                        "speed.yaml trial measured on a 2-core AMD EPYC, docs/results.md)")
    p.add_argument("--imports", action="store_true",
                   help="each trivial trial imports torch and the trainer first, as a real trial does in its fresh process")
    p.add_argument("--profile", type=int, metavar="N", help="profile the driver at this study size (cProfile, top 25)")
    args = p.parse_args()
    if any(n < 3 for n in args.trials) or args.work < 0 or args.trial_s <= 0:
        p.error("--trials: each at least 3 (2 baseline seeds + 1); --work >= 0; --trial-s > 0")

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="tuner-overhead-", dir="/tmp"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    rows, profiles = [], []
    try:
        sizes = sorted(set(args.trials) | ({args.profile} if args.profile else set()))
        for n in sizes:
            folder = tmp / f"n{n}"
            folder.mkdir()
            s = study_run(args.space, n, args.work, folder, profile=n == args.profile, imports=args.imports)
            direct = direct_run(s["configs"], args.work)
            finish = [s["t0"]] + s["stamps"]
            intervals = [b - a for a, b in zip(finish, finish[1:])]
            per_trial = [i - d for i, d in zip(intervals, direct)]
            orchestration = s["wall"] - sum(direct)
            per = orchestration / n
            own, actor = s["searcher_s"][1:], s["actor_s"][1:]
            rows.append((n, s["wall"], sum(direct), per, orchestration / s["wall"], per_trial[0],
                         f"{tenth(per_trial[1:], last=False):.2f} / {tenth(per_trial[1:], last=True):.2f}",
                         f"{tenth(own, last=False):.2f} / {tenth(own, last=True):.2f}",
                         f"{tenth(actor, last=False):.2f} / {tenth(actor, last=True):.2f}",
                         per / (per + args.trial_s), f"{s['pruned']}/{s['failed']}"))
            if s["profiler"]:
                out = io.StringIO()
                pstats.Stats(s["profiler"], stream=out).sort_stats("cumulative").print_stats(25)
                profiles.append((n, out.getvalue()))
            print(f"N={n}: {s['wall']:.1f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for n, text in profiles:
        print(f"cProfile of the driver, N={n} (cumulative):\n{text}")
    print(f"trivial trial: {args.work} s of sleep{' after importing torch and the trainer' if args.imports else ''}; space {args.space.name}; typical real trial {args.trial_s:g} s")
    print(format_table(["N", "wall s", "direct s", "orch. s/trial", "orch. fraction", "first s",
                        "per trial s: first / last tenth", "of it searcher", "of it actor start", f"fraction of a {args.trial_s:g} s trial", "pruned/failed"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
