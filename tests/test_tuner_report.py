"""`tuner report`: the HTML page of a real small study (with pruned and failed trials), read back figure by figure.

The figures are checked from the page itself: each `Plotly.newPlot("figN", data, layout, config)` call is
parsed and its traces compared with the study as plain `optuna.load_study` returns it. A headless Chromium
then opens the page from disk and checks that every figure rendered, with no console errors and no network.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

NEWPLOT = re.compile(r'Plotly\.newPlot\(\s*"(fig\d+)",\s*')


def figures(page: str) -> dict[str, tuple[list[dict], dict]]:
    """{div id: (traces, layout)} of every `Plotly.newPlot("figN", data, layout, config)` call in the page."""
    decoder, out = json.JSONDecoder(), {}
    for m in NEWPLOT.finditer(page):
        data, end = decoder.raw_decode(page, m.end())
        comma = re.compile(r"\s*,\s*").match(page, end)
        layout, _ = decoder.raw_decode(page, comma.end())
        out[m.group(1)] = (data, layout)
    return out


def values(v) -> list:
    """A trace's data array, whether plotly wrote it as a list or as typed base64 (`bdata`)."""
    if isinstance(v, dict) and "bdata" in v:
        import numpy as np

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


def title_of(layout: dict) -> str:
    title = layout.get("title") or {}
    return title.get("text", "") if isinstance(title, dict) else str(title)


def by_title(figs, start: str) -> list[dict]:
    found = [data for data, layout in figs.values() if title_of(layout).startswith(start)]
    assert len(found) == 1, f"one figure titled {start!r}; titles: {[title_of(l) for _, l in figs.values()]}"
    return found[0]


def expected_groups(study: optuna.Study) -> dict[str, set[int]]:
    """Trial numbers per Pareto-plot group, from plain Optuna states, values, constraints and attributes."""
    trials = study.trials
    groups = {"pruned": set(), "failed": set(), "Pareto set": set(), "feasible": set(), "infeasible": set()}
    measured = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("fail_reason")]
    feasible = [t for t in measured if all(v <= 0 for v in t.constraints.values())]
    # The baseline's noise replicate (its config at another seed) is drawn as feasible, never as a candidate.
    candidates = [t for t in feasible if t.user_attrs.get("role") != "baseline_noise"]
    for t in trials:
        if t.state == TrialState.PRUNED:
            groups["pruned"].add(t.number)
        elif t.state == TrialState.FAIL or t.user_attrs.get("fail_reason"):
            groups["failed"].add(t.number)
    for t in measured:
        dominated = any(o.values[0] >= t.values[0] and o.values[1] >= t.values[1] and o.values != t.values for o in candidates)
        group = "infeasible" if t not in feasible else "feasible" if dominated or t not in candidates else "Pareto set"
        groups[group].add(t.number)
    return groups


TRACE_GROUP = {"feasible": "feasible", "infeasible (constraint)": "infeasible", "Pareto set": "Pareto set",
               "pruned (last measured values)": "pruned", "failed (no values; on the strip)": "failed"}


def assert_offline(page: str) -> None:
    """No script, stylesheet, image or link that would fetch anything over the network."""
    markup = re.sub(r"(<script[^>]*>).*?(</script>)", r"\1\2", page, flags=re.S)  # the inlined plotly.js aside
    assert not re.search(r"<script[^>]*\bsrc\s*=", markup, re.I), "an external <script src=...>"
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", markup, re.I), "a network src/href"
    assert not re.search(r"@import|url\(\s*[\"']?\s*(?:https?:)?//", markup, re.I), "a CSS network reference"
    assert not re.search(r"<link\b", markup, re.I)


@pytest.fixture(scope="module")
def fault_report(fault_study, tmp_path_factory):
    """The fault study's page, written by `write_report`, and the study as plain Optuna reads it."""
    from tuner.report import write_report
    from tuner.study import load

    folder, _, _ = fault_study
    url = f"sqlite:///{folder}/studies/faults.db"
    out = write_report([load(url)], tmp_path_factory.mktemp("report") / "report.html")
    return out, out.read_text(), optuna.load_study(study_name="faults", storage=url), url


def test_the_study_stores_every_attribute_the_report_reads(fault_study):
    folder, _, _ = fault_study
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{folder}/studies/faults.db")
    attrs = study.user_attrs
    assert attrs["baseline_trial"] == 0 and study.trials[0].user_attrs["role"] == "baseline"
    assert attrs["knn_tolerance_effective"] >= 0 and attrs["baseline_knn_top1"] == pytest.approx(
        sum(t.values[1] for t in study.trials[:2]) / 2)
    assert {"device", "cpu_model", "cpu_cores", "torch"} <= set(attrs["hardware"])
    assert Counter(t.state.name for t in study.trials) == {"COMPLETE": 4, "FAIL": 1, "PRUNED": 1}
    for t in study.trials:
        u = t.user_attrs
        assert u["config"]["model"]["width"] == 8, "every trial stores its full config"
        if t.state == TrialState.COMPLETE and not u.get("fail_reason"):
            assert u["throughput_img_s"] == t.values[0] > 0 and u["knn_top1"] == t.values[1]
            assert u["speedup"] == pytest.approx(t.values[0] / study.trials[0].values[0])
            assert set(u["phases_ms"]) >= {"data", "backward"} and u["peak_memory_mb"] > 0
            # the collapse monitor travels with the trial: view agreement and the teacher's entropy
            assert -1 <= u["view_agreement_initial"] <= 1 and -1 <= u["view_agreement"] <= 1
            assert u["max_entropy"] == pytest.approx(math.log(u["config"]["model"]["head"]["out_dim"]))
            assert 0 < u["teacher_entropy"] <= u["max_entropy"] + 1e-6
        elif t.state == TrialState.PRUNED:
            assert u["prune_reason"] and u["pruned_phase"] == "quality"
            assert u["intermediate_values"]["speed"], "the last measured values a pruned trial is drawn at"
        else:
            assert u["fail_reason"] in ("oom", "nan", "killed")


