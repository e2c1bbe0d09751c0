"""`run(space)`: one study through Ray Tune, continued where it stopped; the Python twin of `tuner run`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import ray
from ray import tune

from trainer.config import ConfigError
from tuner.promotion import promote
from tuner.pruning import PruningBridge, PruningScheduler
from tuner.searcher import StudySearcher, update_baseline_stats
from tuner.space import SearchSpace
from tuner.study import StudyLock, check_storage_url, counted_trials, driver_lock, open_study, recover_interrupted
from tuner.summary import StudySummary, summarize
from tuner.trial import run_trial


def run(space: SearchSpace | str | Path, n_trials: int | None = None, timeout_s: float | None = None,
        address: str | None = None, storage: str | None = None,
        progress: Callable[[str], None] | None = print, confirm_rounds: int = 3) -> StudySummary:
    """Run (or continue) the study `space` describes and return its summary.

    `n_trials` is the study's total, baseline trials included (a finished study is continued by raising
    it); `timeout_s` limits this call's wall clock; `address` names an existing Ray cluster; `storage`
    replaces the space's database URL. The space is validated completely before the database is opened.
    At the end, the best feasible trial is measured again against the baseline in `confirm_rounds`
    interleaved rounds (as `tuner confirm`; 0 skips it), so the speedup the study states is one that
    reproduces, and the winner's system knobs get their parity check.
    """
    if not isinstance(space, SearchSpace):
        space = SearchSpace.load(space)
    # Every argument is checked before the database is opened, so a mistake never creates or changes a study.
    for name, value in (("n_trials", n_trials), ("timeout_s", timeout_s)):
        if value is not None and not value > 0:
            raise ConfigError(f"{name}={value}: must be above 0 (--n-trials, --timeout)")
    url = storage or space.storage_url()
    check_storage_url(url, "--storage" if storage else f"{space.source}: storage")
    n_trials = n_trials if n_trials is not None else space.budget.n_trials
    timeout_s = timeout_s if timeout_s is not None else space.budget.timeout_s
    say = progress or (lambda line: None)
    with driver_lock(url, space.name):  # one driver per SQLite study: a second refuses before touching it
        return _drive(space, url, n_trials, timeout_s, address, say, confirm_rounds)


def _drive(space: SearchSpace, url: str, n_trials: int | None, timeout_s: float | None, address: str | None,
           say: Callable[[str], None], confirm_rounds: int) -> StudySummary:
    study, lock = open_study(space, url), StudyLock(url, space.name)  # the lock: for several drivers on one study
    rerun = recover_interrupted(study, lock)
    if rerun:
        say(f"trials {rerun} were interrupted earlier: marked FAIL (interrupted) and queued to run again")
    with lock:
        update_baseline_stats(study, space)
    bridge = _bridge_with_history(space, study)
    done = len(counted_trials(study))
    if n_trials is not None and done >= n_trials:
        say(f"study {space.name} already has {done} of {n_trials} trials; raise --n-trials to continue")
    else:
        _search(space, study, bridge, url, n_trials, timeout_s, address, say, done)
    if space.trial.rungs:
        promote(study, space, say)
    if confirm_rounds > 0:
        confirm_winner(study, confirm_rounds, say)
    return summarize(study, url)


def _search(space: SearchSpace, study, bridge: PruningBridge, url: str, n_trials: int | None, timeout_s: float | None,
            address: str | None, say: Callable[[str], None], done: int) -> None:
    """The search itself: trials through Ray Tune until the study's budget is spent."""
    started_ray = _init_ray(address or space.ray.address)
    try:
        resources, concurrency = _resources(space)
        say(f"study {space.name}: {done} trials stored, running up to {n_trials or 'unlimited'}"
            f"{f' for at most {timeout_s:.0f} s' if timeout_s else ''}; {resources} per trial, {concurrency} at a time; {url}")
        searcher = StudySearcher(study, space, bridge, n_trials, resources.get("cpu", 1), progress=say,
                                 lock=StudyLock(url, space.name))
        ray_dir = Path("studies").resolve() / space.name
        tuner = tune.Tuner(
            tune.with_resources(run_trial, resources),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=PruningScheduler(bridge), num_samples=-1,
                                        max_concurrent_trials=concurrency, time_budget_s=timeout_s),
            run_config=tune.RunConfig(storage_path=str(ray_dir), name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine prints every trial error's result table
        with _quiet_ray():
            tuner.fit()
    finally:
        left = recover_interrupted(study, StudyLock(url, space.name))  # still running when Ray stopped (time limit, Ctrl-C)
        if left:
            say(f"trials {left} did not finish: queued to run again next time")
        if started_ray:
            ray.shutdown()


def confirm_winner(study, rounds: int, say: Callable[[str], None]) -> None:
    """`tuner confirm` of the best feasible trial, unless it is the baseline or is confirmed already."""
    from trainer.config import ConfigError
    from tuner.confirm import confirm
    from tuner.remeasure import MeasurementFailed
    from tuner.select import baseline_trial, best_feasible

    best, base = best_feasible(study), baseline_trial(study)
    if best is None or base is None or best.number == base.number:
        return
    if (study.user_attrs.get("confirm") or {}).get("trial") == best.number:
        return
    say(f"confirming trial {best.number} against the baseline: {rounds} interleaved rounds (skip with --confirm-rounds 0)")
    try:
        confirm(study, "fastest", rounds, progress=say)
    except (ConfigError, MeasurementFailed) as exc:  # the speedup stays unconfirmed; the study is intact
        say(f"confirm did not finish: {exc}; the speedup stays unconfirmed")


def _bridge_with_history(space: SearchSpace, study) -> PruningBridge:
    """A pruning bridge whose judges already know the stored trials' intermediate values."""
    from optuna.trial import TrialState

    bridge = PruningBridge(space.pruner, knn_metric=space.constraints.knn_metric)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("fail_reason"):
            continue
        stored = t.user_attrs.get("intermediate_values") or {}
        values = {phase: {int(k): float(v) for k, v in (stored.get(phase) or {}).items()} for phase in ("speed", "quality")}
        bridge.replay(f"stored-{t.number}", values, t.user_attrs.get("pruned_phase"))
    return bridge


def _init_ray(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True when we must shut it down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=True)
    return True


def _resources(space: SearchSpace) -> tuple[dict[str, float], int]:
    """One GPU per trial, or all of a node's CPUs when there is no GPU, so measured trials never share a device."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if space.ray.resources_per_trial:
        resources = dict(space.ray.resources_per_trial)
    elif gpus:
        per_node = max((n.get("CPU", 1) / n["GPU"] for n in nodes if n.get("GPU")), default=1)
        resources = {"gpu": 1, "cpu": max(1, int(per_node))}
    else:
        resources = {"cpu": max(int(n.get("CPU", 1)) for n in nodes)}
    concurrency = space.ray.max_concurrent_trials or (int(gpus) if gpus and resources.get("gpu") else 1)
    return resources, max(1, concurrency)


class _quiet_ray:
    """Ray Tune's own progress tables off during `fit`; the searcher prints one line per trial instead."""

    def __enter__(self):
        self.levels = {}
        for name in ("ray", "ray.tune", "ray.train", "ray.air"):
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.CRITICAL)  # errors are reported per trial, with their reason
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        return False
