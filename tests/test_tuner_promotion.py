"""Promotion rungs: the baseline's seeds and the Pareto candidates continue from their checkpoints to
longer budgets; each rung is judged against the baseline at that rung, stored, and prunes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from trainer.config import TrainConfig
from tuner.space import SearchSpace


def _space(tmp_path, tiny_space, **trial):
    path = tiny_space(tmp_path, "rungs", constraints={"knn_noise_seeds": 2, "knn_tolerance_points": 1.0},
                      trial={"rungs": [12, 16], **trial})
    return SearchSpace.load(path)


def _baseline_seeds(s, config: TrainConfig, knns: tuple[float, float], throughputs: tuple[float, float],
                    initial: float) -> tuple[int, int]:
    """The baseline trial and its noise seed, stored with the kNN each had before training."""
    started = {"knn_top1_initial": initial}
    base = s.add("baseline", config.to_dict(), throughput=throughputs[0], knn=knns[0], attrs=started)
    noise = s.add("baseline_noise", config.with_overrides({"system.seed": 1}).to_dict(), throughput=throughputs[1],
                  knn=knns[1], attrs=started)
    return base, noise


def _stand_in_checkpoints(study_name: str, numbers) -> None:
    """What promotion looks for in each trial's folder (the continuation itself is the test's stand-in)."""
    from tuner.promotion import trial_dir

    for number in numbers:
        trial_dir(study_name, number).mkdir(parents=True)
        (trial_dir(study_name, number) / "checkpoint.pt").write_bytes(b"stand-in")


def test_rungs_are_stored_judged_against_the_baseline_at_the_same_rung_and_halved(tmp_path, tiny_space, stored_study,
                                                                                  monkeypatch):
    from tuner.promotion import promote, rung_records
    from tuner.select import best_feasible
    from tuner.study import counted_trials
    from tuner.verdicts import verdict

    monkeypatch.chdir(tmp_path)
    space = _space(tmp_path, tiny_space)
    config = space.base_config()
    s = stored_study("rungs", knn_tolerance=1.0)
    base, noise = _baseline_seeds(s, config, knns=(20.5, 20.4), throughputs=(10.0, 10.2), initial=20.0)
    fast = s.add("search", config.with_overrides({"crops.local_crops": 0}).to_dict(), throughput=30.0, knn=20.0)
    middle = s.add("search", config.with_overrides({"model.head.out_dim": 32}).to_dict(), throughput=20.0, knn=20.2)
    slow = s.add("search", config.with_overrides({"model.head.out_dim": 48}).to_dict(), throughput=15.0, knn=20.4)
    study = s.study
    study.set_user_attr("trial_overrides", space.trial.overrides())
    _stand_in_checkpoints("rungs", (base, noise, fast, middle, slow))
    # kNN each trial reaches at each rung (the baseline rises beyond its seeds' spread at both)
    knn_at = {12: {base: 30.0, noise: 31.0, fast: 25.0, middle: 30.2, slow: 30.4},
              16: {base: 35.0, noise: 36.0, middle: 33.0}}
    calls = []

    def continue_run(cfg: TrainConfig, folder: Path) -> dict:
        steps = cfg.budget.stop_at_step
        calls.append((int(folder.name), steps))
        return {"status": "ok", "knn_top1": knn_at[steps][int(folder.name)], "student_knn_top1": 1.0, "train_s": 1.0}

    lines: list[str] = []
    promote(study, space, lines.append, continue_run=continue_run)
    records = rung_records(study)
    state = {parent: [(t.user_attrs["rung"], t.state) for t in rs] for parent, rs in records.items()}
    assert state[fast] == [(0, TrialState.PRUNED)]  # 25.0 against the baseline's 30.5, tolerance 1.0
    assert state[middle] == [(0, TrialState.COMPLETE), (1, TrialState.PRUNED)]  # the fastest survivor of two goes on
    assert state[slow] == [(0, TrialState.COMPLETE)]  # halved out after rung 1
    assert state[base] == state[noise] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    pruned = records[middle][1].user_attrs
    assert pruned["pruned_phase"] == "rung" and pruned["pruned_rung"] == 1 and pruned["rung_steps"] == 16
    assert pruned["baseline_knn_at_rung"] == pytest.approx(35.5) and pruned["knn_delta_points"] == pytest.approx(-2.5)
    assert records[slow][0].values == [15.0, 30.4] and records[slow][0].intermediate_values == {12: 30.4}
    # the rung records are not trials of the search's budget, and trials pruned at a rung are not feasible
    assert len(counted_trials(study)) == 5
    assert best_feasible(study).number == slow
    assert "kNN within tolerance at 12 steps" in verdict(study, study.trials[slow]).text
    assert "kNN LOST at 16 steps" in verdict(study, study.trials[middle]).text
    assert any(line.startswith("rung 2 (16 steps): baseline kNN 35.5") for line in lines)
    from tuner.summary import format_status, summarize

    status = format_status(summarize(study))
    assert f"rung 1 (12 steps): baseline kNN 30.5, tolerance 1.0; within: #{middle}, #{slow}; PRUNED: #{fast}" in status
    assert f"rung 2 (16 steps): baseline kNN 35.5, tolerance 1.0; within: none; PRUNED: #{middle}" in status
    assert f"rung 2 of #{middle}" in status
    # run again: every rung is stored already, nothing is measured twice
    before = len(calls)
    promote(study, space, lambda _: None, continue_run=continue_run)
    assert len(calls) == before == 8 and len(study.trials) == 5 + 8  # rung 1: all five; rung 2: two seeds and one


@pytest.mark.parametrize("control_knn, has_power", [(22.0, True), (29.9, False)])
def test_a_positive_control_decides_each_rungs_power(tmp_path, tiny_space, stored_study, monkeypatch, control_knn,
                                                     has_power):
    """The baseline does not move at the rung (as a warm start's student kNN did not); the control (the baseline
    with a harmful change) runs its rung before any candidate, and its loss beyond the tolerance is what makes
    the rung's verdicts measured."""
    from tuner.promotion import promote, rung_records
    from tuner.summary import format_status, summarize
    from tuner.verdicts import verdict

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "control", constraints={"knn_noise_seeds": 2, "knn_tolerance_points": 1.0,
                                                        "knn_control": {"optim.lr": 0.01}},
                      trial={"rungs": [12]})
    space = SearchSpace.load(path)
    config = space.base_config()
    s = stored_study("control", knn_tolerance=1.0)
    base, noise = _baseline_seeds(s, config, knns=(30.0, 30.2), throughputs=(10.0, 10.0), initial=30.0)
    control = s.add("control", config.with_overrides({"optim.lr": 0.01}).to_dict(), throughput=10.0, knn=29.0,
                    attrs={"knn_top1_initial": 30.0})
    fast = s.add("search", config.with_overrides({"crops.local_crops": 0}).to_dict(), throughput=30.0, knn=30.0)
    study = s.study
    study.set_user_attr("trial_overrides", space.trial.overrides())
    _stand_in_checkpoints("control", (base, noise, control, fast))
    knn_at = {base: 30.1, noise: 29.9, control: control_knn, fast: 29.6}  # the baseline: 30.0 at the rung, unmoved
    order = []

    def continue_run(cfg: TrainConfig, folder: Path) -> dict:
        order.append(int(folder.name))
        if int(folder.name) == control:
            assert cfg.optim.lr == 0.01  # the control continues with its harmful change
        return {"status": "ok", "knn_top1": knn_at[int(folder.name)], "student_knn_top1": 1.0, "train_s": 1.0}

    lines: list[str] = []
    promote(study, space, lines.append, continue_run=continue_run)
    assert order == [base, noise, control, fast]  # the control before any candidate
    records = rung_records(study)
    mark = records[control][0]
    assert mark.state == TrialState.COMPLETE and mark.user_attrs["control"] is True
    assert mark.user_attrs["knn_delta_points"] == pytest.approx(control_knn - 30.0)
    assert mark.user_attrs["calibrated"] is has_power
    judged = records[fast][0]
    assert judged.state == TrialState.COMPLETE and judged.user_attrs["calibrated"] is has_power
    rung_line = next(line for line in lines if line.startswith("rung 1 (12 steps)"))
    status = format_status(summarize(study))
    text = verdict(study, study.trials[fast]).text
    if has_power:
        assert "a control that harms learning (optim.lr=0.01) lost 8.0 points of kNN at 12 steps" in rung_line
        assert f"within: #{fast}; PRUNED: none (the control lost 8.0 points: the kNN check has power here)" in status
        assert "kNN within tolerance at 12 steps" in text
    else:
        assert "unmeasured at 12 steps: a control that harms learning (optim.lr=0.01) moved kNN only -0.1" in rung_line
        assert "(the control lost 0.1 points: quality unmeasured at this rung)" in status
        assert "unmeasured at 12 steps" in text
    assert f"#{control}" not in status.split("within:")[1].split("(")[0]  # the control is never a candidate


