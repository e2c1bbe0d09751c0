"""End to end with a real local Ray: trials run through Ray Tune and land in the study with the right states.

One study injects a fault per trial through the trainer's TRAINER_INJECT_FAULT hook (a grid over
none / oom / nan / kill), with a quality pruner that prunes every search trial whose kNN is below 101.
"""

from __future__ import annotations

import json
import shutil
import os
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from trainer.config import TrainConfig

pytestmark = pytest.mark.slow

# `fault_study` (tests/conftest.py): one real study per session, a trial per injected fault.


def _by_fault(study):
    return {t.params.get("env.TRAINER_INJECT_FAULT", t.user_attrs["role"]): t for t in study.trials}


def test_states_match_injected_faults(fault_study):
    folder, summary, lines = fault_study
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{folder}/studies/faults.db")
    trials = _by_fault(study)
    assert trials["baseline"].number == 0 and trials["baseline"].state == TrialState.COMPLETE
    assert trials["baseline_noise"].state == TrialState.COMPLETE and trials["baseline_noise"].user_attrs["seed"] == 1
    pruned = trials["none"]
    assert pruned.state == TrialState.PRUNED and pruned.values is None
    assert pruned.user_attrs["pruned_phase"] == "quality" and "ThresholdPruner" in pruned.user_attrs["prune_reason"]
    assert pruned.user_attrs["time_saved_s"] > 0
    oom = trials["oom@2"]
    assert oom.user_attrs["fail_reason"] == "oom"
    assert oom.state == TrialState.COMPLETE and oom.values == [0.0, 0.0] and max(oom.constraints.values()) > 0
    nan = trials["nan@2"]  # diverged: told COMPLETE and infeasible like oom, so the sampler learns the region
    assert nan.state == TrialState.COMPLETE and nan.values == [0.0, 0.0] and nan.user_attrs["fail_reason"] == "nan"
    assert nan.constraints["knn_points"] > 0 and nan.constraints["memory"] < 0 and oom.constraints["memory"] > 0
    assert trials["nan@2"].user_attrs["fail_step"] == 2 and oom.user_attrs["fail_step"] == 2
    assert "fail_step" not in trials["kill@2"].user_attrs  # a killed process reports no step
    assert any("fail: nan at step 2" in line for line in lines)
    assert trials["kill@2"].state == TrialState.FAIL and trials["kill@2"].user_attrs["fail_reason"] == "killed"
    assert summary.states == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1}
    assert summary.fail_reasons == {"oom": 1, "nan": 1, "killed": 1}
    assert len(lines) >= 6 and any("trial 6/6" in line for line in lines)
    assert list((folder / "studies" / "faults").glob("run-*")), "Ray's files belong under studies/<name>/"


def test_baseline_numbers_noise_and_per_trial_measurements_are_stored(fault_study):
    folder, summary, _ = fault_study
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{folder}/studies/faults.db")
    attrs = study.user_attrs
    base, noise = study.trials[0], study.trials[1]
    assert attrs["baseline_trial"] == 0
    assert attrs["knn_noise_points"] == pytest.approx(abs(base.values[1] - noise.values[1]))
    assert attrs["knn_tolerance_effective"] >= max(attrs["knn_noise_points"], 1.0)
    for t in (base, noise):
        u = t.user_attrs
        assert u["throughput_img_s"] == t.values[0] > 0 and u["knn_top1"] == t.values[1]
        assert set(u["phases_ms"]) >= {"data", "student_forward", "backward", "optimizer"}
        assert u["peak_memory_mb"] > 0 and u["hardware"]["cpu_cores"] >= 1 and "torch" in u["hardware"]
        assert u["config"]["system"]["seed"] == u["seed"]
        assert TrainConfig.from_dict(u["config"]).budget.steps == 4  # the base's budget, not the trial's
        assert sorted(t.intermediate_values) == [0, 4, 8] and "speedup" in u
    assert base.user_attrs["speedup"] == pytest.approx(1.0)


