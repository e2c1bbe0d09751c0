"""Which trials count: feasibility, the Pareto set, and the pick policies (fastest, knee, trial:N)."""

from __future__ import annotations

import math

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


def pareto_set(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible trials no other feasible trial beats on both throughput and kNN, fastest first."""
    return non_dominated(feasible_trials(study))


def non_dominated(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other one beats on both throughput and kNN, fastest first."""
    front = [t for t in trials
             if not any(o.values[0] >= t.values[0] and o.values[1] >= t.values[1] and o.values != t.values for o in trials)]
    return sorted(front, key=lambda t: -t.values[0])


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The fastest feasible trial (the user's question: fastest without losing kNN)."""
    trials = feasible_trials(study)
    return max(trials, key=lambda t: t.values[0]) if trials else None


def knee(study: optuna.Study) -> FrozenTrial | None:
    """The Pareto trial nearest the ideal corner once both objectives are scaled to [0, 1]."""
    front = pareto_set(study)
    if not front:
        return None
    lo = [min(t.values[i] for t in front) for i in (0, 1)]
    span = [max(t.values[i] for t in front) - lo[i] or 1.0 for i in (0, 1)]
    return min(front, key=lambda t: math.hypot(*(1.0 - (t.values[i] - lo[i]) / span[i] for i in (0, 1))))


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