def test_pareto_plot_has_one_trace_per_trial_kind_with_the_right_trials(fault_report):
    out, page, study, _ = fault_report
    figs = figures(page)
    traces = by_title(figs, "Throughput against kNN top-1")
    expected = {k: v for k, v in expected_groups(study).items() if v}
    assert expected["pruned"] and expected["failed"] and expected["Pareto set"], "the study has every kind"
    got = {}
    for tr in traces:
        numbers = values(tr["customdata"])
        assert len(values(tr["x"])) == len(values(tr["y"])) == len(numbers), tr["name"]
        if tr["name"] in TRACE_GROUP:
            got[TRACE_GROUP[tr["name"]]] = set(numbers)
    assert got == expected
    marks = {tr["name"]: values(tr["customdata"]) for tr in traces if tr["name"] in ("baseline", "winner")}
    feasible = [t for t in study.trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("fail_reason")
                and all(v <= 0 for v in t.constraints.values()) and t.user_attrs.get("role") != "baseline_noise"]
    assert marks == {"baseline": [study.user_attrs["baseline_trial"]], "winner": [max(feasible, key=lambda t: t.values[0]).number]}
    # failed trials have no values: they sit on a strip below every measured point
    failed = next(tr for tr in traces if tr["name"].startswith("failed"))
    measured_y = [v for tr in traces if tr["name"] in ("feasible", "Pareto set") for v in values(tr["y"])]
    assert max(values(failed["y"])) < min(measured_y)


def test_page_is_self_contained_and_has_every_section(fault_report):
    from plotly.offline import get_plotlyjs

    out, page, study, _ = fault_report
    assert_offline(page)
    assert page.count(get_plotlyjs()[:300]) == 1, "plotly.js is inlined exactly once"
    figs = figures(page)
    assert len(figs) == page.count('class="plotly-graph-div"') == 5  # Pareto, phases, batch, 2 histories
    phases = by_title(figs, "Where the time goes")
    assert {tr["name"] for tr in phases} >= {"data", "backward", "optimizer"} and values(phases[0]["x"])[0] == "baseline #0"
    batch = by_title(figs, "Batch size, precision and memory")
    assert {tr["name"] for tr in batch} == {"fp32", "fp32 out of memory"}
    history = by_title(figs, "optimization history: throughput")
    # trial numbers on the history axis are the study's (the out-of-memory trial in between keeps its number)
    pruned = next(t.number for t in study.trials if t.state == TrialState.PRUNED)
    assert [values(tr["x"]) for tr in history if tr["name"] == "pruned (last value)"] == [[pruned]]
    assert "tuner explain faults" in page and "Not measured yet" in page  # no explain stored yet
    for text in ("4 complete", "1 oom, 1 killed, 1 nan", "nan: loss is nan (step 2)", "ThresholdPruner", "Hardware: device: cpu"):
        assert text in page
    assert "not drawn: no searched parameter" in page  # the complete trials are the baseline's: no empty figures
    assert "Only the baseline has been measured yet" in page  # the out-of-memory trial measured nothing