def test_plain_optuna_reopens_the_same_trials_and_attributes(fault_study):
    folder, summary, _ = fault_study
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{folder}/studies/faults.db")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    assert study.metric_names == ["throughput_img_s", "knn_top1"]
    assert [(r.number, r.state) for r in summary.trials] == [(t.number, t.state.name) for t in study.trials]
    assert {t.number for t in study.best_trials} <= {0, 1}
    summaries = optuna.get_all_study_summaries(f"sqlite:///{folder}/studies/faults.db")
    assert [s.study_name for s in summaries] == ["faults"] and summaries[0].n_trials == 6


def test_status_export_and_the_exported_config_trains(fault_study, capsys, tmp_path):
    from trainer.cli import main as trainer_main
    from tuner.cli import main

    folder, _, _ = fault_study
    url = f"sqlite:///{folder}/studies/faults.db"
    assert main(["status", url]) == 0
    out = capsys.readouterr().out
    assert "trials: 4 COMPLETE, 1 FAIL, 1 PRUNED" in out and "Pareto set" in out and "baseline: trial 0" in out
    target = tmp_path / "best.yaml"
    assert main(["export", url, "--pick", "trial:0", "-o", str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# Exported by `tuner export --pick trial:0` from study 'faults', trial 0")
    assert "img/s" in text and "speedup x1.00" in text and "kNN top-1" in text and "Hardware: cpu" in text
    config = TrainConfig.load(target)
    assert config.model.width == 8 and config.crops.local_crops == 2
    assert trainer_main(["train", str(target), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


def test_confirm_measures_winner_and_baseline_interleaved(fault_study, tmp_path):
    from tuner.confirm import confirm
    from tuner.export import export
    from tuner.study import load

    folder, _, _ = fault_study
    db = tmp_path / "faults.db"  # a copy: confirm writes to the study, which other tests read as it was run
    shutil.copy(folder / "studies" / "faults.db", db)
    lines: list[str] = []
    study = load(f"sqlite:///{db}")
    outcome = confirm(study, "trial:1", rounds=2, progress=lines.append)
    assert [line.split()[2] for line in lines[:4]] == ["winner", "baseline", "winner", "baseline"]
    assert len(outcome["speedups"]) == 2
    assert outcome["speedups"] == pytest.approx([w / b for w, b in zip(outcome["winner_img_s"], outcome["baseline_img_s"])])
    # the claim is each config's best round: interference only slows a measurement
    assert outcome["speedup"] == pytest.approx(max(outcome["winner_img_s"]) / max(outcome["baseline_img_s"]))
    assert outcome["speedup_min"] == min(outcome["speedups"]) and outcome["speedup_max"] == max(outcome["speedups"])
    again = load(f"sqlite:///{db}")
    assert again.user_attrs["confirm"]["trial"] == 1
    assert again.user_attrs["confirmed_speedups"]["1"] == pytest.approx(outcome["speedup"])
    # every place that states it says how it was measured
    header = export(again, "trial:1", tmp_path / "winner.yaml")[1]
    assert f"Confirmed speedup (interleaved A/B, 2 rounds): x{outcome['speedup']:.2f} (best of 2 interleaved rounds each; " \
           f"per-round ratios {outcome['speedup_min']:.2f}-{outcome['speedup_max']:.2f})." in header


def test_a_confirmation_stored_as_a_median_still_reads_as_one(fault_study, tmp_path):
    """Studies confirmed before the claim was the best rounds' ratio stored the median of per-round ratios."""
    from tuner.export import export
    from tuner.study import load
    from tuner.summary import format_status, summarize

    folder, _, _ = fault_study
    db = tmp_path / "faults.db"
    shutil.copy(folder / "studies" / "faults.db", db)
    study = load(f"sqlite:///{db}")
    study.set_user_attr("confirm", {"trial": 1, "baseline_trial": 0, "rounds": 3, "speedups": [2.1, 2.3, 2.2],
                                    "speedup_median": 2.2, "speedup_min": 2.1, "speedup_max": 2.3})
    header = export(study, "trial:1", tmp_path / "winner.yaml")[1]
    assert "Confirmed speedup (interleaved A/B, 3 rounds): x2.20 (median of 3 interleaved rounds; range 2.10-2.30)." in header
    assert "speedup x2.20 (median of 3 interleaved rounds; range 2.10-2.30)" in format_status(summarize(study))


def test_interrupted_study_continues_without_loss_or_duplicates(ray_session, tiny_space, tmp_path, monkeypatch):
    from tuner import run

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "resume", constraints={"knn_noise_seeds": 1}, budget={"n_trials": 2})
    first = run(path, progress=None)
    assert first.states == {"COMPLETE": 2}
    url = f"sqlite:///{tmp_path}/studies/resume.db"
    study = optuna.load_study(study_name="resume", storage=url)
    kept = {t.number: (t.datetime_start, t.values) for t in study.trials}
    crashed = study.ask()  # a driver that died mid-trial leaves it RUNNING
    crashed.suggest_categorical("crops.local_crops", [0, 2])
    lines: list[str] = []
    second = run(path, n_trials=3, progress=lines.append)
    study = optuna.load_study(study_name="resume", storage=url)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) == [0, 1, 2, 3]
    assert {n: (study.trials[n].datetime_start, study.trials[n].values) for n in kept} == kept
    assert study.trials[2].state == TrialState.FAIL and study.trials[2].user_attrs["fail_reason"] == "interrupted"
    rerun = study.trials[3]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["rerun_of"] == 2 and rerun.params == crashed.params
    assert any("interrupted" in line for line in lines)
    assert second.states == {"COMPLETE": 3, "FAIL": 1}
    # a finished study is not run again
    third = run(path, n_trials=3, progress=lines.append)
    assert len(third.trials) == 4 and "already has 3 of 3 trials" in lines[-1]


def test_killed_driver_leaves_no_trace_after_the_study_is_run_again(ray_session, tiny_space, tmp_path, monkeypatch):
    """SIGKILL the `tuner run` process mid-trial; running it again marks that trial interrupted and reruns it."""
    import signal
    import subprocess
    import sys
    import time

    from tuner import run
    from tuner.study import storage_for

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "crash", constraints={"knn_noise_seeds": 1}, budget={"n_trials": 3},
                      trial={"steps": 24, "eval_every_steps": 8})
    address = ray_session.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tuner.cli", "run", str(path), "--address", address],
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"sqlite:///{tmp_path}/studies/crash.db"
    deadline = time.monotonic() + 240
    running = []
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.25)
        if not (tmp_path / "studies" / "crash.db").exists():
            continue
        try:  # looking while the driver creates the database is what a user's `tuner status` does too
            study = optuna.load_study(study_name="crash", storage=storage_for(url))
        except KeyError:  # the database is there, the study not yet
            continue
        running = [t for t in study.trials if t.state == TrialState.RUNNING and t.number >= 1]
        if running:
            time.sleep(2.0)  # inside the trial, not at its start
            break
    assert running, f"the driver never reached a search trial (exit {driver.poll()}):\n{log.read_text()[-3000:]}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    victim = running[0].number
    run(path, progress=None)
    study = optuna.load_study(study_name="crash", storage=url)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert study.trials[victim].state == TrialState.FAIL and study.trials[victim].user_attrs["fail_reason"] == "interrupted"
    reruns = [t for t in study.trials if t.user_attrs.get("rerun_of") == victim]
    assert len(reruns) == 1 and reruns[0].state == TrialState.COMPLETE and reruns[0].params == study.trials[victim].params
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].user_attrs["role"] == "baseline"
    counted = [t for t in study.trials if t.user_attrs.get("fail_reason") != "interrupted"]
    assert len(counted) == 3


