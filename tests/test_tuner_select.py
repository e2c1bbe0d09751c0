"""Feasibility, Pareto set and the export pick policies on a hand-made study."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from trainer.config import ConfigError
from tuner.select import best_feasible, knee, pareto_set, pick


def _study():
    study = optuna.create_study(directions=["maximize", "maximize"])
    rows = [  # (throughput, knn, feasible, state)
        (10.0, 60.0, True, TrialState.COMPLETE),   # 0 baseline-like, dominated by 4
        (30.0, 59.5, True, TrialState.COMPLETE),   # 1 fast, near baseline kNN
        (50.0, 40.0, False, TrialState.COMPLETE),  # 2 fastest but infeasible
        (20.0, 58.0, True, TrialState.COMPLETE),   # 3 dominated by 1
        (25.0, 61.0, True, TrialState.COMPLETE),   # 4 on the front
        (None, None, True, TrialState.PRUNED),     # 5
    ]
    for i, (tp, knn, ok, state) in enumerate(rows):
        t = create_trial(state=state, values=[tp, knn] if tp is not None else None,
                         params={"x": i}, distributions={"x": CategoricalDistribution(list(range(6)))},
                         system_attrs={"constraints:knn_points": -1.0 if ok else 5.0})
        study.add_trial(t)
    return study


def test_pareto_set_holds_only_feasible_non_dominated_trials_fastest_first():
    assert [t.number for t in pareto_set(_study())] == [1, 4]


def test_fastest_pick_ignores_infeasible_trials_and_knee_balances_both():
    study = _study()
    assert best_feasible(study).number == 1
    assert pick(study, "fastest").number == 1
    assert knee(study).number in (1, 4)
    assert pick(study, "trial:3").number == 3


def test_bad_picks_are_one_line_errors():
    study = _study()
    with pytest.raises(ConfigError, match="trial 5 is PRUNED"):
        pick(study, "trial:5")
    with pytest.raises(ConfigError, match="allowed: fastest, knee, trial:N"):
        pick(study, "slowest")


def test_the_baselines_noise_replicate_is_never_the_winner():
    study = optuna.create_study(directions=["maximize", "maximize"])
    for role, tp in (("baseline", 30.0), ("baseline_noise", 36.0), ("search", 33.0)):
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[tp, 50.0], user_attrs={"role": role},
                                     system_attrs={"constraints:knn_points": -1.0}))
    assert best_feasible(study).number == 2  # the replicate measured faster only by the machine's noise
    assert [t.number for t in pareto_set(study)] == [2]  # 2 dominates the baseline; the replicate is not a candidate


def test_negative_trial_numbers_are_refused_not_counted_from_the_end():
    with pytest.raises(ConfigError, match="--pick trial:-1: no such trial"):
        pick(_study(), "trial:-1")
