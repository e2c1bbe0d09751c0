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
from trainer.pretrain import is_builtin, warm_backbone_file
from tuner.promotion import promote, study_folder
from tuner.pruning import PruningBridge, PruningScheduler
from tuner.searcher import StudySearcher, trial_config, update_baseline_stats
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
    # a cluster address is joined before the study is opened: one that cannot be joined changes nothing
    where = "--address" if address else f"{space.source}: ray.address"
    joined = _init_ray(address or space.ray.address, where) if (address or space.ray.address) else False
    try:
        _resources(space, _nodes())  # resources no node has are refused before the study is opened
        with driver_lock(url, space.name):  # one driver per SQLite study: a second refuses before touching it
            return _drive(space, url, n_trials, timeout_s, address, say, confirm_rounds)
    finally:
        if joined:
            ray.shutdown()


def _drive(space: SearchSpace, url: str, n_trials: int | None, timeout_s: float | None, address: str | None,
           say: Callable[[str], None], confirm_rounds: int) -> StudySummary:
    study, lock = open_study(space, url), StudyLock(url, space.name)  # the lock: for several drivers on one study
    rerun = recover_interrupted(study, lock)
    if rerun:
        say(f"trials {rerun} were interrupted earlier: marked FAIL (interrupted) and queued to run again")
    with lock:
        update_baseline_stats(study, space)
    _warm_start(space, say)
    bridge = _bridge_with_history(space, study)
    done = len(counted_trials(study))
    if n_trials is not None and done >= n_trials:
        say(f"study {space.name} already has {done} of {n_trials} trials; raise --n-trials to continue")
    else:
        _search(space, study, bridge, lock, url, n_trials, timeout_s, address, say, done)
    measure_kind_baselines(study, space, say, address or space.ray.address, lock)
    if space.trial.rungs:
        promote(study, space, say)
    if confirm_rounds > 0:
        confirm_winner(study, confirm_rounds, say, address or space.ray.address)
    return summarize(study, url)


def _warm_start(space: SearchSpace, say: Callable[[str], None]) -> None:
    """Build the built-in warm start (`model.init: supervised`) here, with its progress, before the trials
    on this machine need it (it is cached; trials on other machines of a cluster build their own once)."""
    cfg = trial_config(space, {}, "baseline", None)
    if is_builtin(cfg.model.init):
        warm_backbone_file(cfg, say)


def _search(space: SearchSpace, study, bridge: PruningBridge, lock: StudyLock, url: str, n_trials: int | None,
            timeout_s: float | None, address: str | None, say: Callable[[str], None], done: int) -> None:
    """The search itself: trials through Ray Tune until the study's budget is spent."""
    started_ray = _init_ray(address or space.ray.address)
    try:
        resources, concurrency = _resources(space, _nodes())
        say(f"study {space.name}: {done} trials stored, running up to {n_trials or 'unlimited'}"
            f"{f' for at most {timeout_s:.0f} s' if timeout_s else ''}; {resources} per trial, {concurrency} at a time; {url}")
        searcher = StudySearcher(study, space, bridge, n_trials, resources.get("cpu", 1), progress=say,
                                 show_nodes=len([n for n in ray.nodes() if n.get("Alive")]) > 1, lock=lock)
        shared = space.ray.storage_path
        ray_dir = (shared if "://" in shared else Path(shared).resolve()) if shared else study_folder(space.name)
        tuner = tune.Tuner(
            tune.with_resources(run_trial, resources),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=PruningScheduler(bridge), num_samples=-1,
                                        max_concurrent_trials=concurrency, time_budget_s=timeout_s,
                                        reuse_actors=space.ray.reuse_actors),
            run_config=tune.RunConfig(storage_path=str(ray_dir), name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine prints every trial error's result table
        with _quiet_ray():
            tuner.fit()
    finally:
        left = recover_interrupted(study, lock)  # still running when Ray stopped (time limit, Ctrl-C)
        if left:
            say(f"trials {left} did not finish: queued to run again next time")
        if started_ray:
            ray.shutdown()


def measure_kind_baselines(study, space: SearchSpace, say: Callable[[str], None], address: str | None = None,
                           lock: StudyLock | None = None) -> dict[str, dict]:
    """Measure the baseline's config (its speed phase, as `tuner confirm` does) once on each other kind of
    hardware the study's trials completed on, and store it per kind as the study's `baselines_by_kind`.

    A trial's throughput on another machine says as much about the machine as about its knobs; against
    the baseline measured on its own kind of hardware, its speedup is the knobs' alone
    (`tuner.summary.speedup_of`). Each kind is measured once per study, with the trials' torch threads,
    on a node of the cluster at `address` with that hardware (without one, on this machine where it is
    of that kind). A kind with no such node left, or whose measurement fails, keeps the comparison with
    the baseline trial and a warning; the run goes on, and a later `tuner run` measures it. Returns the
    new measurements."""
    import contextlib
    import datetime

    from optuna.trial import TrialState

    from tuner.remeasure import MeasurementFailed, measured_config, on_cluster
    from tuner.select import baseline_trial
    from tuner.summary import hardware_kind, kind_baselines, trial_kind

    kinds = kind_baselines(study)
    missing: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("role") == "rung" or t.user_attrs.get("fail_reason"):
            continue  # a rung record stands for its parent; an OOM trial measured nothing
        kind = trial_kind(study, t)
        if kind in kinds and kinds[kind] is None:
            missing.setdefault(kind, []).append(t)
    if not missing:
        return {}
    base = baseline_trial(study)
    base_kind, base_tp = next(iter(kinds)), base.values[0]
    if space.ray.workers_per_trial > 1:
        say(f"warning: trials ran on {', '.join(missing)} and the baseline on {base_kind}, but a trial here is "
            f"{space.ray.workers_per_trial} processes and a re-measurement one: their speedups stay against the "
            "baseline trial")
        return {}
    try:  # torch threads as the trials had them
        threads = space.ray.torch_threads or int(_resources(space, _nodes())[0].get("cpu", 1))
    except ConfigError:  # no node fits a trial any more: the measuring node's own CPUs
        threads = space.ray.torch_threads
    done: dict[str, dict] = {}
    for kind, trials in missing.items():
        numbers = ", ".join(str(t.number) for t in trials)
        try:
            if address:
                measure, node = on_cluster(address, trials[0].user_attrs["hardware"], threads=threads)
            else:
                measure, node = _local_measure(threads)
                if hardware_kind(node) != kind:
                    raise ConfigError(f"no --address, and this machine is {hardware_kind(node)}")
            where = (f"node {node['node_id'][:8]} ({node['node_ip']})" if node.get("node_id")
                     else f"this machine ({node.get('host')})")
            say(f"trials {numbers} ran on {kind}, the baseline on {base_kind}: measuring the baseline "
                f"(trial {base.number}) on {where}")
            throughput = measure(measured_config(study, base))
        except (ConfigError, MeasurementFailed) as exc:
            say(f"warning: no baseline measured on {kind} ({exc}); the speedups of trials {numbers} stay against "
                f"the baseline trial on {base_kind}")
            continue
        done[kind] = {"throughput": throughput, "node": node, "baseline_trial": base.number,
                      "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        say(f"baseline on {kind}: {throughput:.1f} img/s (on {base_kind}: {base_tp:.1f} img/s); trials {numbers} "
            "are compared with it")
    if done:
        with lock or contextlib.nullcontext():  # several drivers: keep a kind another driver measured meanwhile
            stored = dict(study.user_attrs.get("baselines_by_kind") or {})
            study.set_user_attr("baselines_by_kind", {**done, **stored})
    return done


def _local_measure(threads: int | None):
    """`tuner.remeasure.local_measure` with torch at `threads` threads (if given) during each measurement."""
    import torch

    from tuner.remeasure import local_measure

    measure, node = local_measure()

    def with_threads(config):
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            return measure(config)
        finally:
            torch.set_num_threads(before)
    return with_threads, node


def confirm_winner(study, rounds: int, say: Callable[[str], None], address: str | None = None) -> None:
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
        confirm(study, "fastest", rounds, progress=say, address=address)
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


#: The environment of this job's Ray workers. Ray Tune runs each trial in a thread of its own, whose first
#: allocation would give it a glibc arena of its own, and such an arena maps every large block afresh
#: whatever the trainer's `system.host_allocator` says (trainer/allocator.py): one arena keeps trials on
#: the main heap from the first one on (the trainer sets the same limit for threads started after a run).
WORKER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "1"}}