def test_trials_past_their_timeout_are_failed_with_reason_timeout(ray_session, tiny_space, tmp_path, monkeypatch):
    from tuner import run

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "slow", constraints={"knn_noise_seeds": 1}, budget={"n_trials": 2},
                      trial={"timeout_s": 0.01})
    summary = run(path, progress=None)
    study = optuna.load_study(study_name="slow", storage=f"sqlite:///{tmp_path}/studies/slow.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in study.trials] == ["timeout", "timeout"]
    assert summary.fail_reasons == {"timeout": 2}


def test_run_ends_by_confirming_its_winner_and_states_the_confirmed_speedup(ray_session, tiny_space, tmp_path, monkeypatch):
    from tuner import run
    from tuner.summary import format_status

    monkeypatch.chdir(tmp_path)
    # the baseline is made several times slower (8 local crops, a 4096-wide head) so the one search trial
    # wins however noisy the machine: this test is about confirming a winner, not about finding one
    path = tiny_space(tmp_path, "confirmed", params={"crops.local_crops": {"choices": [0]}},
                      baseline={"crops.local_crops": 8, "model.head.out_dim": 4096},
                      constraints={"knn_noise_seeds": 1, "knn_tolerance_points": 100.0}, budget={"n_trials": 2})
    lines: list[str] = []
    summary = run(path, progress=lines.append, confirm_rounds=2)
    assert summary.best_feasible.number == 1 and summary.confirm["trial"] == 1 and summary.confirm["rounds"] == 2
    assert len(summary.confirm["speedups"]) == 2 and summary.confirm["speedup"] > 0
    assert any(line.startswith("confirming trial 1 against the baseline: 2 interleaved rounds") for line in lines)
    status = format_status(summary)
    assert f"x{summary.confirm['speedup']:.2f} confirmed (best of 2 interleaved rounds each; per-round ratios" in status
    assert "quality: unmeasured at this budget (method changes: crops.local_crops, model.head.out_dim)" in status
    # continued later, a winner already confirmed is not measured again
    lines.clear()
    run(path, n_trials=2, progress=lines.append, confirm_rounds=2)
    assert not any(line.startswith("confirming") for line in lines)


def test_a_study_without_confirmation_says_unconfirmed(stored_study):
    from tuner.export import export_header
    from tuner.summary import format_status, summarize

    s = stored_study("plain")
    s.add("baseline", TrainConfig().to_dict(), throughput=10.0, knn=20.0)
    s.add("search", TrainConfig().with_overrides({"crops.local_crops": 0}).to_dict(), throughput=30.0, knn=20.0)
    study = optuna.load_study(study_name="plain", storage=s.url)
    assert "best feasible: trial 1, 30.0 img/s, x3.00 unconfirmed" in format_status(summarize(study))
    assert "Speedup unconfirmed" in export_header(study, study.trials[1], "fastest")


def test_status_json_is_the_summary_tuner_run_returned(fault_study, capsys, monkeypatch):
    from tuner.cli import main

    folder, summary, _ = fault_study
    monkeypatch.chdir(folder)
    assert main(["status", "faults", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    returned = json.loads(json.dumps(summary.to_dict(), default=str))
    printed.pop("confirm"), returned.pop("confirm")  # the confirm test may have run on a copy since; never here
    assert printed == returned
    assert printed["n_trials"] == 6 and printed["states"] == {"COMPLETE": 4, "FAIL": 1, "PRUNED": 1}



def test_a_second_driver_on_one_sqlite_study_refuses_at_once_and_changes_nothing(tiny_space, tmp_path, monkeypatch, capsys):
    import hashlib

    from tuner.cli import main
    from tuner.study import driver_lock

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "busy")
    url = f"sqlite:///{tmp_path}/studies/busy.db"
    (tmp_path / "studies").mkdir()
    optuna.create_study(study_name="other", storage=url)  # the file exists, as while a first driver runs
    before = hashlib.sha256((tmp_path / "studies" / "busy.db").read_bytes()).hexdigest()
    with driver_lock("sqlite:///studies/busy.db", "busy"):  # the first driver holds the study
        assert main(["run", str(path), "--confirm-rounds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: sqlite:///studies/busy.db: study 'busy' is being run by another "
                                               f"tuner (pid {os.getpid()}); a SQLite file takes one driver")
    assert "journal:///studies/busy.log" in err[0]
    assert hashlib.sha256((tmp_path / "studies" / "busy.db").read_bytes()).hexdigest() == before


def test_a_live_drivers_running_trial_is_not_taken_over(tmp_path):
    import subprocess
    import sys

    from tuner.study import driver_id, recover_interrupted

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", directions=["maximize", "maximize"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = driver_id().rpartition(":")[0]
        for owner in (f"{host}:{alive.pid}", "another-host:1", None):
            trial = study.ask()
            if owner:
                trial.set_user_attr("driver", owner)
        assert recover_interrupted(study) == [2]  # only the trial with no recorded driver
        alive.kill()
        alive.wait()
        assert recover_interrupted(study) == [0]  # its driver is gone now; the other host's stays
    finally:
        alive.kill()
        alive.wait()


def test_a_study_runs_on_a_journal_file(ray_session, tiny_space, tmp_path, monkeypatch, capsys):
    from tuner import run
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "journal", constraints={"knn_noise_seeds": 1}, budget={"n_trials": 2})
    summary = run(path, storage="journal:///studies/journal.log", progress=None, confirm_rounds=0)
    assert summary.states == {"COMPLETE": 2}
    assert (tmp_path / "studies" / "journal.log").stat().st_size > 0 and not (tmp_path / "studies" / "journal.db").exists()
    assert main(["status", "journal:///studies/journal.log"]) == 0
    assert "trials: 2 COMPLETE" in capsys.readouterr().out


def _open_storage_at_once(url: str, barrier, errors) -> None:
    from tuner.study import storage_for

    barrier.wait()
    try:
        storage_for(url)
    except Exception as exc:  # noqa: BLE001 - the test reports what failed
        errors.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_opening_a_new_database_at_once_all_get_it(tmp_path):
    """A driver creating its database while `tuner status` (or another process) opens it must not crash:
    both stamp Optuna's schema version and one insert loses; opening again finds the winner's."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    for i in range(4):
        url = f"sqlite:///{tmp_path}/race{i}.db"
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_storage_at_once, args=(url, barrier, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/race{i}.db") == []
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


def test_trials_can_run_one_after_another_in_one_reused_actor(ray_session, tiny_space, tmp_path, monkeypatch):
    from tuner import run

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "reuse", constraints={"knn_noise_seeds": 1}, budget={"n_trials": 4},
                      sampler={"name": "grid"}, ray={"torch_threads": 1, "reuse_actors": True},
                      params={"crops.local_crops": {"choices": [0, 2]}, "env.TRAINER_PROBE": {"choices": ["a", "b"]}})
    summary = run(path, progress=None, confirm_rounds=0)
    assert summary.states == {"COMPLETE": 4}
    results = [json.loads(line) for f in (tmp_path / "studies" / "reuse").rglob("result.json")
               for line in f.read_text().splitlines() if line.strip()]
    assert len({r["trial_id"] for r in results}) == 4
    assert len({r["pid"] for r in results}) == 1  # Ray Tune reports each result's process: one actor ran them all
    assert "TRAINER_PROBE" not in os.environ
    from tuner.study import load

    # each trial stores the host allocator policy its run had in effect (the trainer's default here)
    assert [t.user_attrs.get("host_allocator") for t in load("reuse").trials] == ["retain"] * 4


def test_a_trials_environment_variables_are_set_for_it_and_restored_after_it(monkeypatch):
    from tuner.trial import _environment

    monkeypatch.setenv("TRAINER_KEPT", "before")
    monkeypatch.delenv("TRAINER_NEW", raising=False)
    with _environment({"TRAINER_KEPT": "during", "TRAINER_NEW": "1"}):
        assert os.environ["TRAINER_KEPT"] == "during" and os.environ["TRAINER_NEW"] == "1"
    assert os.environ["TRAINER_KEPT"] == "before" and "TRAINER_NEW" not in os.environ
    with pytest.raises(RuntimeError):  # a failing trial restores it too
        with _environment({"TRAINER_NEW": "2"}):
            raise RuntimeError("trial failed")
    assert "TRAINER_NEW" not in os.environ