def test_cli_report_writes_the_same_figures(fault_report, tmp_path, capsys):
    from tuner.cli import main

    _, page, _, url = fault_report
    target = tmp_path / "cli" / "report.html"
    assert main(["report", url, "-o", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    cli_page = target.read_text()
    assert_offline(cli_page)
    strip = lambda figs: {k: [(tr.get("name"), tr.get("customdata")) for tr in d] for k, (d, _) in figs.items()}  # noqa: E731
    assert strip(figures(cli_page)) == strip(figures(page))


def test_report_in_a_headless_browser(fault_report, tmp_path):
    """Chromium opens the page from disk: every figure draws, the console has no errors, nothing is fetched."""
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"chromium/chromedriver not installed: chromium={chromium}, chromedriver={driver_path}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError as exc:
        pytest.skip(f"chromium/chromedriver not installed: selenium missing ({exc})")

    out, page, _, _ = fault_report
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1300,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(out.resolve().as_uri())
        divs = driver.find_elements(By.CSS_SELECTOR, "div.plotly-graph-div")
        assert len(divs) == len(figures(page)) == 5
        WebDriverWait(driver, 30).until(lambda d: all(div.find_elements(By.CSS_SELECTOR, ".main-svg") for div in divs))
        empty = [div.get_attribute("id") for div in divs if not div.find_elements(By.CSS_SELECTOR, ".main-svg")]
        assert not empty, f"figures that did not render: {empty}"
        points = driver.execute_script("return document.querySelectorAll('#fig1 .scatterlayer .point').length")
        assert points >= 6, "the Pareto plot draws a point per trial (and the baseline and winner marks)"
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [u for u in fetched if not u.startswith(("file:", "data:", "blob:"))] == []
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1300, min(height + 100, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
    assert shot.exists() and shot.stat().st_size > 10_000


# ---- studies built with ask/tell: edge cases, --watch, comparison ------------------------------------


def tiny_config(**overrides) -> dict:
    from conftest import TINY_BASE

    from trainer.config import TrainConfig

    return TrainConfig().with_overrides({**TINY_BASE, **overrides}).to_dict()


def test_baseline_only_study_says_so(stored_study, tmp_path):
    from tuner.report import write_report

    s = stored_study("lonely")
    s.add("baseline", tiny_config(), throughput=500.0, knn=30.0)
    page = write_report([s.study], tmp_path / "lonely.html").read_text()
    assert "Only the baseline has been measured yet" in page and "needs at least two complete trials" in page
    traces = by_title(figures(page), "Throughput against kNN top-1")
    assert {tr["name"]: values(tr["customdata"]) for tr in traces} == {"Pareto set": [0], "baseline": [0], "winner": [0]}
    assert_offline(page)


@pytest.mark.parametrize("trials", [["nan", "killed"], []], ids=["only-failed", "no-trials"])
def test_study_without_a_completed_trial_says_so(stored_study, tmp_path, trials):
    from tuner.report import write_report

    s = stored_study("broken")
    for i, reason in enumerate(trials):
        s.add("baseline" if i == 0 else "search", tiny_config(), fail_reason=reason)
    page = write_report([s.study], tmp_path / "broken.html").read_text()
    assert "No trial of this study has completed yet" in page and "no baseline yet" in page
    assert (f"{len(trials)} fail" if trials else "no trials") in page
    traces = by_title(figures(page), "Throughput against kNN top-1")
    assert [(tr["name"], values(tr["customdata"])) for tr in traces] == (
        [("failed (no values; on the strip)", list(range(len(trials))))] if trials else [])


def test_watch_rewrites_the_page_with_a_meta_refresh(stored_study, tmp_path):
    from tuner.report import watch

    s = stored_study("live")
    s.add("baseline", tiny_config(), throughput=500.0, knn=30.0)
    calls, lines, out = [], [], tmp_path / "live.html"

    def load():
        calls.append(out.read_text() if out.exists() else None)
        if len(calls) == 2:  # the study moves on between two rewrites
            s.add("search", tiny_config(**{"crops.local_crops": 0}), throughput=900.0, knn=29.5)
        return [optuna.load_study(study_name="live", storage=s.url)]

    watch(load, out, every_s=0.05, echo=lines.append, max_rounds=2)
    assert len(calls) == 2 and calls[0] is None and "1 complete" in calls[1]
    page = out.read_text()
    assert re.search(r'<meta http-equiv="refresh" content="1">', page), "reloads itself, never faster than 1 s"
    assert "2 complete" in page and len(lines) == 2 and all("report written" in line for line in lines)
    assert not list(tmp_path.glob("*.tmp")), "written atomically"


def test_comparison_overlays_studies_with_their_hardware(stored_study, fault_report, tmp_path, capsys):
    from tuner.cli import main

    _, _, faults, faults_url = fault_report
    gpu = {"device": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "cpu_model": "AMD EPYC 9454", "cpu_cores": 16}
    s = stored_study("h100", hardware=gpu)
    s.add("baseline", tiny_config(), throughput=5000.0, knn=30.0)
    s.add("search", tiny_config(**{"crops.local_crops": 0}), throughput=9000.0, knn=29.5)
    target = tmp_path / "compare.html"
    assert main(["report", faults_url, s.url, "-o", str(target)]) == 0
    page = target.read_text()
    assert_offline(page)
    figs = figures(page)
    assert len(figs) == 1, "one Pareto plot for all studies"
    traces = next(iter(figs.values()))[0]
    names = [tr["name"] for tr in traces]
    cpu = faults.user_attrs["hardware"]
    local = [n for n in names if n.startswith("faults (")]
    remote = [n for n in names if n.startswith("h100 (")]
    assert len(local) + len(remote) == len(names) and local and remote
    assert all(cpu["device"] in n and cpu["cpu_model"] in n and f"{cpu['cpu_cores']} cores" in n for n in local)
    assert all("NVIDIA H100 80GB HBM3 / AMD EPYC 9454 / 16 cores" in n for n in remote)
    assert {n.split(": ", 1)[1] for n in remote} == {"Pareto set", "baseline", "winner"}
    winner = next(tr for tr in traces if tr["name"].startswith("h100") and tr["name"].endswith("winner"))
    assert values(winner["customdata"]) == [1]