def _init_ray(address: str | None, where: str = "--address") -> bool:
    """Start or join Ray unless this process already did; True when we must shut it down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _probe(address, where)
    try:
        # No address: a private local Ray, never a cluster someone else started with `ray start` on this
        # machine (Ray's default joins it, and its trials die when that cluster stops).
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True, runtime_env=WORKER_ENV)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if address is None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where} {address}: no Ray cluster could be joined there ({first[:200]})") from None
    return True


def _probe(address: str | None, where: str = "--address") -> None:
    """A one-line `ConfigError` at once when a `HOST:PORT` (or `ray://HOST:PORT`) address does not answer,
    instead of Ray's minutes of retries; `auto` and local Ray are left to `ray.init`."""
    import socket

    if not address or address == "auto" or address == "local":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where} {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"{where} {address}: no Ray cluster could be joined there ({exc.strerror or exc})") from None


def _nodes() -> list[dict[str, float]]:
    """The resources of each live node of the joined Ray, or of this machine before a local Ray starts."""
    if ray.is_initialized():
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def _resources(space: SearchSpace, nodes: list[dict[str, float]]) -> tuple[dict[str, float], int]:
    """What one trial takes, and how many run at once: one trial per GPU on GPU nodes, one per node (all
    of its CPUs) on CPU nodes, or exactly `ray.resources_per_trial`; as many at once as the cluster has
    such slots, so two measured trials never share a device (a CPU node's CPUs are one device)."""
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if space.ray.resources_per_trial:
        resources = dict(space.ray.resources_per_trial)
    elif gpus:
        per_node = max((n.get("CPU", 1) / n["GPU"] for n in nodes if n.get("GPU")), default=1)
        resources = {"gpu": 1, "cpu": max(1, int(per_node))}
    else:  # the largest CPU nodes (all of a homogeneous cluster), one trial each
        resources = {"cpu": max(int(n.get("CPU", 0)) for n in nodes) or 1}
    slots = sum(_fits(n, resources) for n in nodes)
    if slots == 0:
        names = {"CPU", "GPU"} | {r.upper() if r in ("cpu", "gpu") else r for r in resources}
        have = "; ".join(sorted(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in names and v) or "no CPU"
                                for n in nodes))
        want = ", ".join(f"{k} {v:g}" for k, v in resources.items())
        raise ConfigError(f"{space.source}: ray.resources_per_trial ({want}): no node has that "
                          f"(the nodes have: {have})")
    return resources, max(1, space.ray.max_concurrent_trials or slots)


def _fits(node: dict[str, float], resources: dict[str, float]) -> int:
    """How many trials taking `resources` fit on a node at once (Ray names CPU and GPU in capitals)."""
    counts = []
    for name, amount in resources.items():
        have = node.get(name.upper() if name in ("cpu", "gpu") else name, 0.0)
        if amount > 0:
            counts.append(int(have // amount))
    return min(counts) if counts else 1


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
