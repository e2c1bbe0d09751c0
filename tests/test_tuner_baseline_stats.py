"""The study's baseline numbers and its quality warning, from baseline trials written into a real study."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from tuner.searcher import update_baseline_stats

SPACE = SimpleNamespace(constraints=SimpleNamespace(knn_tolerance_points=1.0, knn_metric="knn_top1"))


def _study(knns, initial):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for i, (role, knn) in enumerate(zip(["baseline", "baseline_noise", "baseline_noise"], knns)):
        trial = study.ask()
        trial.set_user_attr("role", role)
        trial.set_user_attr("knn_top1_initial", initial + i)  # only the base seed's initial value counts
        study.tell(trial, [40.0 - i, knn], state=TrialState.COMPLETE)
    update_baseline_stats(study, SPACE)
    return study.user_attrs


def test_noise_tolerance_and_mean_come_from_all_seeds():
    attrs = _study([10.0, 13.9], initial=9.0)
    assert attrs["baseline_knn_top1"] == pytest.approx(11.95)
    assert attrs["knn_noise_points"] == pytest.approx(3.9)
    assert attrs["knn_tolerance_effective"] == pytest.approx(3.9)
    assert attrs["baseline_throughput_img_s"] == 40.0 and attrs["quality_warning"] is None


def test_the_warning_says_which_kNN_it_compares_when_there_are_seeds():
    attrs = _study([10.0, 13.9], initial=13.9)
    assert attrs["quality_warning"].startswith("the baseline's kNN (best of its 2 seeds: 13.9) did not rise "
                                               "above its initial value (13.9)")
    single = _study([12.0], initial=12.5)
    assert single["quality_warning"].startswith("the baseline's kNN (12.0) did not rise above its initial value (12.5)")
    assert single["knn_noise_points"] is None and single["knn_tolerance_effective"] == 1.0


def test_trial_time_limits_scale_with_the_baselines_trial_time():
    from tuner.searcher import trial_timeout_s

    study = optuna.create_study(directions=["maximize", "maximize"])
    trial = study.ask()
    trial.set_user_attr("role", "baseline")
    trial.set_user_attr("time_s", 50.0)
    study.tell(trial, [10.0, 20.0])
    space = SimpleNamespace(constraints=SPACE.constraints, trial=SimpleNamespace(timeout_s=60.0, timeout_factor=3.0))
    fresh = optuna.create_study(directions=["maximize", "maximize"])
    assert trial_timeout_s(fresh, space) == 60.0  # no baseline yet: the space's own limit
    update_baseline_stats(study, space)
    assert study.user_attrs["baseline_time_s"] == 50.0
    assert trial_timeout_s(study, space) == 150.0  # 3 x 50 s on this (slow) machine
    study.set_user_attr("baseline_time_s", 10.0)
    assert trial_timeout_s(study, space) == 60.0  # never below timeout_s
    space.trial.timeout_factor = None
    study.set_user_attr("baseline_time_s", 50.0)
    assert trial_timeout_s(study, space) == 60.0
