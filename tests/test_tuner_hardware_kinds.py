"""Speedups per hardware kind: where a study's trials ran on several kinds of hardware, each trial is compared
with the baseline measured on its own kind (`baselines_by_kind`), and `status`, the export header and the report
say which baseline each kind's speedups are against. The measurement itself is `tuner.runner.measure_kind_baselines`
with `on_cluster` stubbed here (it runs for real on a two-node Ray cluster in test_tuner_cluster.py)."""

from __future__ import annotations

import optuna
import pytest

from trainer.config import ConfigError, TrainConfig

A100 = {"device": "NVIDIA A100", "cpu_model": "Other CPU"}
H100 = {"device": "NVIDIA H100", "cpu_model": "Gone CPU"}
NODE = {"node_id": "abcdef1234567890", "node_ip": "10.0.0.2", "device": "NVIDIA A100", "cpu_model": "Other CPU",
        "cpus": 8, "gpus": 1}


def _mixed(stored_study):
    """Baseline 100 img/s on cpu/Test CPU; trial 1 there at 150; trial 2 on an A100 at 600; trial 3 on an H100 at
    900; trial 4 failed on a V100."""
    s = stored_study("mixed")
    base = TrainConfig()
    s.add("baseline", base.to_dict(), throughput=100.0, knn=20.0)
    s.add("search", base.with_overrides({"crops.local_crops": 0}).to_dict(), throughput=150.0, knn=20.0)
    for local_crops, throughput, kind in ((4, 600.0, A100), (6, 900.0, H100)):
        s.add("search", base.with_overrides({"crops.local_crops": local_crops}).to_dict(), throughput=throughput,
              knn=20.0, attrs={"hardware": {**s.HARDWARE, **kind}})
    # measured nothing, so no speedup to compare: its hardware is no kind of the study's speedups
    s.add("search", fail_reason="error", attrs={"hardware": {**s.HARDWARE, "device": "NVIDIA V100"}})
    return s


def _measured(s, throughput=400.0):
    s.study.set_user_attr("baselines_by_kind", {"NVIDIA A100, Other CPU": {
        "throughput": throughput, "node": NODE, "baseline_trial": 0, "measured_at": "2025-01-01T00:00:00+00:00"}})
    return optuna.load_study(study_name="mixed", storage=s.url)


def test_each_trial_s_speedup_is_against_the_baseline_measured_on_its_own_kind_of_hardware(stored_study):
    from tuner.summary import kind_baselines, speedup_of

    study = _measured(_mixed(stored_study))
    trials = study.trials
    assert [speedup_of(study, t) for t in trials[:4]] == pytest.approx([1.0, 1.5, 600.0 / 400.0, 9.0])
    assert speedup_of(study, trials[4]) is None
    # the A100 trial's stored speedup (against the cpu baseline) was 6.0: the machine, not the knob
    assert trials[2].user_attrs["speedup"] == pytest.approx(6.0)
    assert kind_baselines(study) == {"cpu, Test CPU": {"throughput": 100.0, "trial": 0},
                                     "NVIDIA A100, Other CPU": study.user_attrs["baselines_by_kind"]["NVIDIA A100, Other CPU"],
                                     "NVIDIA H100, Gone CPU": None}


LINE = ("speedups are per hardware kind, each trial against the baseline measured on its kind: cpu, Test CPU: "
        "baseline 100.0 img/s (trial 0); NVIDIA A100, Other CPU: baseline 400.0 img/s (measured after the search on "
        "node abcdef12 (10.0.0.2)); NVIDIA H100, Gone CPU: no baseline measured there (its trials' speedups are "
        "against the baseline trial's hardware)")


def test_status_names_each_kind_and_its_baseline_and_flags_trials_on_a_kind_without_one(stored_study):
    from tuner.summary import format_status, summarize

    summary = summarize(_measured(_mixed(stored_study)))
    assert [r.speedup for r in summary.trials[:4]] == pytest.approx([1.0, 1.5, 1.5, 9.0])
    assert [r.hardware_kind for r in summary.trials] == ["cpu, Test CPU", "cpu, Test CPU", "NVIDIA A100, Other CPU",
                                                        "NVIDIA H100, Gone CPU", "NVIDIA V100, Test CPU"]
    status = format_status(summary)
    assert LINE in status.splitlines()
    assert ("warning: no baseline measured on NVIDIA H100, Gone CPU (trials 3): their speedups are against the "
            "baseline trial on cpu, Test CPU, which mixes the knob with the machine") in status
    assert "every speedup is against the baseline measured on" not in status  # the old study-wide warning
    table = status.split("all trials:")[1].splitlines()
    assert "speedup (own kind)" in table[1]
    row = {line.split()[0]: line for line in table[3:7]}
    assert "1.50x" in row["2"] and "speedup across hardware" not in row["2"]
    assert "9.00x" in row["3"] and "speedup across hardware (no baseline on its kind)" in row["3"]
    assert summary.to_dict()["hardware_kinds"]["NVIDIA H100, Gone CPU"] is None


