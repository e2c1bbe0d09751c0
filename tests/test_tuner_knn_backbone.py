"""`constraints.knn_backbone`: the study's kNN objective, constraint and quality pruner read the named
backbone's kNN (teacher: DINO's evaluation; student: the one that moves in a short trial), and both
backbones' numbers are stored on every trial. Driven without Ray: the searcher's own Ray Tune hooks."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tuner.pruning import PruningBridge
from tuner.searcher import StudySearcher, update_baseline_stats
from tuner.space import PrunerPerPhase, SearchSpace
from tuner.study import open_study
from tuner.trial import _PhaseReporter


def _done(throughput, teacher, student, teacher_initial=12.0, student_initial=12.0):
    """A finished trial's last result, as `run_trial` reports it (Ray flattens nested dicts with '/')."""
    return {"phase": "done", "throughput_img_s": throughput, "knn_top1": teacher, "student_knn_top1": student,
            "knn_top1_initial": teacher_initial, "student_knn_top1_initial": student_initial, "peak_memory_mb": 100.0,
            "evals/4": teacher - 1, "evals/8": teacher, "student_evals/4": student - 1, "student_evals/8": student}


def _run_study(tmp_path, tiny_space, backbone):
    space = SearchSpace.load(tiny_space(tmp_path, f"kb_{backbone}", constraints={"knn_backbone": backbone, "knn_noise_seeds": 2},
                                        budget={"n_trials": 3}))
    study = open_study(space, f"sqlite:///{tmp_path}/kb_{backbone}.db")
    searcher = StudySearcher(study, space, PruningBridge(space.pruner, space.constraints.knn_metric), 3, 1)
    # baseline (seed 0) and its noise seed: teacher 30/31, student 20/24; then one search trial
    for trial_id, teacher, student in (("b0", 30.0, 20.0), ("b1", 31.0, 24.0), ("s", 40.0, 5.0)):
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_result(trial_id, {"phase": "quality", "step": 4, "knn_top1": teacher - 1,
                                            "student_knn_top1": student - 1})
        searcher.on_trial_complete(trial_id, _done(50.0, teacher, student))
    return optuna.load_study(study_name=space.name, storage=f"sqlite:///{tmp_path}/kb_{backbone}.db")


def test_student_backbone_is_the_objective_constraint_and_baseline_and_both_are_stored(tmp_path, tiny_space):
    study = _run_study(tmp_path, tiny_space, "student")
    base, noise, search = study.trials
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.values[1] for t in study.trials] == [20.0, 24.0, 5.0]
    assert study.metric_names == ["throughput_img_s", "student_knn_top1"] and study.user_attrs["knn_backbone"] == "student"
    assert search.user_attrs["knn_top1"] == 40.0 and search.user_attrs["student_knn_top1"] == 5.0
    assert search.user_attrs["knn_backbone"] == "student"
    assert search.intermediate_values == {4: 4.0, 8: 5.0}  # the student's kNN per evaluation
    attrs = study.user_attrs
    assert attrs["baseline_knn_top1"] == pytest.approx(22.0) and attrs["knn_noise_points"] == pytest.approx(4.0)
    # student 5 against baseline 22 - tolerance 4: infeasible, although its teacher kNN (40) beats the baseline's
    assert search.constraints["knn_points"] == pytest.approx(22.0 - 4.0 - 5.0) and search.user_attrs["knn_delta_points"] == -17.0


def test_teacher_backbone_stays_the_default_objective(tmp_path, tiny_space):
    study = _run_study(tmp_path, tiny_space, "teacher")
    assert [t.values[1] for t in study.trials] == [30.0, 31.0, 40.0]
    assert study.metric_names == ["throughput_img_s", "knn_top1"]
    assert study.trials[2].intermediate_values == {4: 39.0, 8: 40.0}
    assert study.trials[2].constraints["knn_points"] < 0 and study.trials[2].user_attrs["student_knn_top1"] == 5.0


def test_a_study_refuses_a_space_whose_knn_backbone_changed(tmp_path, tiny_space):
    from trainer.config import ConfigError

    path = tiny_space(tmp_path, "kb", constraints={"knn_backbone": "teacher"})
    open_study(SearchSpace.load(path), f"sqlite:///{tmp_path}/kb.db")
    changed = tiny_space(tmp_path, "kb", constraints={"knn_backbone": "student"})
    with pytest.raises(ConfigError, match=r"knn_backbone.*changed since study 'kb'"):
        open_study(SearchSpace.load(changed), f"sqlite:///{tmp_path}/kb.db")


def test_baseline_warning_compares_the_students_kNN_with_the_students_initial_value():
    space = SearchSpace.from_dict({"name": "w", "params": {"crops.local_crops": {"choices": [0, 2]}},
                                   "constraints": {"knn_backbone": "student", "knn_noise_seeds": 1}})
    study = optuna.create_study(directions=["maximize", "maximize"])
    trial = study.ask()
    trial.set_user_attr("role", "baseline")
    trial.set_user_attr("knn_top1_initial", 10.0)  # the teacher's: below, so it would say nothing
    trial.set_user_attr("student_knn_top1_initial", 30.0)
    study.tell(trial, [40.0, 25.0])
    update_baseline_stats(study, space)
    assert study.user_attrs["quality_warning"].startswith(
        "the baseline's student kNN (25.0) did not rise above its initial value (30.0)")


def test_quality_pruner_judges_the_configured_backbone():
    spec = PrunerPerPhase(speed="none", quality={"name": "ThresholdPruner", "args": {"lower": 50.0}})
    result = {"phase": "quality", "step": 4, "knn_top1": 90.0, "student_knn_top1": 10.0}
    assert PruningBridge(spec).observe("t", result) is None
    decision = PruningBridge(spec, knn_metric="student_knn_top1").observe("t", result)
    assert decision is not None and decision.value == 10.0 and "student_knn_top1=10" in decision.reason


def test_trial_reporter_sends_both_backbones_kNN_in_the_quality_phase():
    sent = []
    reporter = _PhaseReporter(sent.append, timeout_s=60)
    reporter("build", {"total_steps": 8})
    reporter("eval", {"step": 0, "knn_top1": 12.0, "student_knn_top1": 12.0})
    reporter("eval", {"step": 2, "knn_top1": 13.0, "student_knn_top1": 9.0})  # held until the speed phase ends
    reporter("speed", {"throughput_img_s": 50.0, "throughput_spread": 0.1, "peak_memory_mb": 1.0})
    assert sent[1] == {"phase": "quality", "step": 2, "knn_top1": 13.0, "student_knn_top1": 9.0}
