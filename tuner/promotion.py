"""Promotion rungs: the quality check of the Pareto candidates at longer budgets (successive halving).

A study's trials are short: their speed is measured well, their kNN often is not (the baseline's kNN
may not move beyond its noise in `trial.steps`). With `trial.rungs: [S1, S2, ...]`, every trial's
schedules span the last rung (`budget.steps = S_last`) while it stops at `trial.steps`
(`budget.stop_at_step`) and leaves its checkpoint in `studies/<name>/trials/<number>/`. After the
search, the baseline (every seed) and the Pareto candidates continue from those checkpoints, never from
scratch, to S1 steps; each candidate's kNN is judged against the baseline's kNN *at the same rung*
(tolerance: the larger of `constraints.knn_tolerance_points` and the baseline seeds' spread there); a
candidate beyond it is PRUNED at that rung; of those within it, the fastest 1/`rung_reduction` go on to
S2, and so on. Only trials that can still be candidates keep a checkpoint while the search runs.

Each (trial, rung) is stored as its own Optuna trial, `role: rung`, with the parent's params, state
COMPLETE (values: the parent's throughput and the kNN at the rung) or PRUNED (`pruned_phase: rung`,
`pruned_rung`, `prune_reason`), and user attributes `parent`, `rung`, `rung_steps`, the baseline's kNN
at the rung, the tolerance and whether the baseline's kNN moved beyond its noise there (`calibrated`).
Finished trials cannot be changed in Optuna, so a parent stays COMPLETE; `tuner.select` treats a parent
whose rung record is PRUNED as infeasible, and the quality verdict reads its last rung.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from trainer.config import TrainConfig

RUNG = "rung"
CHECKPOINT = "checkpoint.pt"


def study_folder(study_name: str) -> Path:
    """The study's own folder, `studies/<name>/` (absolute: trials run in Ray's own folders): Ray's run
    folders by default, and the trials' checkpoints."""
    return Path("studies").resolve() / study_name


def trials_root(study_name: str) -> Path:
    """Where a study's trials leave their checkpoints."""
    return study_folder(study_name) / "trials"


def trial_dir(study_name: str, number: int) -> Path:
    return trials_root(study_name) / str(number)


