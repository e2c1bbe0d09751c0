"""Shared fixtures: one local Ray for the whole test session (temporary folders, never the home folder),
and tiny search spaces for the tuner tests (synthetic data, a width-8 ResNet-18, a few steps)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml

TINY_BASE = {
    "data.dataset": "synthetic", "data.synthetic_size": 64, "data.image_size": 16,
    "crops.global_size": 16, "crops.local_size": 8, "model.width": 8,
    "model.head.out_dim": 64, "model.head.hidden_dim": 64, "model.head.bottleneck_dim": 32,
    "optim.batch_size": 16, "budget.steps": 4, "measure.warmup_steps": 1, "measure.window_steps": 1,
    "measure.windows": 2, "measure.profile_steps": 1, "eval.every_steps": 0,
}
TINY_TRIAL = {"warmup_steps": 1, "window_steps": 2, "windows": 2, "steps": 8, "eval_every_steps": 4, "timeout_s": 120}


def write_tiny_space(folder: Path, space_name: str, **sections) -> Path:
    """Write a space with the tiny base and trial budget; `sections` replace top-level keys (`trial` is merged)."""
    trial = {**TINY_TRIAL, **sections.pop("trial", {})}
    data = {
        "name": space_name,
        "base": {"overrides": dict(TINY_BASE)},
        "baseline": {"crops.local_crops": 2, "model.head.out_dim": 64},
        "params": {"crops.local_crops": {"choices": [0, 2]}},
        "trial": trial,
        "budget": {"n_trials": 3},
        "sampler": {"name": "random", "seed": 0},
        "ray": {"torch_threads": 1},  # the test machine is shared; 2 spinning OpenMP threads crawl
        **sections,
    }
    path = Path(folder) / f"{space_name}.yaml"
    path.write_text("# test space\n" + yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def warm_start_cache(tmp_path_factory):
    """The built-in warm start's cache (`model.init: supervised`) in a temporary folder, never the home folder;
    subprocesses (Ray's trial workers, CLI runs) inherit it."""
    folder = tmp_path_factory.mktemp("warm_start_cache")
    old = os.environ.get("TRAINER_CACHE")
    os.environ["TRAINER_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TRAINER_CACHE", None)
    else:
        os.environ["TRAINER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_space():
    """The `write_tiny_space(folder, name, **sections)` helper."""
    return write_tiny_space


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, no dashboard, its files in a temporary folder; shut down at the end."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (initdb + pg_ctl in a temporary folder, its own free port on
    127.0.0.1, password login): yields the URL of its `tuner` database; stopped and removed at the end. Run as the
    `postgres` user when the tests run as root (initdb refuses root). Skips when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    if not found:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                    ".ci/run installs Debian's postgresql when run as root")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (it is in the dev extra)")
    bindir = Path(found[-1]).parent
    as_user: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="pg-tests-", dir="/tmp"))
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(tmp)
            pytest.skip("running as root and there is no 'postgres' user to run the test server as")
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    password = "tuner-test-pw"
    pwfile = tmp / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    with socket.socket() as s:  # a free port; never the system server's 5432
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = tmp / "data", tmp / "server.log"

    def sh(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True)
        if done.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")

    sh(str(bindir / "initdb"), "-D", str(data), "-U", "tuner", "--auth=scram-sha-256", f"--pwfile={pwfile}",
       "-E", "UTF8", "--no-instructions")
    options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={tmp} -c fsync=off "
               "-c max_connections=100 -c shared_buffers=16MB")
    sh(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
    try:
        _create_database(f"postgresql://tuner:{password}@127.0.0.1:{port}/postgres", "tuner")
        yield f"postgresql://tuner:{password}@127.0.0.1:{port}/tuner"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _create_database(admin_url: str, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


_DATABASES = itertools.count()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A new, empty database on the session's PostgreSQL server, for this test: its URL."""
    import re

    name = f"t{next(_DATABASES)}_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    _create_database(postgres_server, name)
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"


FAULTS = ["none", "oom@2", "nan@2", "kill@2"]


@pytest.fixture(scope="session")
def fault_study(ray_session, tmp_path_factory):
    """One real study for the whole session: the baseline at two seeds, then one trial per injected fault
    (TRAINER_INJECT_FAULT none / oom / nan / kill) with a quality pruner that prunes every search trial whose
    kNN is below 101. Yields (folder, summary, progress lines); the database is folder/studies/faults.db."""
    from tuner import run

    folder = tmp_path_factory.mktemp("faults")
    old = os.getcwd()
    os.chdir(folder)  # the space's storage and Ray's files are relative: studies/...
    try:
        path = write_tiny_space(folder, "faults", params={"env.TRAINER_INJECT_FAULT": {"choices": FAULTS}},
                                sampler={"name": "grid"}, budget={"n_trials": 6},
                                pruner={"quality": {"name": "ThresholdPruner", "args": {"lower": 101}}})
        lines: list[str] = []
        summary = run(path, progress=lines.append)
    finally:
        os.chdir(old)
    yield folder, summary, lines


class StoredStudy:
    """A study written the way the tuner stores it (ask/tell into a SQLite file), without Ray or training.

    For pages and commands that only read a study: the attribute names are the searcher's.
    """

    HARDWARE = {"device": "cpu", "gpu_count": 0, "cpu_model": "Test CPU", "cpu_cores": 2, "torch": "2.x",
                "cuda": None, "host": "test"}

    def __init__(self, folder: Path, name: str, hardware: dict | None = None, trial_overrides: dict | None = None,
                 knn_tolerance: float = 1.0, choices: dict[str, list] | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = f"sqlite:///{Path(folder) / name}.db"
        self.study = optuna.create_study(study_name=name, storage=self.url, directions=["maximize", "maximize"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names(["throughput_img_s", "knn_top1"])
        self.study.set_user_attr("hardware", dict(hardware or self.HARDWARE))
        self.study.set_user_attr("knn_tolerance_points", knn_tolerance)
        self.study.set_user_attr("trial_overrides", trial_overrides or {})
        self.tolerance, self.choices = knn_tolerance, choices or {}  # a knob's choices (default: its one value)

    def add(self, role: str = "search", config: dict | None = None, params: dict | None = None,
            throughput: float | None = None, knn: float | None = None, fail_reason: str | None = None,
            pruned: str | None = None, attrs: dict | None = None) -> int:
        """One finished trial: COMPLETE with (throughput, kNN), FAIL with `fail_reason`, or PRUNED with reason `pruned`."""
        from optuna.trial import TrialState

        from trainer.events import PHASES

        study = self.study
        trial = study.ask()
        for key, value in (params or {}).items():
            trial.suggest_categorical(key, self.choices.get(key, [value]))
        trial.set_user_attr("role", role)
        extra = dict(attrs or {})  # the caller's attributes win over the defaults below
        for key, value in extra.items():
            trial.set_user_attr(key, value)
        if config is not None:
            trial.set_user_attr("config", config)
        if fail_reason is not None:
            trial.set_user_attr("fail_reason", fail_reason)
            trial.set_user_attr("fail_message", f"injected: {fail_reason}")
            study.tell(trial, state=TrialState.FAIL)
        elif pruned is not None:
            trial.set_user_attr("pruned_phase", "quality")
            trial.set_user_attr("prune_reason", pruned)
            trial.set_user_attr("intermediate_values", {"speed": {"0": throughput}, "quality": {"4": knn}})
            study.tell(trial, state=TrialState.PRUNED)
        else:
            base_tp = study.user_attrs.get("baseline_throughput_img_s") or throughput
            base_knn = study.user_attrs.get("baseline_knn_top1", knn)
            attrs = {"throughput_img_s": throughput, "knn_top1": knn, "speedup": throughput / base_tp,
                     "phases_ms": {p: 1.0 + i for i, p in enumerate(PHASES)}, "peak_memory_mb": 100.0,
                     "hardware": study.user_attrs["hardware"]}
            if role == "search" and base_knn is not None:
                attrs["knn_delta_points"] = knn - base_knn
            attrs.update(extra)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trial.set_constraint("knn_points", -self.tolerance if role != "search" else (base_knn - self.tolerance) - knn)
            trial.set_constraint("memory", -1.0)
            study.tell(trial, [throughput, knn])
            if role == "baseline":
                for key, value in {"baseline_trial": trial.number, "baseline_throughput_img_s": throughput,
                                   "baseline_knn_top1": knn, "knn_noise_points": None,
                                   "knn_tolerance_effective": self.tolerance}.items():
                    study.set_user_attr(key, value)
        return trial.number


@pytest.fixture
def stored_study(tmp_path):
    """`stored_study(name, **kwargs)`: a `StoredStudy` in this test's temporary folder."""
    return lambda name, **kwargs: StoredStudy(tmp_path, name, **kwargs)
