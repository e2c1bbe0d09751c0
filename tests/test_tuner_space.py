"""SearchSpace parsing, one-line errors, conditions, and that malformed or changed spaces leave databases untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import optuna
import pytest

from trainer.config import ConfigError
from tuner.searcher import sample_params, trial_config
from tuner.space import CLASSIC_BASELINE, SearchSpace
from tuner.study import baseline_params, open_study

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["smoke", "speed", "quality", "gpu"])
def test_shipped_spaces_load_and_build_valid_baseline_configs(name):
    space = SearchSpace.load(ROOT / "search_spaces" / f"{name}.yaml")
    assert space.name == name
    config = trial_config(space, baseline_params(space), "baseline", None)
    for path, value in space.baseline.items():
        node = config.to_dict()
        for part in path.split("."):
            node = node[part]
        assert node == value


def test_baseline_defaults_to_the_classic_dino_settings(tmp_path, tiny_space):
    path = tiny_space(tmp_path, "dflt")
    text = path.read_text().replace("baseline:\n  crops.local_crops: 2\n  model.head.out_dim: 64\n", "")
    path.write_text(text)
    space = SearchSpace.load(path)
    assert space.baseline == CLASSIC_BASELINE
    assert space.baseline["crops.local_crops"] == 8 and space.baseline["model.head.out_dim"] == 65536


@pytest.mark.parametrize("sections, expected", [
    ({"bogus": 1}, "unknown field 'bogus'; allowed keys: name, base, baseline, params"),
    ({"params": {"crops.nope": {"choices": [1]}}}, "params.crops.nope: not a TrainConfig field"),
    ({"params": {"crops.local_crops": {"choices": [0, 99]}}}, "params.crops.local_crops: value 99 is not allowed"),
    ({"params": {"eval.knn_k": {"choices": [10, 20]}}}, "params.eval.knn_k: eval.knn_k is not a knob: the evaluation's definition"),
    ({"params": {"system.seed": {"choices": [0, 1]}}}, "params.system.seed: system.seed is not a knob"),
    ({"params": {"crops.local_crops": {"low": 4, "high": 2}}}, "params.crops.local_crops: low (4.0) must be <= high"),
    ({"params": {"crops.local_crops": {"choices": [1], "lo": 2}}}, "unknown field 'params.crops.local_crops.lo'; allowed keys: choices, low"),
    ({"params": {"system.prefetch_factor": {"choices": [2], "when": "system.num_workers >> 0"}}}, "must look like"),
    ({"pruner": {"speed": {"name": "FastPruner"}}}, "pruner.speed.name: unknown pruner 'FastPruner'"),
    ({"pruner": {"quality": {"name": "MedianPruner", "args": {"n_startup": 2}}}}, "MedianPruner arguments"),
    ({"sampler": {"name": "cmaes"}}, "sampler.name: must be 'tpe', 'nsga2', 'random', 'grid', 'gp', 'qmc' or 'bruteforce'"),
    ({"sampler": {"name": "gp", "args": {"n_startup": 2}}}, "sampler.args: GPSampler.__init__() got an unexpected keyword"),
    ({"sampler": {"name": "bruteforce"}, "params": {"optim.lr": {"low": 1e-4, "high": 1e-3}}},
     "params.optim.lr: the bruteforce sampler needs choices or an int range"),
    ({"baseline": {"crops.local_crops": -1}}, "baseline: crops.local_crops"),
    ({"trial": {"steps": 2}}, "must be <= steps"),
    ({"name": "bad name"}, "name: String should match pattern"),
    ({"constraints": {"knn_control": {"optim.lrr": 0.01}}}, "constraints.knn_control.optim.lrr: not a TrainConfig field"),
    ({"constraints": {"knn_control": {"optim.lr": -1}}}, "constraints.knn_control"),
    ({"constraints": {"knn_control": {}}}, "constraints.knn_control: empty"),
])
def test_malformed_space_is_one_line_naming_file_and_field(tmp_path, tiny_space, sections, expected):
    path = tiny_space(tmp_path, "bad", **sections)
    with pytest.raises(ConfigError) as info:
        SearchSpace.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert expected in message, message


def test_cli_rejects_malformed_space_with_exit_2_and_leaves_database_untouched(tmp_path, tiny_space, capsys, monkeypatch):
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    good = SearchSpace.load(tiny_space(tmp_path, "kept"))
    open_study(good, url)
    before = hashlib.sha256((tmp_path / "kept.db").read_bytes()).hexdigest()
    bad = tiny_space(tmp_path, "kept", params={"crops.local_crops": {"choices": [0, 99]}})
    assert main(["run", str(bad), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "params.crops.local_crops" in err
    assert hashlib.sha256((tmp_path / "kept.db").read_bytes()).hexdigest() == before


def test_changed_choices_get_a_clear_message_not_optunas_dynamic_value_space_error(tmp_path, tiny_space, capsys):
    from tuner.cli import main

    url = f"sqlite:///{tmp_path / 'edit.db'}"
    open_study(SearchSpace.load(tiny_space(tmp_path, "edit")), url)
    before = hashlib.sha256((tmp_path / "edit.db").read_bytes()).hexdigest()
    edited = tiny_space(tmp_path, "edit", params={"crops.local_crops": {"choices": [0, 2, 4]}})
    assert main(["run", str(edited), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "params.crops.local_crops.choices ([0, 2] -> [0, 2, 4]): changed since study 'edit'" in err and "new name" in err and "\n" not in err
    assert hashlib.sha256((tmp_path / "edit.db").read_bytes()).hexdigest() == before


def test_new_study_enqueues_baseline_first_at_each_noise_seed(tmp_path, tiny_space):
    space = SearchSpace.load(tiny_space(tmp_path, "q", constraints={"knn_noise_seeds": 3}))
    study = open_study(space, f"sqlite:///{tmp_path / 'q.db'}")
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["role"] for t in waiting] == ["baseline", "baseline_noise", "baseline_noise"]
    assert [t.user_attrs["seed"] for t in waiting] == [0, 1, 2]
    assert [t.number for t in waiting] == [0, 1, 2]
    assert study.user_attrs["space_fingerprint"] == space.fingerprint()
    assert {"device", "cpu_model", "cpu_cores", "torch", "cuda"} <= set(study.user_attrs["hardware"])


def test_a_positive_control_is_enqueued_after_the_seeds_with_the_baselines_knobs_and_its_change(tmp_path, tiny_space):
    from tuner.searcher import trial_config

    space = SearchSpace.load(tiny_space(tmp_path, "c", constraints={"knn_noise_seeds": 2,
                                                                    "knn_control": {"optim.lr": 0.01}}))
    study = open_study(space, f"sqlite:///{tmp_path / 'c.db'}")
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.user_attrs["role"], t.user_attrs["seed"]) for t in waiting] == [
        ("baseline", 0), ("baseline_noise", 1), ("control", 0)]
    assert waiting[2].system_attrs["fixed_params"] == waiting[0].system_attrs["fixed_params"] == {"crops.local_crops": 2}
    control, baseline = trial_config(space, {}, "control", 0), trial_config(space, {}, "baseline", 0)
    assert control.optim.lr == 0.01 and baseline.optim.lr != 0.01
    assert control.to_dict() == baseline.with_overrides({"optim.lr": 0.01}).to_dict()


def test_conditional_knob_is_sampled_only_when_its_condition_holds(tmp_path, tiny_space):
    space = SearchSpace.load(tiny_space(tmp_path, "cond", sampler={"name": "random", "seed": 1}, params={
        "system.num_workers": {"choices": [0, 1]},
        "system.prefetch_factor": {"choices": [2, 4], "when": "system.num_workers > 0"},
        "optim.lr": {"low": 1e-4, "high": 1e-3, "log": True},
    }))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=space.build_sampler())
    seen = set()
    for _ in range(12):
        params = sample_params(study.ask(), space, "search")
        assert ("system.prefetch_factor" in params) == (params["system.num_workers"] > 0)
        assert 1e-4 <= params["optim.lr"] <= 1e-3
        trial_config(space, params, "search", None)  # every sampled combination is a valid TrainConfig
        seen.add(params["system.num_workers"])
    assert seen == {0, 1}


def test_space_naming_a_sampler_builds_it_with_its_args(tmp_path, tiny_space):
    space = SearchSpace.load(tiny_space(tmp_path, "gp", sampler={"name": "gp", "seed": 3, "args": {"n_startup_trials": 2}}))
    sampler = space.build_sampler().inner  # the default objective (throughput) wraps it
    assert type(sampler) is optuna.samplers.GPSampler and sampler._n_startup_trials == 2
    tpe = SearchSpace.load(tiny_space(tmp_path, "tpe", sampler={"name": "tpe", "args": {"n_startup_trials": 3}})).build_sampler()
    assert tpe.inner._n_startup_trials == 3 and tpe.inner._multivariate and tpe.inner._constant_liar  # TPE defaults stay
    qmc = SearchSpace.load(tiny_space(tmp_path, "qmc", sampler={"name": "qmc", "args": {"qmc_type": "halton"},
                                                                "objective": "pareto"})).build_sampler()
    assert type(qmc) is optuna.samplers.QMCSampler and qmc._qmc_type == "halton"  # pareto: the sampler itself


@pytest.mark.parametrize("objective, directions", [("throughput", 1), ("pareto", 2)])
def test_sampler_objective_decides_what_the_sampler_sees_while_the_study_keeps_both(tmp_path, tiny_space, objective,
                                                                                   directions):
    """`sampler.objective: throughput` shows the sampler each trial's throughput and constraints only; the study
    still stores (throughput, kNN)."""
    space = SearchSpace.load(tiny_space(tmp_path, objective, sampler={"name": "tpe", "seed": 0, "objective": objective,
                                                                      "args": {"n_startup_trials": 1}},
                                        params={"crops.local_crops": {"choices": [0, 2, 4]}}))
    study = open_study(space, f"sqlite:///{tmp_path / (objective + '.db')}")
    seen = []
    inner = study.sampler.inner if objective == "throughput" else study.sampler
    original = inner.sample_relative

    def recording(view, trial, search_space):
        done = view._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        seen.append((len(view.directions), view._is_multi_objective(), [list(t.values) for t in done],
                     [t.constraints for t in done]))
        return original(view, trial, search_space)

    inner.sample_relative = recording
    for tp, knn in [(10.0, 50.0), (30.0, 20.0), (20.0, 40.0), (0.0, 0.0)]:  # the last diverged (as the searcher tells it)
        trial = study.ask()
        trial.suggest_categorical("crops.local_crops", [0, 2, 4])
        trial.set_constraint("knn_points", -1.0 if knn > 30 else 5.0)
        if tp == 0.0:
            trial.set_user_attr("fail_reason", "nan")
        study.tell(trial, [tp, knn])
    study.ask().suggest_categorical("crops.local_crops", [0, 2, 4])  # the first suggest samples relative
    n_dirs, multi, values, constraints = seen[-1]
    assert (n_dirs, multi) == (directions, directions == 2)
    expected = [[10.0, 50.0], [30.0, 20.0], [20.0, 40.0], [0.0, 0.0]]
    # throughput alone; the diverged trial at the slowest measured throughput (the baseline's 10.0 here), not 0
    assert values[-4:] == ([[10.0], [30.0], [20.0], [10.0]] if objective == "throughput" else expected)
    assert constraints[-4:] == [{"knn_points": -1.0}, {"knn_points": 5.0}, {"knn_points": -1.0}, {"knn_points": 5.0}]
    stored = [t.values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert stored[-4:] == expected  # the study's own trials keep both objectives


def test_bruteforce_sampler_tries_each_configuration_once_then_the_study_finishes(tmp_path, tiny_space):
    """A shuffled grid through the searcher's ask/tell: Optuna's `Study.stop()` (only for `optimize`) is not called."""
    from ray.tune.search import Searcher

    from tuner.pruning import PruningBridge
    from tuner.searcher import StudySearcher

    space = SearchSpace.load(tiny_space(tmp_path, "bf", sampler={"name": "bruteforce", "seed": 1}, budget={"n_trials": 20},
                                        params={"crops.local_crops": {"choices": [0, 2]},
                                                "model.head.out_dim": {"choices": [64, 128]}}))
    study = open_study(space, f"sqlite:///{tmp_path / 'bf.db'}")
    searcher = StudySearcher(study, space, PruningBridge(space.pruner, space.constraints.knn_metric), 20, 1)
    asked = []
    for i in range(20):
        spec = searcher.suggest(f"t{i}")
        if spec == Searcher.FINISHED:
            break
        asked.append((spec["config"]["crops"]["local_crops"], spec["config"]["model"]["head"]["out_dim"]))
        searcher.on_trial_complete(f"t{i}", {"phase": "done", "throughput_img_s": 10.0 + i, "knn_top1": 20.0,
                                             "peak_memory_mb": 1.0, "time_total_s": 1.0})
    # the baseline (2, 64) at its 2 seeds, then the other three configurations once each, then FINISHED
    assert asked[:2] == [(2, 64), (2, 64)]
    assert sorted(asked[2:]) == [(0, 64), (0, 128), (2, 128)]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5


def test_relative_paths_in_base_overrides_become_absolute_so_trials_find_them(tmp_path, tiny_space):
    weights = tmp_path / "warm" / "backbone.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    (tmp_path / "data").mkdir()
    path = tiny_space(tmp_path, "paths", base={"overrides": {"model.init": "warm/backbone.pth", "data.root": "data",
                                                           "model.width": 8}})
    space = SearchSpace.load(path)
    assert space.base["overrides"]["model.init"] == str(weights.resolve())
    assert space.base["overrides"]["data.root"] == str((tmp_path / "data").resolve())


def test_the_baseline_carries_every_knob_it_runs_with_so_a_model_based_sampler_can_model_them(tmp_path, tiny_space):
    """GP models only the knobs every finished trial carries; a knob the baseline left out was drawn at random."""
    from tuner.searcher import sample_params, trial_config

    space = SearchSpace.load(tiny_space(tmp_path, "every", params={
        "crops.local_crops": {"choices": [0, 2]},                     # the baseline's own value
        "system.num_workers": {"choices": [0, 2]},                    # the base config's (0)
        "system.persistent_workers": {"choices": [False, True], "when": "system.num_workers > 0"},  # condition fails
        "system.channels_last": {"choices": [False, True]},           # the base config's (false)
        "model.head.hidden_dim": {"choices": [16, 32]},               # the base config's 64 is not a choice
    }))
    expected = {"crops.local_crops": 2, "system.num_workers": 0, "system.channels_last": False}
    assert baseline_params(space) == expected
    study = open_study(space, f"sqlite:///{tmp_path / 'every.db'}")
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert all(t.system_attrs["fixed_params"] == expected for t in waiting)
    trial = study.ask()
    assert trial.number == 0 and sample_params(trial, space, "baseline") == expected
    assert trial_config(space, expected, "baseline", 0).to_dict() == trial_config(space, {}, "baseline", 0).to_dict()