def rung_records(study: optuna.Study) -> dict[int, list[FrozenTrial]]:
    """{parent trial number: its rung records, lowest rung first}."""
    out: dict[int, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("role") == RUNG:
            out.setdefault(int(t.user_attrs["parent"]), []).append(t)
    for records in out.values():
        records.sort(key=lambda t: t.user_attrs["rung"])
    return out


def pruned_at_rung(study: optuna.Study) -> dict[int, FrozenTrial]:
    """{parent number: the rung record that pruned it}."""
    return {parent: records[-1] for parent, records in rung_records(study).items()
            if records and records[-1].state == TrialState.PRUNED}


def _screened(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible screening trials as the search left them (baseline seeds and rung records aside,
    whatever the rungs later decided)."""
    from tuner.select import is_feasible

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and t.user_attrs.get("role", "search") == "search"]


def candidates(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that may enter the first rung: the Pareto set of the screening trials, fastest first,
    ranked as the winner is (`tuner.select.speed_of`: on several kinds of hardware by the speedup against
    each trial's own kind's baseline, and a trial on a kind without one does not enter: it cannot win)."""
    from tuner.select import non_dominated, speed_of

    return non_dominated(_screened(study), speed_of(study))


def may_become_candidates(study: optuna.Study) -> list[FrozenTrial]:
    """The trials whose checkpoints are kept while the search runs. On one kind of hardware the candidates.
    On several, a kind's baseline is only measured after the search (`tuner.runner.measure_kind_baselines`),
    so each kind's own Pareto front by throughput is kept: within a kind the speedup orders trials as the
    throughput does, so every trial the candidates can hold once the baselines are measured is among them."""
    from tuner.select import non_dominated, several_kinds
    from tuner.summary import trial_kind

    if not several_kinds(study):
        return candidates(study)
    by_kind: dict[str | None, list[FrozenTrial]] = {}
    for t in _screened(study):
        by_kind.setdefault(trial_kind(study, t), []).append(t)
    return [t for trials in by_kind.values() for t in non_dominated(trials)]


def tidy_checkpoints(study: optuna.Study) -> None:
    """Delete the checkpoints of trials that can no longer enter a rung (pruned, failed, or off the
    Pareto set: `may_become_candidates`); the baseline's seeds keep theirs. Logs and summaries stay."""
    root = trials_root(study.study_name)
    if not root.is_dir():
        return
    keep = {t.number for t in may_become_candidates(study)}
    keep |= {t.number for t in study.get_trials(deepcopy=False)
             if t.user_attrs.get("role") in ("baseline", "baseline_noise", "control") or t.state == TrialState.RUNNING}
    for folder in root.iterdir():
        if folder.name.isdigit() and int(folder.name) not in keep:
            (folder / CHECKPOINT).unlink(missing_ok=True)


def promote(study: optuna.Study, space, say: Callable[[str], None] = lambda _: None,
            continue_run: Callable[[TrainConfig, Path], dict[str, Any]] | None = None) -> None:
    """Run the rungs the space names (`trial.rungs`), continuing where an earlier call stopped."""
    from tuner.select import speed_of
    from tuner.study import baseline_trials, control_trial

    rungs = list(space.trial.rungs)
    if not rungs:
        return
    if continue_run is None:
        threads = space.ray.torch_threads
        continue_run = lambda config, folder: _continue_in_process(config, folder, threads)  # noqa: E731
    metric = space.constraints.knn_metric
    bases = baseline_trials(study)
    if not bases:
        say("promotion: no completed baseline trial to judge against; rungs skipped")
        return
    entrants, speed = candidates(study), speed_of(study)  # ranked as the winner is
    if space.trial.rung_candidates:
        entrants = entrants[:space.trial.rung_candidates]
    control = control_trial(study) if space.constraints.knn_control else None
    say(f"promotion: {len(bases)} baseline seed(s){', the control' if control else ''} and {len(entrants)} Pareto "
        f"candidate(s) continue from their checkpoints to rungs at {', '.join(map(str, rungs))} steps")
    for r, steps in enumerate(rungs):
        done = {(int(t.user_attrs["parent"])): t for records in rung_records(study).values() for t in records
                if t.user_attrs["rung"] == r}
        base_knns, base_initials = [], []
        for t in bases:
            record = done.get(t.number) or _run_rung(study, space, t, r, steps, None, continue_run, say)
            if record is None:
                say(f"promotion: the baseline (trial {t.number}) did not finish rung {r + 1}; rungs stopped")
                return
            base_knns.append(float(record.user_attrs[metric]))
            base_initials.append(t.user_attrs.get(f"{metric}_initial"))
        judge = _rung_judge(space, base_knns, base_initials, steps)
        if space.constraints.knn_control:  # the positive control decides this rung's power, before any candidate
            from tuner.searcher import control_power

            record = (done.get(control.number) or _run_rung(study, space, control, r, steps, judge, continue_run, say)
                      if control is not None else None)
            knn = record.user_attrs.get(metric) if record is not None else None
            power = control_power(judge["baseline_knn"], judge["tolerance"], None if knn is None else float(knn),
                                  space.constraints.knn_control, f" at {steps} steps")
            judge.update(calibrated=power["calibrated"], text=f"{power['text']}; candidates more than "
                         f"{judge['tolerance']:.1f} points below the baseline are pruned")
        say(f"rung {r + 1} ({steps} steps): baseline kNN {judge['baseline_knn']:.1f} "
            f"(seeds {', '.join(f'{k:.1f}' for k in base_knns)}); {judge['text']}")
        survivors = []
        for t in entrants:
            record = done.get(t.number) or _run_rung(study, space, t, r, steps, judge, continue_run, say)
            if record is not None and record.state == TrialState.COMPLETE:
                survivors.append(t)
        if r + 1 < len(rungs):
            keep = max(1, math.ceil(len(survivors) / space.trial.rung_reduction)) if survivors else 0
            entrants = sorted(survivors, key=lambda t: -speed(t))[:keep]
            if not entrants:
                say("promotion: no candidate is left for the next rung")
                return


def _rung_judge(space, knns: list[float], initials: list[Any], steps: int) -> dict[str, Any]:
    """The baseline's kNN at a rung, the tolerance there, and whether the check has power there."""
    from tuner.searcher import seed_moves

    mean = statistics.fmean(knns)
    noise = (max(knns) - min(knns)) if len(knns) > 1 else None
    tolerance = max(space.constraints.knn_tolerance_points, noise or 0.0)
    found = seed_moves(knns, initials)
    moves = found[0] if found else []
    calibrated = found is not None and min(moves) > found[1]
    if calibrated:
        text = (f"it rose {statistics.fmean(moves):+.1f} points at every seed, beyond their spread ({noise:.1f}): "
                f"candidates more than {tolerance:.1f} points below it are pruned")
    elif len(knns) < 2:
        text = "one baseline seed: the noise is unknown, so a verdict here is unmeasured"
    else:
        moved = statistics.fmean(moves) if moves else 0.0
        text = (f"it moved {moved:+.1f} points, not beyond its seeds' spread ({noise:.1f}): quality is unmeasured "
                f"at this rung; candidates more than {tolerance:.1f} points below it are still pruned")
    return {"baseline_knn": mean, "baseline_seeds": knns, "noise": noise, "tolerance": tolerance,
            "calibrated": calibrated, "steps": steps, "text": text}


def _run_rung(study: optuna.Study, space, parent: FrozenTrial, r: int, steps: int, judge: dict[str, Any] | None,
              continue_run, say) -> FrozenTrial | None:
    """Continue `parent` to `steps` from its checkpoint and store the rung record (None: it could not run)."""
    from tuner.remeasure import measured_config

    folder = trial_dir(study.study_name, parent.number)
    if not (folder / CHECKPOINT).is_file():
        say(f"  trial {parent.number}: no checkpoint in {folder} (a trial run on another machine?); not promoted")
        return None
    config = measured_config(study, parent).with_overrides({"budget.stop_at_step": steps})
    summary = continue_run(config, folder)
    metric = space.constraints.knn_metric
    knn = summary.get(metric)
    attrs = {"role": RUNG, "parent": parent.number, "rung": r, "rung_steps": steps,
             "knn_top1": summary.get("knn_top1"), "student_knn_top1": summary.get("student_knn_top1"),
             "knn_backbone": space.constraints.knn_backbone, "config": parent.user_attrs.get("config"),
             "throughput_img_s": parent.values[0], "speedup": parent.user_attrs.get("speedup"),
             "train_s": summary.get("train_s")}
    if summary.get("status") != "ok" or knn is None:
        reason = (summary.get("failure") or {}).get("reason", "error")
        say(f"  trial {parent.number}: rung {r + 1} failed ({reason})")
        attrs.update(pruned_phase=RUNG, pruned_rung=r, prune_reason=f"rung {r + 1} failed: {reason}")
        return _store(study, parent, TrialState.PRUNED, None, attrs, steps, None)
    knn = float(knn)
    constraints = None
    if judge is None:  # a baseline seed: the reference itself
        state, line = TrialState.COMPLETE, f"  baseline trial {parent.number}: kNN {knn:.1f} at {steps} steps"
    elif parent.user_attrs.get("role") == "control":  # judges the rung's power; never a candidate
        delta = knn - judge["baseline_knn"]
        attrs.update(control=True, knn_delta_points=delta, baseline_knn_at_rung=judge["baseline_knn"],
                     tolerance_points=judge["tolerance"], calibrated=delta < -judge["tolerance"])
        state = TrialState.COMPLETE
        constraints = {"knn_points": -judge["tolerance"] - delta, "memory": -1.0}  # infeasible where it lost kNN
        line = (f"  control trial {parent.number}: kNN {knn:.1f} at {steps} steps ({delta:+.1f} points; "
                f"{'beyond' if delta < -judge['tolerance'] else 'within'} the tolerance)")
    else:
        delta = knn - judge["baseline_knn"]
        attrs.update(knn_delta_points=delta, baseline_knn_at_rung=judge["baseline_knn"],
                     tolerance_points=judge["tolerance"], calibrated=judge["calibrated"])
        if delta < -judge["tolerance"]:
            state = TrialState.PRUNED
            reason = (f"kNN {knn:.1f} at {steps} steps, {delta:+.1f} points from the baseline's {judge['baseline_knn']:.1f}"
                      f" (tolerance {judge['tolerance']:.1f})")
            attrs.update(pruned_phase=RUNG, pruned_rung=r, prune_reason=reason)
            line = f"  trial {parent.number}: PRUNED at rung {r + 1}: {reason}"
        else:
            state = TrialState.COMPLETE
            constraints = {"knn_points": -judge["tolerance"] - delta, "memory": -1.0}
            line = f"  trial {parent.number}: kNN {knn:.1f} at {steps} steps ({delta:+.1f} points), within tolerance"
    say(line)
    values = [float(parent.values[0]), knn] if state == TrialState.COMPLETE else None
    return _store(study, parent, state, values, attrs, steps, knn, constraints)


def _store(study: optuna.Study, parent: FrozenTrial, state: TrialState, values, attrs: dict[str, Any], steps: int,
           knn: float | None, constraints: dict[str, float] | None = None) -> FrozenTrial:
    study.add_trial(create_trial(
        state=state, values=values, params=parent.params, distributions=parent.distributions, user_attrs=attrs,
        intermediate_values={steps: knn} if knn is not None else None,
        constraints=constraints if state == TrialState.COMPLETE else None))
    return study.get_trials(deepcopy=False)[-1]


def _continue_in_process(config: TrainConfig, folder: Path, threads: int | None = None) -> dict[str, Any]:
    """`trainer.train(config, out_dir=folder, resume=True)` in this process, one at a time (as confirm
    measures), kNN only at the rung's end; the summary, or the failure as a summary."""
    import torch

    from trainer.engine import train

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = train(config.with_overrides({"eval.every_steps": 0, "eval.every_epochs": 0}), out_dir=folder, resume=True)
    finally:
        torch.set_num_threads(before)
    if result.status != "ok":
        return {"status": result.status, "failure": result.failure}
    return result.summary
