"""Quality verdicts in the tuner: explain checks each exact knob's parity, confirm the winner's combination,
and status, export header and report say `parity ok`, `PARITY FAILED` or `unmeasured` for method changes.

Studies are written the way the searcher stores them (no Ray); explain's throughput is an injected exact
function, parity runs for real on tiny configs (width 8, 16 px, a few steps each).
"""

from __future__ import annotations

import optuna
import pytest
import torch
from conftest import TINY_BASE

from trainer.config import TrainConfig
from tuner.confirm import confirm
from tuner.explain import explain, format_explain
from tuner.export import export_header
from tuner.report import render_study
from tuner.summary import format_status, summarize
from tuner.verdicts import verdict

BASE = TrainConfig().with_overrides({**TINY_BASE, "crops.local_crops": 2, "budget.steps": 30})
WINNER = {"crops.local_crops": 0, "system.num_workers": 2, "system.prefetch_factor": 4, "system.channels_last": True}
SYSTEM = ["system.channels_last", "system.num_workers", "system.prefetch_factor"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_measure(config: TrainConfig) -> float:
    return 100.0 * (2.0 if config.crops.local_crops == 0 else 1.0) * (1.1 if config.system.channels_last else 1.0)


def study_with_winner(stored_study):
    s = stored_study("verdicts")
    s.add("baseline", BASE.to_dict(), throughput=100.0, knn=30.0)
    s.add("search", BASE.with_overrides(WINNER).to_dict(), throughput=220.0, knn=29.0)
    return optuna.load_study(study_name="verdicts", storage=s.url)


def test_explain_puts_a_parity_verdict_beside_each_exact_knob_and_unmeasured_beside_method_knobs(stored_study):
    study = study_with_winner(stored_study)
    lines: list[str] = []
    record = explain(study, rounds=1, echo=lines.append, measure=fake_measure, parity_steps=3)
    by_knob = {s["knob"]: s for s in record["steps"]}
    assert set(by_knob) == {"crops.local_crops", "system.num_workers, system.prefetch_factor", "system.channels_last"}
    assert by_knob["crops.local_crops"]["class"] == "method" and by_knob["crops.local_crops"]["parity"] is None
    workers, channels = by_knob["system.num_workers, system.prefetch_factor"]["parity"], by_knob["system.channels_last"]["parity"]
    assert workers["verdict"] == "ok" and workers["max_diff"] == 0.0 and workers["steps"] == 3
    assert channels["verdict"] == "ok" and channels["line"].startswith("parity ok (max rel. diff")
    table = format_explain(record)
    assert "method knob: quality unmeasured (needs kNN)" in table and "parity ok (max rel. diff 0e+00" in table
    assert any(line.startswith("system.channels_last: parity ok") for line in lines)
    stored = optuna.load_study(study_name="verdicts", storage=study._storage).user_attrs["parity"]
    assert set(stored) == {"system.num_workers, system.prefetch_factor", "system.channels_last"}

    text = verdict(study, study.trials[1]).text
    assert text == (f"quality: parity ok for {', '.join(SYSTEM)} (each alone; run tuner confirm for the combination); "
                    "unmeasured at this budget (method changes: crops.local_crops)")
    header = export_header(study, study.trials[1], "fastest")
    assert "Quality: parity ok for system.channels_last" in header and "unmeasured at this budget (method changes: crops.local_crops)" in header
    assert "PARITY FAILED" not in format_status(summarize(study))


def test_a_planted_bug_behind_a_knob_is_flagged_in_status_export_and_report(stored_study, monkeypatch):
    study = study_with_winner(stored_study)
    monkeypatch.setenv("TRAINER_INJECT_FAULT", "mathbug:system.channels_last")
    record = explain(study, rounds=1, echo=lambda _: None, measure=fake_measure, parity_steps=3)
    channels = next(s for s in record["steps"] if s["knob"] == "system.channels_last")["parity"]
    assert channels["verdict"] == "failed" and channels["line"].startswith("parity FAILED: param_grad_norms 1.0e-02")
    workers = next(s for s in record["steps"] if s["knob"].startswith("system.num_workers"))["parity"]
    assert workers["verdict"] == "ok"  # the bug is only behind channels_last

    status = format_status(summarize(study))
    assert "warning: parity FAILED for system.channels_last: parity FAILED: param_grad_norms" in status
    assert "  quality: PARITY FAILED (system.channels_last: parity FAILED" in status
    header = export_header(study, study.trials[1], "fastest")
    assert "Quality: PARITY FAILED (system.channels_last" in header
    assert "WARNING: a knob of this trial failed parity" in header
    page = render_study(study)
    assert "parity FAILED" in page and '<td class="warn">parity FAILED: param_grad_norms' in page


def test_confirm_checks_the_winners_combination_of_system_knobs(stored_study, monkeypatch):
    study = study_with_winner(stored_study)
    lines: list[str] = []
    outcome = confirm(study, "fastest", rounds=1, progress=lines.append, parity_steps=3)
    combo = outcome["parity"]
    assert combo["trial"] == 1 and combo["verdict"] == "ok"
    assert sorted(combo["knobs"]) == SYSTEM  # the method knob (local crops) stays as the winner has it
    assert study.user_attrs["confirm_parity"]["verdict"] == "ok"
    assert lines[-1] == (f"quality: parity ok for {', '.join(SYSTEM)}; unmeasured at this budget (method changes: crops.local_crops)")

    monkeypatch.setenv("TRAINER_INJECT_FAULT", "mathbug:system.channels_last")
    outcome = confirm(study, "fastest", rounds=1, progress=lambda _: None, parity_steps=3)
    assert outcome["parity"]["verdict"] == "failed"
    quality = verdict(study, study.trials[1])
    assert quality.failed and "combination" in quality.parity_failed
    assert any("trial 1's combination: parity FAILED" in w for w in summarize(study).warnings)


def test_explain_stores_the_round_off_reference_and_bands_its_verdicts_used(stored_study):
    study = study_with_winner(stored_study)
    explain(study, rounds=1, echo=lambda _: None, measure=fake_measure, parity_steps=2)
    stored = optuna.load_study(study_name="verdicts", storage=study._storage).user_attrs["parity_tolerances"]
    assert stored["steps"] == 2 and stored["bands"] == {}  # no approximate knob on this path
    assert set(stored["round_off_reference"]) == {"loss", "grad_norm", "param_grad_norms", "weights", "buffers", "outputs"}
    assert len(stored["round_off_reference"]["loss"]) == 2 and max(stored["round_off_reference"]["param_grad_norms"]) > 0