def test_rungs_in_a_space_must_rise_above_the_trial_budget(tmp_path, tiny_space):
    from trainer.config import ConfigError

    for rungs in ([8], [12, 10]):
        path = tiny_space(tmp_path, "bad", trial={"steps": 8, "rungs": rungs})
        with pytest.raises(ConfigError, match=r"bad.yaml: trial: rungs \[[0-9, ]+\]: each rung must be above steps \(8\)"):
            SearchSpace.load(path)


def test_a_study_with_rungs_continues_its_candidates_from_their_checkpoints(ray_session, tiny_space, tmp_path,
                                                                             monkeypatch):
    """Real trials, real continuation: trials stop at trial.steps on schedules that span the last rung;
    after the search, the baseline seeds and the candidates resume from their own checkpoints."""
    import json

    from tuner import run
    from tuner.promotion import rung_records, trial_dir

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "promoted", params={"crops.local_crops": {"choices": [0]}},
                      constraints={"knn_noise_seeds": 2, "knn_tolerance_points": 100.0}, budget={"n_trials": 3},
                      trial={"rungs": [12]})
    lines: list[str] = []
    run(path, progress=lines.append, confirm_rounds=0)
    study = optuna.load_study(study_name="promoted", storage=f"sqlite:///{tmp_path}/studies/promoted.db")
    records = rung_records(study)
    assert sorted(records) == [0, 1, 2]  # both baseline seeds and the one search trial
    for parent, (record,) in records.items():
        assert record.state == TrialState.COMPLETE and record.user_attrs["rung_steps"] == 12
        folder = trial_dir("promoted", parent)
        checkpoint = torch.load(folder / "checkpoint.pt", weights_only=False)
        assert checkpoint["step"] == 12 and checkpoint["config"]["budget"]["steps"] == 12
        steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()
                 if json.loads(line).get("loss") is not None]
        assert steps == sorted(set(steps)) and steps[-1] == 12  # one run continued: no step logged twice
        assert record.user_attrs["knn_top1"] == pytest.approx(json.loads((folder / "summary.json").read_text())["knn_top1"])
    first = study.trials[2]
    assert first.user_attrs["steps"] == 8  # the trial itself stopped at trial.steps
    assert any(line.startswith("rung 1 (12 steps): baseline kNN") for line in lines)
