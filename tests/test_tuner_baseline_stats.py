"""The study's baseline numbers and its quality warning, from baseline trials written into a real study."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from tuner.searcher import update_baseline_stats

SPACE = SimpleNamespace(constraints=SimpleNamespace(knn_tolerance_points=1.0, knn_metric="knn_top1", knn_control=None),
                        trial=SimpleNamespace(steps=60, timeout_s=600.0, timeout_factor=None))


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
    assert attrs["baseline_throughput_img_s"] == 40.0
    # it rose (1.0 and 3.9 points) but not beyond the seeds' spread: the warning says the check has no power
    assert attrs["quality_warning"].startswith("method changes are unmeasured at this budget: the baseline's kNN moved +2.5")


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
    space = SimpleNamespace(constraints=SPACE.constraints, trial=SimpleNamespace(steps=8, timeout_s=60.0, timeout_factor=3.0))
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


def _seeds(initials, finals, steps=100):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for i, (before, after) in enumerate(zip(initials, finals)):
        trial = study.ask()
        trial.set_user_attr("role", "baseline" if i == 0 else "baseline_noise")
        trial.set_user_attr("knn_top1_initial", before)
        study.tell(trial, [40.0, after])
    space = SimpleNamespace(constraints=SPACE.constraints, trial=SimpleNamespace(steps=steps, timeout_s=60, timeout_factor=None))
    update_baseline_stats(study, space)
    return study.user_attrs


def test_the_knn_check_is_calibrated_only_when_every_seed_moves_beyond_the_seeds_spread():
    attrs = _seeds([20.0, 20.5], [30.0, 31.0])
    power = attrs["knn_power"]
    assert power["calibrated"] and power["moved_points"] == pytest.approx(10.25) and power["noise_points"] == 1.0
    assert attrs["quality_warning"] is None
    weak = _seeds([20.0, 20.0], [21.0, 23.0])  # rose 2 points on average, but the seeds are 2 apart
    assert not weak["knn_power"]["calibrated"]
    assert weak["knn_power"]["needed_steps"] == 101  # 100 steps x noise 2.0 / rise 2.0, rounded up
    assert weak["quality_warning"].startswith("method changes are unmeasured at this budget: the baseline's kNN "
                                              "moved +2.0 points in 100 steps, not beyond the spread of its 2 seeds (2.0)")
    flat = _seeds([20.0, 20.0], [19.0, 19.5])
    assert flat["knn_power"]["needed_steps"] is None and "did not rise above its initial" in flat["quality_warning"]
    single = _seeds([20.0], [30.0])
    assert not single["knn_power"]["calibrated"] and "one seed" in single["knn_power"]["text"]


def test_method_changes_get_a_knn_verdict_only_from_a_calibrated_study(stored_study):
    from trainer.config import TrainConfig
    from tuner.verdicts import verdict

    s = stored_study("calibrated")
    s.add("baseline", TrainConfig().to_dict(), throughput=10.0, knn=30.0)
    fewer = TrainConfig().with_overrides({"crops.local_crops": 0}).to_dict()
    t = s.add("search", fewer, throughput=30.0, knn=29.5)
    lost = s.add("search", TrainConfig().with_overrides({"model.head.out_dim": 1024}).to_dict(), throughput=25.0, knn=20.0)
    study = optuna.load_study(study_name="calibrated", storage=s.url)
    assert verdict(study, study.trials[t]).text == "quality: unmeasured at this budget (method changes: crops.local_crops)"
    study.set_user_attr("knn_power", {"calibrated": True})
    assert verdict(study, study.trials[t]).text == (
        "quality: kNN within tolerance for method changes (crops.local_crops: -0.5 points, tolerance 1.0)")
    assert verdict(study, study.trials[lost]).text == (
        "quality: kNN LOST by method changes (model.head.out_dim: -10.0 points, beyond the tolerance 1.0)")


def _with_control(base_knns, control_knn, initial=40.0):
    """Baseline seeds whose kNN does not rise at all (as a warm start's student did), and a control."""
    space = SimpleNamespace(constraints=SimpleNamespace(knn_tolerance_points=1.0, knn_metric="knn_top1",
                                                        knn_control={"optim.lr": 0.01}),
                            trial=SimpleNamespace(steps=200, timeout_s=600.0, timeout_factor=None))
    study = optuna.create_study(directions=["maximize", "maximize"])
    roles = ["baseline"] + ["baseline_noise"] * (len(base_knns) - 1) + (["control"] if control_knn is not None else [])
    for role, knn in zip(roles, base_knns + ([control_knn] if control_knn is not None else [])):
        trial = study.ask()
        trial.set_user_attr("role", role)
        trial.set_user_attr("knn_top1_initial", initial)
        study.tell(trial, [40.0, knn], state=TrialState.COMPLETE)
    update_baseline_stats(study, space)
    return study.user_attrs


def test_a_positive_control_that_loses_kNN_calibrates_the_check_though_the_baseline_did_not_move():
    attrs = _with_control([40.1, 40.4, 39.6], control_knn=31.2)  # tolerance: the seeds' spread, 0.8 -> 1.0
    power = attrs["knn_power"]
    assert power["calibrated"] is True and power["control_delta_points"] == pytest.approx(31.2 - 40.0333, abs=1e-3)
    assert power["text"].startswith("a control that harms learning (optim.lr=0.01) lost 8.8 points of kNN at 200 "
                                    "steps, beyond the tolerance (1.0)")
    assert attrs["quality_warning"] is None  # a baseline that did not rise is no warning once the control has power


def test_a_control_within_tolerance_or_not_finished_leaves_method_changes_unmeasured():
    weak = _with_control([40.1, 40.4, 39.1], control_knn=38.8)  # -1.07 points; tolerance: the spread, 1.3
    assert weak["knn_power"]["calibrated"] is False
    assert weak["quality_warning"] == ("method changes are unmeasured at 200 steps: a control that harms learning "
                                       "(optim.lr=0.01) moved kNN only -1.1 points, within the tolerance (1.3)")
    pending = _with_control([40.1, 40.4], control_knn=None)
    assert pending["knn_power"]["calibrated"] is False
    assert pending["quality_warning"] == ("method changes are unmeasured at 200 steps: the control (optim.lr=0.01) "
                                          "has no kNN yet")