def test_a_study_on_one_kind_of_hardware_reads_as_before(stored_study):
    from tuner.summary import format_status, summarize

    s = stored_study("single")
    s.add("baseline", TrainConfig().to_dict(), throughput=100.0, knn=20.0)
    s.add("search", TrainConfig().with_overrides({"crops.local_crops": 0}).to_dict(), throughput=250.0, knn=20.0)
    summary = summarize(optuna.load_study(study_name="single", storage=s.url))
    status = format_status(summary)
    assert "per hardware kind" not in status and "speedup (study)" in status and "x2.50 unconfirmed" in status
    assert list(summary.hardware_kinds) == ["cpu, Test CPU"] and not [w for w in summary.warnings if "hardware" in w]
    assert "best feasible: trial 1, 250.0 img/s, x2.50 unconfirmed" in status
    assert "Pareto set (feasible; throughput vs kNN):" in status


def test_a_study_on_one_kind_of_hardware_ranks_by_throughput_as_before(stored_study):
    """One kind: the winner, the Pareto set, the knee and the rung candidates are today's, by raw throughput."""
    from tuner.promotion import candidates, may_become_candidates
    from tuner.select import best_feasible, knee, pareto_set, speed_of, throughput

    s = stored_study("one-kind")
    base = TrainConfig()
    s.add("baseline", base.to_dict(), throughput=100.0, knn=20.0)
    for local_crops, tp, knn in ((0, 180.0, 20.5), (4, 600.0, 19.6), (6, 900.0, 19.1), (3, 500.0, 19.4), (5, 1000.0, 15.0)):
        s.add("search", base.with_overrides({"crops.local_crops": local_crops}).to_dict(), throughput=tp, knn=knn)
    study = optuna.load_study(study_name="one-kind", storage=s.url)
    assert speed_of(study) is throughput
    assert best_feasible(study).number == 3  # 900 img/s; 5 (1000) is infeasible
    assert [t.number for t in pareto_set(study)] == [3, 2, 1] == [t.number for t in candidates(study)]
    assert [t.number for t in may_become_candidates(study)] == [3, 2, 1]
    assert knee(study).number == 2


def test_export_header_says_which_baseline_the_speedup_is_against(stored_study):
    from tuner.export import export_header

    study = _measured(_mixed(stored_study))
    header = export_header(study, study.trials[2], "trial:2").splitlines()
    assert header[1].endswith(", study speedup x1.50 over the baseline measured on its hardware, NVIDIA A100, "
                              "Other CPU (400.0 img/s).")
    assert header[2] == LINE[0].upper() + LINE[1:] + "."
    flagged = export_header(study, study.trials[3], "trial:3").splitlines()[1]
    assert flagged.endswith("study speedup x9.00 over the baseline (trial 0, 100.0 img/s), measured on other hardware "
                            "(cpu, Test CPU): no baseline was measured on NVIDIA H100, Gone CPU.")
    same = export_header(study, study.trials[1], "trial:1").splitlines()[1]
    assert same.endswith("study speedup x1.50 over the baseline (trial 0, 100.0 img/s).")


def test_report_states_the_kinds_and_shows_each_trial_s_hardware_and_own_kind_speedup(stored_study):
    import html

    from tuner.report import headline, trials_table
    from tuner.summary import summarize

    study = _measured(_mixed(stored_study))
    top = headline(study, summarize(study))
    assert html.escape(LINE[0].upper() + LINE[1:] + ".") in top
    assert "no baseline measured on NVIDIA H100, Gone CPU (trials 3)" in top
    table = trials_table(study)
    rows = table.split("<tr>")[2:]
    assert '<th>hardware</th>' in table
    assert '<td data-v="1.5">1.5</td><td data-v="NVIDIA A100, Other CPU">' in rows[2]
    assert ('<td data-v="9.0">9.0</td><td data-v="NVIDIA H100, Gone CPU (no baseline here: speedup across hardware)">'
            in rows[3])


