"""Which trials count: feasibility, the Pareto set, and the pick policies (fastest, knee, trial:N).

Trials are ranked by their measured throughput, except where a study's trials ran on more than one kind
of hardware (`tuner.summary.kind_baselines`): a faster machine is not a faster knob, so there they are
ranked by their speedup against the baseline measured on their own kind (`speed_of`), and a trial on a
kind without such a baseline is not ranked at all (not the winner, not in the Pareto set).
"""

from __future__ import annotations

import math
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.config import ConfigError


def is_feasible(t: FrozenTrial) -> bool:
    """A complete, measured trial whose every constraint value is <= 0."""
    if t.state != TrialState.COMPLETE or t.user_attrs.get("fail_reason") or t.values is None:
        return False
    return all(v <= 0.0 for v in t.constraints.values())


def feasible_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible trials in trial order. Not candidates: the baseline's noise replicates (its config at
    other seeds: they measure noise, and trial 0 stands for that configuration), the records of
    promotion rungs (they stand for their parent trial), and trials a rung pruned (their kNN fell
    below the baseline's at a longer budget)."""
    from tuner.promotion import pruned_at_rung

    pruned = pruned_at_rung(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and t.user_attrs.get("role") not in ("baseline_noise", "rung", "control") and t.number not in pruned]


def throughput(t: FrozenTrial) -> float:
    return t.values[0]


def several_kinds(study: optuna.Study) -> bool:
    """Whether the study's trials measured their throughput on more than one kind of hardware."""
    from tuner.summary import kind_baselines

    return len(kind_baselines(study)) > 1


def speed_of(study: optuna.Study) -> Callable[[FrozenTrial], float | None]:
    """What the winner, the Pareto set, the knee and the promotion rungs rank a trial's speed by.

    On one kind of hardware: its measured throughput (its speedup is that over one baseline throughput: the
    same order). On several kinds: its speedup against the baseline measured on its own kind
    (`tuner.summary.speedup_of`, the figure `status` shows), since throughputs from different machines do
    not compare; None for a trial whose kind has no baseline measurement, or that recorded no hardware:
    its speedup is against another machine's baseline, so it cannot be compared and is not ranked."""
    from tuner.summary import kind_baselines, speedup_of, trial_kind

    kinds = kind_baselines(study)
    if len(kinds) < 2:
        return throughput
    measured = study.user_attrs.get("baselines_by_kind") or {}

    def own_kind_speedup(t: FrozenTrial) -> float | None:
        kind = trial_kind(study, t)
        return speedup_of(study, t, measured) if kind is not None and kinds.get(kind) is not None else None

    return own_kind_speedup


def pareto_set(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible trials no other feasible trial beats on both speed (`speed_of`) and kNN, fastest first."""
    return non_dominated(feasible_trials(study), speed_of(study))


def non_dominated(trials: list[FrozenTrial], speed: Callable[[FrozenTrial], float | None] = throughput) -> list[FrozenTrial]:
    """The trials no other one beats on both speed (default: throughput) and kNN, fastest first; trials
    whose speed is None are not compared."""
    points = {t.number: [s, t.values[1]] for t in trials if (s := speed(t)) is not None}
    ranked = [t for t in trials if t.number in points]
    front = [t for t in ranked
             if not any(points[o.number][0] >= points[t.number][0] and points[o.number][1] >= points[t.number][1]
                        and points[o.number] != points[t.number] for o in ranked)]
    return sorted(front, key=lambda t: -points[t.number][0])


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The fastest feasible trial (the user's question: fastest without losing kNN); on several kinds of
    hardware, the one with the highest speedup against its own kind's baseline (`speed_of`)."""
    speed = speed_of(study)
    trials = [(s, t) for t in feasible_trials(study) if (s := speed(t)) is not None]
    return max(trials, key=lambda st: st[0])[1] if trials else None


def knee(study: optuna.Study) -> FrozenTrial | None:
    """The Pareto trial nearest the ideal corner once both objectives (speed as `speed_of`, kNN) are scaled
    to [0, 1]."""
    front = pareto_set(study)
    if not front:
        return None
    speed = speed_of(study)
    points = {t.number: (speed(t), t.values[1]) for t in front}
    lo = [min(p[i] for p in points.values()) for i in (0, 1)]
    span = [max(p[i] for p in points.values()) - lo[i] or 1.0 for i in (0, 1)]
    return min(front, key=lambda t: math.hypot(*(1.0 - (points[t.number][i] - lo[i]) / span[i] for i in (0, 1))))


def pick(study: optuna.Study, policy: str = "fastest") -> FrozenTrial:
    """`fastest`, `knee` or `trial:N`; a one-line `ConfigError` when nothing fits."""
    if policy.startswith("trial:"):
        try:
            number = int(policy.split(":", 1)[1])
            if number < 0:
                raise IndexError(number)  # not Python's count from the end
            t = study.get_trials(deepcopy=False)[number]
        except (ValueError, IndexError):
            raise ConfigError(f"--pick {policy}: no such trial in study {study.study_name!r}") from None
        if t.state != TrialState.COMPLETE or t.user_attrs.get("fail_reason"):
            raise ConfigError(f"--pick {policy}: trial {number} is {t.state.name}"
                              f"{' (' + t.user_attrs['fail_reason'] + ')' if t.user_attrs.get('fail_reason') else ''}, not a measured trial")
        return t
    chosen = {"fastest": best_feasible, "knee": knee}.get(policy)
    if chosen is None:
        raise ConfigError(f"--pick {policy!r}: allowed: fastest, knee, trial:N")
    t = chosen(study)
    if t is None:
        raise ConfigError(f"study {study.study_name!r} has no feasible complete trial yet")
    return t


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's trial 0 baseline (the base seed), if it completed."""
    number = study.user_attrs.get("baseline_trial")
    return study.get_trials(deepcopy=False)[number] if number is not None else None
