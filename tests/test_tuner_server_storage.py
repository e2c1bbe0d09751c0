"""Studies on a PostgreSQL server (a throwaway one: `postgres_server` in tests/conftest.py) and several
drivers at once on one study: two `tuner run` processes on PostgreSQL and on a journal file, and one of
them killed mid-trial. Real processes, a real Ray and a real database throughout."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

GRID = [0, 1, 3, 4]  # crops.local_crops: four grid points, none of them the baseline's 2


@functools.lru_cache(maxsize=None)
def _storage(url: str):
    from tuner.study import storage_for

    return storage_for(url)  # one per URL: each holds a pool of connections to the server


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(url))


def _tables(url: str) -> list[str]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        return [row[0] for row in cur.fetchall()]


def test_a_study_runs_on_postgresql_and_continues(ray_session, tiny_space, tmp_path, monkeypatch, capsys, postgres_url):
    from tuner import run
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "pg", budget={"n_trials": 3})
    summary = run(path, storage=postgres_url, progress=None, confirm_rounds=0)
    assert summary.states == {"COMPLETE": 3}
    study = _load(postgres_url, "pg")
    roles = [t.user_attrs["role"] for t in study.trials]
    assert roles == ["baseline", "baseline_noise", "search"]
    assert [t.user_attrs["seed"] for t in study.trials[:2]] == [0, 1]
    attrs = study.user_attrs
    assert attrs["baseline_trial"] == 0 and attrs["space_fingerprint"] and attrs["hardware"]["cpu_cores"] >= 1
    assert attrs["knn_noise_points"] == pytest.approx(abs(study.trials[0].values[1] - study.trials[1].values[1]))
    assert study.trials[0].user_attrs["speedup"] == pytest.approx(1.0) and "speedup" in study.trials[2].user_attrs
    assert not (tmp_path / "studies" / "pg.db").exists()  # nothing went to the default SQLite file
    assert main(["status", postgres_url]) == 0
    assert "trials: 3 COMPLETE" in capsys.readouterr().out
    target = tmp_path / "base.yaml"
    assert main(["export", postgres_url, "--pick", "trial:0", "-o", str(target)]) == 0
    assert "speedup x1.00" in target.read_text()
    kept = {t.number: (t.datetime_start, t.values) for t in study.trials}
    again = run(path, storage=postgres_url, n_trials=4, progress=None, confirm_rounds=0)
    assert again.states == {"COMPLETE": 4}
    study = _load(postgres_url, "pg")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {n: (study.trials[n].datetime_start, study.trials[n].values) for n in kept} == kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["refused", "password", "driver"])
def test_a_database_that_cannot_be_used_is_one_line_and_changes_nothing(case, tiny_space, tmp_path, monkeypatch,
                                                                          capsys, request):
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "bad")
    if case == "refused":  # a port with nothing listening
        url, expected = f"postgresql://tuner:secret@127.0.0.1:{_free_port()}/tuner", "Connection refused"
    else:
        good = request.getfixturevalue("postgres_url")
        if case == "password":
            url, expected = good.replace(":tuner-test-pw@", ":wrong@"), 'password authentication failed for user "tuner"'
        else:  # the driver package missing, as on a machine without it
            from sqlalchemy.engine import make_url

            driver = make_url(good).get_dialect().driver  # psycopg with SQLAlchemy 2.1, psycopg2 with 2.0
            monkeypatch.setitem(sys.modules, driver, None)
            url, expected = good, f"its database driver {driver} is not installed; pip install"
    for argv in (["run", str(path), "--storage", url, "--confirm-rounds", "0"], ["status", url]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: postgresql://tuner:***@127.0.0.1:") and expected in err[0]
        assert "secret" not in err[0] and "tuner-test-pw" not in err[0]
    if case == "driver":
        monkeypatch.delitem(sys.modules, driver)
    if case != "refused":
        assert _tables(good) == []  # no study, not even Optuna's tables
    assert not (tmp_path / "studies").exists()


def _start_driver(path: Path, url: str, address: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "tuner.cli", "run", str(path), "--storage", url, "--address",
                                 address, "--confirm-rounds", "0"], cwd=path.parent, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _two_driver_space(tiny_space, folder: Path, name: str) -> Path:
    # one CPU per trial and one trial at a time per driver, so each driver's trial runs beside the other's
    # on the session's 2-CPU Ray
    return tiny_space(folder, name, params={"crops.local_crops": {"choices": GRID}}, sampler={"name": "grid"},
                      budget={"n_trials": 2 + len(GRID)}, ray={"torch_threads": 1, "resources_per_trial": {"cpu": 1},
                                                                "max_concurrent_trials": 1})


def _table(study: optuna.Study) -> str:
    """One line per trial (shown for a failing test, and with pytest -rP)."""
    return "\n".join(f"#{t.number} {t.state.name} {t.user_attrs.get('role')} seed={t.user_attrs.get('seed')} "
                     f"{t.params} driver={t.user_attrs.get('driver')} fail={t.user_attrs.get('fail_reason')} "
                     f"rerun_of={t.user_attrs.get('rerun_of')}" for t in study.trials)


def _check_one_study(study: optuna.Study) -> list:
    """What two drivers must leave: the baseline once at each seed, trial numbers 0..n-1, every grid point
    measured once, nothing RUNNING or WAITING; returns the trials that count."""
    print(_table(study))
    trials = study.trials
    assert [t.number for t in trials] == list(range(len(trials)))
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    counted = [t for t in trials if t.user_attrs.get("fail_reason") != "interrupted"]
    assert all(t.state == TrialState.COMPLETE for t in counted), [(t.number, t.state, t.user_attrs.get("fail_reason"))
                                                                   for t in counted]
    roles = Counter(t.user_attrs["role"] for t in counted)
    assert roles == {"baseline": 1, "baseline_noise": 1, "search": len(GRID)}
    assert sorted(t.user_attrs["seed"] for t in counted if t.user_attrs["role"] != "search") == [0, 1]
    assert sorted(t.params["crops.local_crops"] for t in counted if t.user_attrs["role"] == "search") == GRID
    first_search = min(t.datetime_start for t in counted if t.user_attrs["role"] == "search")
    assert all(t.datetime_complete <= first_search for t in counted if t.user_attrs["role"] != "search"), \
        "a search trial started before the baseline's seeds were measured"
    assert study.user_attrs["knn_noise_points"] is not None and len(study.user_attrs["baseline_knn_seeds"]) == 2
    # every trial has a speedup; a baseline seed that finished before the baseline trial (in the other driver)
    # could not store one, and gets it computed against the same baseline when read
    from tuner.summary import speedup_of

    base = study.user_attrs["baseline_throughput_img_s"]
    assert all(speedup_of(study, t) == pytest.approx(t.user_attrs.get("speedup") or t.values[0] / base) for t in counted)
    return counted


def _storage_url(kind: str, tmp_path: Path, request) -> str:
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"journal:///{tmp_path}/studies/duo.log"


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_two_drivers_at_once_share_one_study(kind, ray_session, tiny_space, tmp_path, request):
    path = _two_driver_space(tiny_space, tmp_path, "duo")
    url = _storage_url(kind, tmp_path, request)
    address = ray_session.get_runtime_context().gcs_address
    drivers = [_start_driver(path, url, address, tmp_path / f"driver{i}.log") for i in range(2)]
    for i, driver in enumerate(drivers):
        assert driver.wait(600) == 0, (tmp_path / f"driver{i}.log").read_text()[-3000:]
    study = _load(url, "duo")
    counted = _check_one_study(study)
    assert len(study.trials) == len(counted) == 2 + len(GRID)  # nothing interrupted, nothing extra
    owners = Counter(t.user_attrs["driver"].rpartition(":")[2] for t in counted)
    assert set(owners) == {str(d.pid) for d in drivers}, f"both drivers ran trials: {owners}"


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_a_killed_driver_loses_nothing_the_other_finished(kind, ray_session, tiny_space, tmp_path, request):
    from tuner import run

    path = _two_driver_space(tiny_space, tmp_path, "duo")
    url = _storage_url(kind, tmp_path, request)
    address = ray_session.get_runtime_context().gcs_address
    survivor, victim = (_start_driver(path, url, address, tmp_path / f"{n}.log") for n in ("survivor", "victim"))
    deadline, mine = time.monotonic() + 300, []
    while time.monotonic() < deadline and victim.poll() is None and not mine:
        time.sleep(0.5)
        try:
            study = _load(url, "duo")
        except (KeyError, ValueError):  # not created yet
            continue
        mine = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.user_attrs.get("role") == "search"
                and t.user_attrs.get("driver", "").endswith(f":{victim.pid}")]
        if mine:
            os.kill(victim.pid, signal.SIGKILL)  # at once: the trial is still running
            victim.wait()
    assert mine, f"the victim never ran a search trial (exit {victim.poll()}):\n{(tmp_path / 'victim.log').read_text()[-3000:]}"
    lost = mine[0].number
    finished_before = {t.number: t.values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert _load(url, "duo").trials[lost].state != TrialState.COMPLETE, "the trial finished before the kill"
    assert survivor.wait(600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    lines: list[str] = []
    run(path, storage=url, progress=lines.append, confirm_rounds=0)  # a driver runs again
    print(f"victim pid {victim.pid}, its trial #{lost}; survivor pid {survivor.pid}:",
          *[line for line in (tmp_path / "survivor.log").read_text().splitlines() if "gone" in line], *lines, sep="\n")
    study = _load(url, "duo")
    assert {n: study.trials[n].values for n in finished_before} == finished_before  # still COMPLETE, unchanged
    assert study.trials[lost].state == TrialState.FAIL and study.trials[lost].user_attrs["fail_reason"] == "interrupted"
    reruns = [t for t in study.trials if t.user_attrs.get("rerun_of") == lost]
    assert len(reruns) == 1 and reruns[0].state == TrialState.COMPLETE and reruns[0].params == study.trials[lost].params
    counted = _check_one_study(study)
    assert len(counted) == 2 + len(GRID) and len(study.trials) == len(counted) + 1


def _open_study_at_once(space_path: str, url: str, barrier, errors) -> None:
    from tuner.space import SearchSpace
    from tuner.study import open_study

    space = SearchSpace.load(space_path)
    barrier.wait()
    try:
        open_study(space, url)
    except Exception as exc:  # noqa: BLE001 - the test reports what failed
        errors.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_drivers_starting_at_once_create_one_study_with_one_baseline(kind, tiny_space, tmp_path, request):
    """Four drivers open a new study at the same moment: one creates it and enqueues the baseline, the others load it."""
    import multiprocessing as mp

    path = tiny_space(tmp_path, "race")
    url = _storage_url(kind, tmp_path, request)
    ctx = mp.get_context("spawn")
    errors, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_open_study_at_once, args=(str(path), url, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == [] and [p.exitcode for p in procs] == [0, 0, 0, 0]
    study = _load(url, "race")
    assert [(t.state, t.user_attrs["role"], t.user_attrs["seed"]) for t in study.trials] == \
        [(TrialState.WAITING, "baseline", 0), (TrialState.WAITING, "baseline_noise", 1)]
    assert study.user_attrs["space_fingerprint"]