def test_the_driver_measures_the_baseline_once_on_each_other_kind_and_warns_where_no_node_is_left(
        stored_study, tiny_space, tmp_path, monkeypatch):
    import tuner.remeasure
    from tuner.runner import measure_kind_baselines
    from tuner.space import SearchSpace
    from tuner.summary import speedup_of

    s = _mixed(stored_study)
    space = SearchSpace.load(tiny_space(tmp_path, "mixed"))  # ray.torch_threads 1
    asked, measured = [], []

    def on_cluster(address, hardware, where="--address", threads=None):
        asked.append((address, hardware["device"], threads))
        if hardware["device"] == H100["device"]:
            raise ConfigError(f"{where} {address}: no node has the study's hardware (NVIDIA H100, Gone CPU); "
                              "the cluster has: NVIDIA A100, Other CPU")
        return (lambda config: measured.append(config.crops.local_crops) or 400.0), NODE

    monkeypatch.setattr(tuner.remeasure, "on_cluster", on_cluster)
    lines: list[str] = []
    done = measure_kind_baselines(s.study, space, lines.append, "10.0.0.1:6379")
    assert asked == [("10.0.0.1:6379", "NVIDIA A100", 1), ("10.0.0.1:6379", "NVIDIA H100", 1)]
    assert measured == [2]  # the baseline's config (crops.local_crops 2), once
    assert lines[0] == ("trials 2 ran on NVIDIA A100, Other CPU, the baseline on cpu, Test CPU: measuring the baseline "
                        "(trial 0) on node abcdef12 (10.0.0.2)")
    assert lines[1] == "baseline on NVIDIA A100, Other CPU: 400.0 img/s (on cpu, Test CPU: 100.0 img/s); trials 2 are compared with it"
    assert lines[2].startswith("warning: no baseline measured on NVIDIA H100, Gone CPU (--address 10.0.0.1:6379: no node "
                               "has the study's hardware") and lines[2].endswith(
        "the speedups of trials 3 stay against the baseline trial on cpu, Test CPU")
    study = optuna.load_study(study_name="mixed", storage=s.url)
    stored = study.user_attrs["baselines_by_kind"]
    assert list(stored) == ["NVIDIA A100, Other CPU"] == list(done)
    assert stored["NVIDIA A100, Other CPU"]["throughput"] == 400.0 and stored["NVIDIA A100, Other CPU"]["node"] == NODE
    assert [speedup_of(study, t) for t in study.trials[:4]] == pytest.approx([1.0, 1.5, 1.5, 9.0])
    # a later run measures only the kind still without a baseline
    asked.clear()
    measure_kind_baselines(study, space, lines.append, "10.0.0.1:6379")
    assert [device for _, device, _ in asked] == ["NVIDIA H100"]


def test_the_driver_measures_nothing_on_one_kind_of_hardware(stored_study, tiny_space, tmp_path, monkeypatch):
    import tuner.remeasure
    from tuner.runner import measure_kind_baselines
    from tuner.space import SearchSpace

    s = stored_study("single")
    s.add("baseline", TrainConfig().to_dict(), throughput=100.0, knn=20.0)
    s.add("search", TrainConfig().with_overrides({"crops.local_crops": 0}).to_dict(), throughput=250.0, knn=20.0)
    monkeypatch.setattr(tuner.remeasure, "on_cluster", lambda *a, **k: pytest.fail("nothing to measure"))
    lines: list[str] = []
    assert measure_kind_baselines(s.study, SearchSpace.load(tiny_space(tmp_path, "single")), lines.append, "x:1") == {}
    assert lines == [] and "baselines_by_kind" not in s.study.user_attrs


def _ranked(stored_study, a100_baseline: float | None = 250.0, name: str = "ranked"):
    """Baseline 100 img/s, kNN 20 on cpu/Test CPU (tolerance 1 point); trial 1 there at 180 (x1.80, kNN 20.5);
    on an A100 (baseline 250 img/s there, measured after the search): trial 2 at 600 (x2.40, kNN 19.6), trial 4
    at 500 (x2.00, kNN 19.4: beaten by 2 on both) and trial 5 at 1000 (kNN 15: infeasible); trial 3 on an H100,
    where no baseline was measured, at 900 img/s and the best kNN (20.8): by raw throughput it beats them all."""
    s = stored_study(name)
    base = TrainConfig()
    s.add("baseline", base.to_dict(), throughput=100.0, knn=20.0)
    rows = ((0, 180.0, 20.5, None), (4, 600.0, 19.6, A100), (6, 900.0, 20.8, H100), (3, 500.0, 19.4, A100),
            (5, 1000.0, 15.0, A100))
    for local_crops, throughput, knn, kind in rows:
        s.add("search", base.with_overrides({"crops.local_crops": local_crops}).to_dict(), throughput=throughput,
              knn=knn, attrs={"hardware": {**s.HARDWARE, **kind}} if kind else None)
    if a100_baseline is not None:
        s.study.set_user_attr("baselines_by_kind", {"NVIDIA A100, Other CPU": {
            "throughput": a100_baseline, "node": NODE, "baseline_trial": 0, "measured_at": "2025-01-01T00:00:00+00:00"}})
    return optuna.load_study(study_name=name, storage=s.url)


