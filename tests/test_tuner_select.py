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


def test_a_compiled_winner_states_its_compile_time_and_break_even_everywhere(stored_study):
    from trainer.config import TrainConfig
    from tuner.export import export_header
    from tuner.summary import format_status, summarize
    from tuner.verdicts import compile_break_even

    s = stored_study("compiled")
    base = TrainConfig().with_overrides({"optim.batch_size": 64})
    s.add("baseline", base.to_dict(), throughput=100.0, knn=20.0)
    s.add("search", base.with_overrides({"system.compile": "default"}).to_dict(), throughput=200.0, knn=20.0,
          attrs={"compile_s": 64.0, "images_per_step": 64})
    study = optuna.load_study(study_name="compiled", storage=s.url)
    # eager 0.64 s/step against compiled 0.32 s/step: 64 s of compiling is won back after 200 steps
    found = compile_break_even(study, study.trials[1])
    assert found["break_even_steps"] == pytest.approx(200.0) and found["against"] == "the baseline"
    assert "torch.compile took 64 s; ahead of the baseline after about 200 steps" in format_status(summarize(study))
    assert "\ntorch.compile took 64 s; ahead of the baseline after about 200 steps (compile time" in export_header(study, study.trials[1], "fastest")
    # with explain's measurement of the compile step, the reference is the same path without compile
    study.set_user_attr("explain", {"winner_trial": 1, "steps": [
        {"knob": "system.compile", "throughput_img_s": 200.0, "step_speedup": 1.6}]})
    found = compile_break_even(study, study.trials[1])
    assert found["against"].startswith("the same configuration without compile")
    assert found["break_even_steps"] == pytest.approx(64.0 / (64 / 125.0 - 64 / 200.0))
    assert compile_break_even(study, study.trials[0]) is None


def test_status_warns_when_trials_ran_on_a_kind_of_hardware_with_no_baseline_of_its_own(stored_study):
    from trainer.config import TrainConfig
    from tuner.summary import format_status, summarize

    s = stored_study("mixed")
    s.add("baseline", TrainConfig().to_dict(), throughput=100.0, knn=20.0)
    s.add("search", TrainConfig().with_overrides({"crops.local_crops": 0}).to_dict(), throughput=300.0, knn=20.0,
          attrs={"hardware": {**s.HARDWARE, "device": "NVIDIA A100", "cpu_model": "Other CPU"}})
    status = format_status(summarize(optuna.load_study(study_name="mixed", storage=s.url)))
    assert ("warning: no baseline measured on NVIDIA A100, Other CPU (trials 1): their speedups are against the "
            "baseline trial on cpu, Test CPU, which mixes the knob with the machine") in status
