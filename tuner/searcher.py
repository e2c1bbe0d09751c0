"""The Ray Tune searcher that owns the Optuna study: ask in `suggest`, tell in `on_trial_complete`.

Only this object (in the driver) writes the study. It asks Optuna for a trial (baseline trials come
first, from the queue), samples the knobs define-by-run (so conditions work), validates the resulting
`TrainConfig` before any Ray work, and tells Optuna how the trial ended:

- COMPLETE with (throughput, kNN) and the feasibility constraints, or
- PRUNED with the phase and the pruner's reason (from the pruning bridge's ledger), or
- FAIL with `fail_reason` (dataloader, compile, timeout, killed, error, invalid_config).

Out-of-memory and a non-finite loss are the exceptions: they are properties of the configuration (on one
CPU, bf16 with local crops diverges at every seed), so they are told COMPLETE at (0 img/s, 0 kNN) with
violated constraints, and samplers that learn from constraints learn where memory runs out or training
diverges instead of proposing the same region again (`fail_reason` is still "oom" or "nan"; the trial is
never feasible, never a winner, and is counted with the failures).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from trainer.config import ConfigError, TrainConfig, apply_overrides
from tuner.promotion import tidy_checkpoints, trial_dir
from tuner.pruning import PruningBridge
from tuner.space import ENV_PREFIX, SearchSpace
from tuner.study import (BASELINE_ROLES, CONTROL, REFERENCE_ROLES, StudyLock, baseline_params, baseline_trials,
                         control_trial, counted_trials, driver_id, recover_interrupted, requeue)
from tuner.trial import SUMMARY_FIELDS


@dataclass
class Live:
    """A trial Ray is running: the Optuna trial object and what we know so far."""

    trial: optuna.trial.Trial
    role: str
    started: float
    intermediate: dict[str, dict[int, float]]


def sample_params(trial: optuna.trial.Trial, space: SearchSpace, role: str) -> dict[str, Any]:
    """Suggest each knob in file order, skipping knobs whose conditions fail (define-by-run). The baseline's
    trials suggest the knobs `baseline_params` gives them (it checks their conditions against the baseline)."""
    only = baseline_params(space) if role in REFERENCE_ROLES else None
    base = space.base_config().to_dict()
    values: dict[str, Any] = {}

    def lookup(path: str) -> Any:
        if path in values:
            return values[path]
        node: Any = base
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    for name, param in space.params.items():
        if only is not None:
            if name not in only:
                continue
        elif not all(cond.holds(lookup(cond.path)) for cond in param.conditions()):
            continue
        dist = param.distribution()
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, optuna.distributions.IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


def trial_config(space: SearchSpace, params: dict[str, Any], role: str, seed: int | None) -> TrainConfig:
    """The full-training config of a trial: base + knobs (+ the baseline's overrides) (+ seed)."""
    data = space.base_config().to_dict()
    data = apply_overrides(data, [(k, v) for k, v in params.items() if not k.startswith(ENV_PREFIX)])
    if role in REFERENCE_ROLES:
        data = apply_overrides(data, list(space.baseline.items()))
    if role == CONTROL:
        data = apply_overrides(data, list((space.constraints.knn_control or {}).items()))
    if seed is not None:
        data = apply_overrides(data, [("system.seed", seed)])
    return TrainConfig.from_dict(data, source="trial config")


class StudySearcher(Searcher):
    """Ask/tell over an Optuna study, for Ray Tune (see the module docstring)."""

    def __init__(self, study: optuna.Study, space: SearchSpace, bridge: PruningBridge, n_trials: int | None,
                 cpus_per_trial: float, progress: Callable[[str], None] | None = None,
                 lock: StudyLock | None = None, show_nodes: bool = False):
        super().__init__(metric=None, mode=None)
        self.show_nodes = show_nodes  # a cluster of several nodes: each progress line names the trial's node
        self.study, self.space, self.bridge = study, space, bridge
        self.n_trials, self.cpus = n_trials, cpus_per_trial
        self.progress = progress or (lambda line: None)
        self.live: dict[str, Live] = {}
        self.lock = lock or contextlib.nullcontext()  # the study's lock among several drivers
        self._look_again = 0.0

    # ---- Ray Tune's Searcher API ----------------------------------------------------------------

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """The next trial's spec, None to wait (baseline still running), or FINISHED.

        Several drivers may share the study: the budget counts every driver's running trials, search
        trials wait for the baseline whichever driver runs it, and a dead driver's running trials are
        taken over (marked interrupted, queued again)."""
        if any(live.role in BASELINE_ROLES for live in self.live.values()) or time.monotonic() < self._look_again:
            return None
        with self.lock:
            taken = recover_interrupted(self.study, others_only=True)  # the lock is held already
            if taken:
                self.progress(f"trials {taken} were left running by a driver that is gone: marked FAIL (interrupted) "
                              "and queued to run again")
            if self._baseline_elsewhere():
                self._look_again = time.monotonic() + 1.0  # Ray Tune asks again at once; the database need not answer
                return None
            return self._ask(trial_id)

    def _baseline_elsewhere(self) -> bool:
        """Whether another driver runs a baseline trial and none is left to run here: search trials wait."""
        pending = [t.state for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
                   if t.user_attrs.get("role") in BASELINE_ROLES]
        return bool(pending) and TrialState.WAITING not in pending

    def _used(self) -> int:
        """Trials of the budget: finished ones that count, and those running now in any driver (rungs aside)."""
        running = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get("role") != "rung"]
        return len(counted_trials(self.study)) + len(running)

    def _ask(self, trial_id: str) -> dict[str, Any] | None:
        for _ in range(100):
            if self.n_trials is not None and self._used() >= self.n_trials:
                return Searcher.FINISHED
            exhausted = getattr(self.study.sampler, "is_exhausted", None)  # grid, bruteforce: every point tried
            if exhausted is not None and exhausted(self.study) and not self._queued():
                return Searcher.FINISHED
            trial = self.study.ask()
            trial.set_user_attr("driver", driver_id())  # whose trial it is, when several drivers share a study
            role = trial.user_attrs.get("role", "search")
            seed = trial.user_attrs.get("seed")
            params = sample_params(trial, self.space, role)
            try:
                config = trial_config(self.space, params, role, seed)
            except ConfigError as exc:
                self._tell_fail(trial, "invalid_config", str(exc).replace("trial config: ", ""))
                continue
            trial.set_user_attr("role", role)
            trial.set_user_attr("config", config.to_dict())
            env = {k[len(ENV_PREFIX):]: v for k, v in params.items() if k.startswith(ENV_PREFIX)}
            self.live[trial_id] = Live(trial, role, time.monotonic(), {"speed": {}, "quality": {}})
            if role in REFERENCE_ROLES:
                self.bridge.exempt.add(trial_id)  # the baseline is the reference, the control judges it: never pruned
            out_dir = str(trial_dir(self.study.study_name, trial.number)) if self.space.trial.rungs else None
            return {"number": trial.number, "role": role, "config": config.to_dict(), "env": env, "out_dir": out_dir,
                    "trial_overrides": self.space.trial.overrides(),
                    "cpus": self.space.ray.torch_threads or self.cpus, "workers": self.space.ray.workers_per_trial,
                    "timeout_s": trial_timeout_s(self.study, self.space)}
        return Searcher.FINISHED

    def _queued(self) -> bool:
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Store each phase's intermediate value as it arrives (kept even if the driver dies)."""
        live = self.live.get(trial_id)
        phase = result.get("phase")
        if live is not None and result.get("node_id") and "node_id" not in live.trial.user_attrs:
            live.trial.set_user_attr("node_id", result["node_id"])  # the Ray node it runs on, as soon as known
            live.trial.set_user_attr("node_ip", result.get("node_ip"))
        if live is None or phase not in ("speed", "quality"):
            return
        metric = "throughput_img_s" if phase == "speed" else self.space.constraints.knn_metric
        if result.get(metric) is not None:
            _store_intermediate(live, phase, int(result.get("step", 0)), float(result[metric]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell Optuna how the trial ended (COMPLETE, PRUNED or FAIL) with all its attributes."""
        live = self.live.get(trial_id)
        try:
            self._record(trial_id, result, error)
        except Exception as exc:  # never let bookkeeping kill the study; the trial must not stay RUNNING
            logging.getLogger(__name__).exception("recording trial %s failed", trial_id)
            if live is not None and live.trial.number is not None:
                state = self.study.get_trials(deepcopy=False)[live.trial.number].state
                if state == TrialState.RUNNING:
                    self._tell_fail(live.trial, "error", f"tuner bookkeeping: {type(exc).__name__}: {exc}")

    def _record(self, trial_id: str, result: dict | None, error: bool) -> None:
        live = self.live.pop(trial_id, None)
        decision = self.bridge.finish(trial_id)
        if live is None:
            return
        result = unflatten(result or {})
        trial, elapsed = live.trial, result.get("time_total_s") or (time.monotonic() - live.started)
        trial.set_user_attr("time_s", float(elapsed))
        if result.get("hardware"):
            trial.set_user_attr("hardware", result["hardware"])
        for key in ("node_id", "node_ip"):
            if result.get(key) and key not in trial.user_attrs:
                trial.set_user_attr(key, result[key])
        phase = result.get("phase")
        if decision is not None:
            _store_intermediate(live, decision.phase, decision.step, decision.value)  # Ray does not pass the last result on
            self._tell_pruned(trial, decision)
        elif error:
            reason = "timeout" if elapsed >= trial_timeout_s(self.study, self.space) else "killed"
            self._tell_fail(trial, reason, "the trial process died" if reason == "killed" else "trial ran past its timeout")
        elif phase == "done":
            self._tell_complete(trial, live.role, result)
        elif phase == "failed":
            if result.get("fail_reason") in INFEASIBLE_FAILURES:
                self._tell_infeasible(trial, result)
            else:
                self._tell_fail(trial, result.get("fail_reason", "error"), result.get("fail_message", ""), result.get("fail_step"))
        else:  # stopped by the study's time limit before it finished
            self._tell_fail(trial, "interrupted", "stopped before it finished (study time limit)")
            requeue(self.study, trial)
        if live.role in REFERENCE_ROLES:
            with self.lock:  # another driver may be telling the baseline's other seed: the last to write sees both
                update_baseline_stats(self.study, self.space)
        if self.space.trial.rungs:
            tidy_checkpoints(self.study)  # only trials that can still be promoted keep theirs
        self.progress(progress_line(self.study, trial.number, self.n_trials, self.show_nodes))
        if live.role == "baseline" and self.study.user_attrs.get("baseline_time_s"):
            self.progress(self._time_estimate())

    def _time_estimate(self) -> str:
        """How long the rest of the study takes on this machine, from the baseline's own trial time."""
        base_s, limit = float(self.study.user_attrs["baseline_time_s"]), trial_timeout_s(self.study, self.space)
        left = (self.n_trials - len(counted_trials(self.study))) if self.n_trials is not None else None
        if not left or left <= 0:
            return f"the baseline's trial took {base_s:.0f} s on this machine; trials are stopped at {limit:.0f} s"
        return (f"the baseline's trial took {base_s:.0f} s on this machine: the {left} trials left take about "
                f"{_duration(left * base_s)} if none is slower than the baseline, at most {_duration(left * limit)} "
                f"(each is stopped at {limit:.0f} s)")

    # ---- telling ------------------------------------------------------------------------------------

    def _tell_complete(self, trial: optuna.trial.Trial, role: str, result: dict) -> None:
        """COMPLETE with (throughput, kNN of the space's `constraints.knn_backbone`); both backbones' kNN stored."""
        student = self.space.constraints.knn_backbone == "student"
        throughput, knn = result.get("throughput_img_s"), result.get(self.space.constraints.knn_metric)
        if throughput is None or knn is None:
            self._tell_fail(trial, "error", "the run ended without a throughput or kNN measurement")
            return
        for key in SUMMARY_FIELDS:
            if result.get(key) is not None:
                trial.set_user_attr(key, result[key])
        trial.set_user_attr("knn_backbone", self.space.constraints.knn_backbone)
        intermediate = dict(trial.user_attrs.get("intermediate_values", {"speed": {}, "quality": {}}))
        evals = {int(k): float(v) for k, v in (result.get("student_evals" if student else "evals") or {}).items()}
        intermediate["quality"] = {**intermediate.get("quality", {}), **evals}
        for step, value in evals.items():
            trial.storage.set_trial_intermediate_value(trial._trial_id, step, value)
        trial.set_user_attr("intermediate_values", intermediate)
        self._set_relative(trial, role, float(throughput), float(knn), float(result.get("peak_memory_mb") or 0.0))
        self.study.tell(trial, [float(throughput), float(knn)])

    def _tell_infeasible(self, trial: optuna.trial.Trial, result: dict) -> None:
        """Out of memory or a non-finite loss: COMPLETE at (0, 0) with the kNN constraint violated (and the
        memory one, for oom), so the sampler learns the region; `fail_reason` keeps it out of every winner."""
        reason = result["fail_reason"]
        _record_failure(trial, reason, result.get("fail_message", ""), result.get("fail_step"))
        trial.set_user_attr("infeasible", reason)
        base = self.study.user_attrs
        trial.set_constraint("knn_points", float(base.get("baseline_knn_top1") or 1.0))
        trial.set_constraint("memory", 1.0 if reason == "oom" else -1.0)
        self.study.tell(trial, [0.0, 0.0])

    def _tell_pruned(self, trial: optuna.trial.Trial, decision) -> None:
        trial.set_user_attr("pruned_phase", decision.phase)
        trial.set_user_attr("prune_reason", decision.reason)
        trial.set_user_attr("pruned_at_step", decision.step)
        trial.set_user_attr("time_saved_s", self._time_saved(trial, decision))
        self.study.tell(trial, state=TrialState.PRUNED)

    def _time_saved(self, trial: optuna.trial.Trial, decision) -> float:
        """Training time the trial would still have spent: remaining steps at its own measured throughput."""
        budget = self.space.trial
        done = budget.speed_steps if decision.phase == "speed" else decision.step
        speed = trial.user_attrs.get("intermediate_values", {}).get("speed", {})
        throughput = next(iter(speed.values()), None)
        if not throughput:
            return 0.0
        optim = trial.user_attrs["config"]["optim"]
        images_per_step = optim["batch_size"] * optim["accumulation_steps"]
        return max(0, budget.steps - done) * images_per_step / float(throughput)

    def _tell_fail(self, trial: optuna.trial.Trial, reason: str, message: str, step: int | None = None) -> None:
        _record_failure(trial, reason, str(message)[:500], step)
        self.study.tell(trial, state=TrialState.FAIL)

    def _set_relative(self, trial: optuna.trial.Trial, role: str, throughput: float, knn: float, peak_mb: float) -> None:
        """Speedup over the baseline, kNN difference and whether it is within noise, and the constraints."""
        attrs = self.study.user_attrs
        base_tp, base_knn = attrs.get("baseline_throughput_img_s"), attrs.get("baseline_knn_top1")
        tolerance = attrs.get("knn_tolerance_effective", self.space.constraints.knn_tolerance_points)
        if role in BASELINE_ROLES or base_knn is None:
            knn_violation = -tolerance  # the baseline is the reference, feasible by definition
        else:
            knn_violation = (base_knn - tolerance) - knn
            noise = attrs.get("knn_noise_points")
            trial.set_user_attr("knn_delta_points", knn - base_knn)
            trial.set_user_attr("knn_within_noise", noise is not None and abs(knn - base_knn) <= noise)
        if base_tp:
            trial.set_user_attr("speedup", throughput / base_tp)
        elif role == "baseline":
            trial.set_user_attr("speedup", 1.0)
        limit = self.space.constraints.peak_memory_mb
        trial.set_constraint("knn_points", float(knn_violation))
        trial.set_constraint("memory", float(peak_mb - limit) if limit else -1.0)


def trial_timeout_s(study: optuna.Study, space: SearchSpace) -> float:
    """A trial's time limit: `trial.timeout_s`, raised to `timeout_factor` x the baseline's trial time once
    that is measured, so the limits of a study scale with the machine it runs on."""
    budget, base_s = space.trial, study.user_attrs.get("baseline_time_s")
    if budget.timeout_factor is None or not base_s:
        return budget.timeout_s
    return max(budget.timeout_s, budget.timeout_factor * float(base_s))


def unflatten(result: dict[str, Any]) -> dict[str, Any]:
    """Undo Ray Tune's flattening of nested result dicts ("phases_ms/data" -> {"phases_ms": {"data": ...}})."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        node, parts = out, str(key).split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _store_intermediate(live: Live, phase: str, step: int, value: float) -> None:
    """A phase's value at `step`: in the trial's attributes (both phases), and as Optuna's own
    intermediate value for the quality phase (kNN), which optuna-dashboard plots."""
    live.intermediate[phase][step] = value
    live.trial.set_user_attr("intermediate_values", live.intermediate)
    if phase == "quality":
        live.trial.storage.set_trial_intermediate_value(live.trial._trial_id, step, value)


def update_baseline_stats(study: optuna.Study, space: SearchSpace) -> None:
    """Baseline throughput and kNN (mean over seeds), the kNN noise, the effective tolerance, warnings.

    The kNN is the study's objective value, i.e. the backbone `constraints.knn_backbone` names; the
    warning compares it with that backbone's kNN before training.
    """
    trials = baseline_trials(study)
    if not trials:
        return
    first = trials[0]
    knns = [t.values[1] for t in trials]
    study.set_user_attr("baseline_trial", first.number)
    study.set_user_attr("baseline_throughput_img_s", first.values[0])  # trial 0 is 1.00x by definition
    study.set_user_attr("baseline_throughput_seeds", [t.values[0] for t in trials])
    study.set_user_attr("baseline_knn_top1", statistics.fmean(knns))
    study.set_user_attr("baseline_knn_seeds", knns)
    study.set_user_attr("baseline_time_s", first.user_attrs.get("time_s"))
    noise = (max(knns) - min(knns)) if len(knns) > 1 else None
    study.set_user_attr("knn_noise_points", noise)
    tolerance = max(space.constraints.knn_tolerance_points, noise or 0.0)
    study.set_user_attr("knn_tolerance_effective", tolerance)
    metric = space.constraints.knn_metric
    control = space.constraints.knn_control
    if control:  # a positive control decides whether the check has power, not the baseline's own move
        found = control_trial(study)
        power = control_power(statistics.fmean(knns), tolerance, float(found.values[1]) if found else None, control,
                              f" at {space.trial.steps} steps")
    else:
        power = knn_power(trials, metric, space.trial.steps)
    study.set_user_attr("knn_power", power)
    initial = first.user_attrs.get(f"{metric}_initial")
    if control:
        study.set_user_attr("quality_warning", None if power["calibrated"] else power["text"])
    elif initial is not None and max(knns) <= initial:
        best = f"best of its {len(knns)} seeds: {max(knns):.1f}" if len(knns) > 1 else f"{knns[0]:.1f}"
        whose = "student " if metric.startswith("student") else ""
        study.set_user_attr("quality_warning", f"the baseline's {whose}kNN ({best}) did not rise above its initial "
                            f"value ({initial:.1f}): this quality phase measures nothing; raise trial.steps")
    elif not power["calibrated"]:
        study.set_user_attr("quality_warning", power["text"])
    else:
        study.set_user_attr("quality_warning", None)


def seed_moves(finals: list[float], initials: list[float | None]) -> tuple[list[float], float] | None:
    """Each baseline seed's kNN rise (final - initial) and the spread of the finals between seeds; None with
    fewer than 2 seeds or a missing initial value. The kNN check has power where every rise exceeds the spread."""
    if len(finals) < 2 or any(i is None for i in initials):
        return None
    return [f - float(i) for f, i in zip(finals, initials)], max(finals) - min(finals)


def control_power(base_knn: float, tolerance: float, control_knn: float | None, control: dict[str, Any],
                  where: str) -> dict[str, Any]:
    """Whether the kNN check has power, judged by a positive control: the baseline with a change known to harm
    learning (`constraints.knn_control`). The check can tell harm from noise where the control's kNN falls
    below the baseline's by more than the tolerance; a baseline that merely moves (or does not) says neither:
    measured here, a warm start's teacher kNN fell 1.7 points in 200 steps yet did not see lr x20, while the
    student's kNN did not move at all yet lost 9 points under lr x20 (docs/quality.md)."""
    change = ", ".join(f"{k}={v}" for k, v in control.items())
    out: dict[str, Any] = {"calibrated": False, "control": change, "control_knn": control_knn, "baseline_knn": base_knn,
                           "tolerance": tolerance}
    if control_knn is None:
        out["text"] = f"method changes are unmeasured{where}: the control ({change}) has no kNN yet"
        return out
    delta = control_knn - base_knn
    out["control_delta_points"] = delta
    if delta < -tolerance:
        out["calibrated"] = True
        out["text"] = (f"a control that harms learning ({change}) lost {-delta:.1f} points of kNN{where}, beyond the "
                       f"tolerance ({tolerance:.1f}): the kNN check can see method changes")
    else:
        out["text"] = (f"method changes are unmeasured{where}: a control that harms learning ({change}) moved kNN only "
                       f"{delta:+.1f} points, within the tolerance ({tolerance:.1f})")
    return out


def knn_power(trials: list, metric: str, steps: int | None) -> dict[str, Any]:
    """Whether this study's kNN check can tell a harmful method change from a harmless one at all.

    It can only if the baseline itself, at every seed, moves its kNN beyond the spread between its seeds
    within the trial's budget: otherwise a trial's kNN "within tolerance" says nothing about what the
    trial learned. Where the baseline rose but not enough, a straight line through its kNN before and
    after training estimates the budget at which the rise would clear the noise.
    """
    found = seed_moves([float(t.values[1]) for t in trials], [t.user_attrs.get(f"{metric}_initial") for t in trials])
    out: dict[str, Any] = {"calibrated": False, "seeds": len(trials), "budget_steps": steps, "needed_steps": None,
                           "moved_points": None, "noise_points": None}
    if found is None:
        out["text"] = ("method changes are unmeasured at this budget: the baseline ran at one seed, so the kNN noise "
                       "is unknown (constraints.knn_noise_seeds >= 2)")
        return out
    moves, noise = found
    moved = statistics.fmean(moves)
    out.update(moved_points=moved, noise_points=noise)
    if min(moves) > noise:
        out["calibrated"] = True
        out["text"] = (f"the baseline's kNN rose {moved:+.1f} points at every one of {len(trials)} seeds, beyond "
                       f"their spread ({noise:.1f}): the kNN check can see method changes at this budget")
        return out
    where = f" in {steps} steps" if steps else ""
    if moved > 0 and steps:
        out["needed_steps"] = int(steps * max(noise, 1e-9) / moved) + 1
        estimate = (f"; about {out['needed_steps']} steps would be needed (a straight line through its kNN before "
                    "and after training)")
    else:
        estimate = "; no budget can be estimated from a kNN that did not rise"
    out["text"] = (f"method changes are unmeasured at this budget: the baseline's kNN moved {moved:+.1f} points"
                   f"{where}, not beyond the spread of its {len(trials)} seeds ({noise:.1f}){estimate}")
    return out


#: Failures told COMPLETE and infeasible, so the sampler learns from them (see the module's docstring).
INFEASIBLE_FAILURES = ("oom", "nan")


def _record_failure(trial: optuna.trial.Trial, reason: str, message: str, step: int | None) -> None:
    """A failed trial's reason, message and (when the trainer gave one) the optimizer step it stopped at."""
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("fail_message", message)
    if step is not None:
        trial.set_user_attr("fail_step", int(step))


def progress_line(study: optuna.Study, number: int, n_trials: int | None, show_node: bool = False) -> str:
    """One line per finished trial: n of N, state, throughput, kNN, speedup, best feasible so far."""
    from tuner.select import best_feasible
    from tuner.summary import knn_key, speedup_of

    t = study.get_trials(deepcopy=False)[number]
    done = len(counted_trials(study))
    u = t.user_attrs
    parts = [f"trial {done}/{n_trials or '?'} (#{t.number}{', ' + u['role'] if u.get('role', 'search') != 'search' else ''})",
             f"{t.state.name:<8}"]
    if u.get("throughput_img_s") is not None:
        parts.append(f"{u['throughput_img_s']:8.1f} img/s")
    key = knn_key(t)  # the kNN the study judges by: the teacher's, or the student's (constraints.knn_backbone)
    if u.get(key) is not None:
        parts.append(f"{'student ' if key.startswith('student') else ''}kNN {u[key]:5.1f}")
    speedup = speedup_of(study, t)
    if speedup is not None:
        parts.append(f"x{speedup:.2f}")
    if u.get("fail_reason"):
        parts.append(f"fail: {u['fail_reason']}" + (f" at step {u['fail_step']}" if u.get("fail_step") is not None else ""))
    if u.get("pruned_phase"):
        parts.append(f"pruned in {u['pruned_phase']}: {u.get('prune_reason', '')}")
    if show_node and u.get("node_id"):
        parts.append(f"on node {u['node_id'][:8]} ({u.get('node_ip')})")
    best = best_feasible(study)
    if best is not None:
        parts.append(f"| best feasible #{best.number} x{speedup_of(study, best) or float('nan'):.2f}")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    """`40 s` under two minutes, else whole minutes (`12 min`)."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