def test_on_several_kinds_the_winner_and_the_pareto_set_rank_by_own_kind_speedup_not_throughput(stored_study):
    from tuner.select import best_feasible, feasible_trials, knee, pareto_set, pick, speed_of

    study = _ranked(stored_study)
    assert [t.number for t in feasible_trials(study)] == [0, 1, 2, 3, 4]  # 5 is infeasible; 3 is feasible
    speed = speed_of(study)
    assert [speed(t) for t in study.trials] == pytest.approx([1.0, 1.8, 2.4, None, 2.0, 4.0])
    # by raw throughput trial 3 (900 img/s, kNN 20.8) would dominate every other trial and win
    assert best_feasible(study).number == 2  # 600 img/s on an A100: x2.40 against the A100's own 250 img/s
    assert [t.number for t in pareto_set(study)] == [2, 1]  # x2.40 kNN 19.6; x1.80 kNN 20.5; 4 (x2.00, 19.4) beaten by 2
    assert pick(study, "fastest").number == 2 and knee(study).number in (1, 2)
    assert pick(study, "trial:3").number == 3  # still reachable by number


def test_before_a_kind_s_baseline_is_measured_its_trials_are_not_ranked(stored_study):
    from tuner.select import best_feasible, pareto_set

    study = _ranked(stored_study, a100_baseline=None)  # as during the search: only the baseline's kind compares
    assert best_feasible(study).number == 1 and [t.number for t in pareto_set(study)] == [1]


def test_status_report_export_confirm_and_progress_agree_on_the_own_kind_winner(stored_study, monkeypatch):
    import tuner.confirm
    from tuner.report import pareto_figure, phases_figure, winner
    from tuner.runner import confirm_winner
    from tuner.searcher import progress_line
    from tuner.summary import format_status, summarize

    study = _ranked(stored_study)
    summary = summarize(study)
    assert summary.best_feasible.number == 2 and summary.best_feasible.speedup == pytest.approx(2.4)
    assert [r.number for r in summary.pareto] == [2, 1]
    status = format_status(summary)
    assert "best feasible: trial 2, 600.0 img/s, x2.40 unconfirmed, kNN 19.6" in status
    pareto = status.split("Pareto set (feasible; speedup on its own hardware kind vs kNN):")[1].split("all trials:")[0]
    assert [line.split()[0] for line in pareto.strip().splitlines()[2:]] == ["2", "1"]
    assert ("no baseline measured on NVIDIA H100, Gone CPU (trials 3): their speedups are against the baseline trial "
            "on cpu, Test CPU, which mixes the knob with the machine, so they are not ranked") in status
    assert winner(study).number == 2
    figure = pareto_figure([study], [summary])
    front = next(trace for trace in figure.data if trace.name.startswith("Pareto set"))
    assert front.name == "Pareto set (by speedup on own hardware kind)" and list(front.customdata) == [1, 2]  # trial order
    assert [trace.customdata[0] for trace in figure.data if trace.name == "winner"] == [2]
    assert phases_figure(study).data[0].x == ("baseline #0", "winner #2", "Pareto #1")
    lines: list[str] = []
    confirmed: list[str] = []
    monkeypatch.setattr(tuner.confirm, "confirm", lambda study, policy, *a, **k: confirmed.append(policy))
    confirm_winner(study, 3, lines.append)
    assert lines[0].startswith("confirming trial 2 against the baseline") and confirmed == ["fastest"]
    assert progress_line(study, 3, 6).endswith("| best feasible #2 x2.40")


def test_export_picks_the_own_kind_winner(stored_study, tmp_path):
    from tuner.export import export

    path, header = export(_ranked(stored_study), "fastest", tmp_path / "winner.yaml")
    assert path.name == "winner.yaml"
    assert header.splitlines()[0].endswith("from study 'ranked', trial 2 (search).")
    assert ", study speedup x2.40 over the baseline measured on its hardware, NVIDIA A100, Other CPU (250.0 img/s)." \
        in header.splitlines()[1]


def test_promotion_enters_the_own_kind_pareto_set_and_keeps_every_kind_s_front_during_the_search(stored_study):
    from tuner.promotion import candidates, may_become_candidates

    assert [t.number for t in candidates(_ranked(stored_study))] == [2, 1]
    during = _ranked(stored_study, a100_baseline=None, name="during")  # each kind's own front keeps its checkpoints
    assert [t.number for t in candidates(during)] == [1]
    assert sorted(t.number for t in may_become_candidates(during)) == [1, 2, 3]
