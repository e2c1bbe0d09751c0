"""A real Ray cluster of several nodes (Ray's own `cluster_utils.Cluster`: real raylets, one machine):
trials spread over the nodes, one per node, each stored with its node."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import optuna
import pytest
from optuna.trial import TrialState


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head node with no CPUs (the driver's) and two worker nodes with one CPU each."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-cl-", dir="/tmp")  # short: Ray's socket paths have a length limit
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, {w.node_id for w in workers}, cluster.head_node.node_id
    cluster.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_study_on_a_two_node_cluster_runs_one_trial_per_node_and_stores_each_trial_s_node(two_node_cluster, tiny_space,
                                                                                            tmp_path):
    cluster, worker_ids, head_id = two_node_cluster
    path = tiny_space(tmp_path, "cluster", params={"crops.local_crops": {"choices": [0, 2]},
                                                   "model.head.out_dim": {"choices": [32, 64]}},
                      constraints={"knn_noise_seeds": 2}, budget={"n_trials": 6},
                      ray={"torch_threads": 1, "storage_path": "shared-results"})
    driver = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(path), "--address", cluster.address,
                             "--confirm-rounds", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert "{'cpu': 1} per trial, 2 at a time" in driver.stdout  # one trial per node, all of its CPUs
    study = optuna.load_study(study_name="cluster", storage=f"sqlite:///{tmp_path}/studies/cluster.db")
    assert len(study.trials) == 6 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    nodes = [t.user_attrs.get("node_id") for t in study.trials]
    assert set(nodes) <= worker_ids and head_id not in nodes  # the driver's node (no CPUs) ran none itself
    assert len(set(nodes)) == 2  # both worker nodes ran trials
    assert all(t.user_attrs.get("node_ip") for t in study.trials)
    assert [p.name[:4] for p in (tmp_path / "shared-results").iterdir()] == ["run-"]  # ray.storage_path
    lines = [line for line in driver.stdout.splitlines() if line.startswith("trial ")]
    assert len(lines) == 6 and all(" on node " in line for line in lines)
    assert "measuring the baseline" not in driver.stdout  # one kind of hardware: its baseline trial is the reference
    status = subprocess.run([sys.executable, "-m", "tuner.cli", "status", "cluster"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    per_node = [line for line in status.stdout.splitlines() if line.startswith("trials per node: ")]
    assert len(per_node) == 1 and sum(int(part.rsplit(" ", 1)[1]) for part in per_node[0][17:].split(", ")) == 6


def test_resources_no_node_has_are_refused_in_one_line_naming_what_the_cluster_has(two_node_cluster, tiny_space,
                                                                                  tmp_path):
    cluster, _, _ = two_node_cluster
    path = tiny_space(tmp_path, "toobig", ray={"resources_per_trial": {"cpu": 4}})
    driver = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(path), "--address", cluster.address],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 2
    err = driver.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "toobig.yaml: ray.resources_per_trial (cpu 4): no node has that (the nodes have: CPU 1; CPU 1; no CPU)")
    assert not (tmp_path / "studies" / "toobig.db").exists()


def test_an_unreachable_address_is_one_line_and_leaves_no_study(tiny_space, tmp_path):
    path = tiny_space(tmp_path, "nowhere")
    driver = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(path), "--address", "127.0.0.1:1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert driver.returncode == 2
    err = driver.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --address 127.0.0.1:1: no Ray cluster could be joined there")
    assert not (tmp_path / "studies" / "nowhere.db").exists()


def _stored_tiny_study(stored_study, tmp_path, tiny_space, hardware, search_hardware=None):
    from tuner.searcher import trial_config
    from tuner.space import SearchSpace
    from tuner.study import baseline_params

    space = SearchSpace.load(tiny_space(tmp_path, "remote", params={"crops.local_crops": {"choices": [0, 2]}}))
    s = stored_study("remote", hardware=hardware, trial_overrides=space.trial.overrides(),
                     choices={"crops.local_crops": [0, 2]})
    params = baseline_params(space)
    s.add("baseline", trial_config(space, params, "baseline", space.base_config().system.seed).to_dict(), params,
          throughput=100.0, knn=20.0)
    s.add("search", trial_config(space, {"crops.local_crops": 0}, "search", None).to_dict(), {"crops.local_crops": 0},
          throughput=200.0, knn=20.0, attrs={"hardware": search_hardware} if search_hardware else None)
    return s


def test_confirm_with_an_address_measures_on_a_cluster_node_with_the_study_s_hardware(two_node_cluster, stored_study,
                                                                                    tiny_space, tmp_path):
    from tuner.study import hardware_fingerprint

    cluster, worker_ids, _ = two_node_cluster
    s = _stored_tiny_study(stored_study, tmp_path, tiny_space, hardware_fingerprint())
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "confirm", s.url, "--address", cluster.address,
                           "--rounds", "2", "--parity-steps", "0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome = optuna.load_study(study_name="remote", storage=s.url).user_attrs["confirm"]
    assert outcome["measured_on"]["node_id"] in worker_ids and outcome["measured_on"]["cpus"] == 1
    assert len(outcome["speedups"]) == 2 and all(v > 0 for v in outcome["winner_img_s"] + outcome["baseline_img_s"])
    assert f"measuring on node {outcome['measured_on']['node_id'][:8]}" in done.stdout


def test_confirm_with_an_address_refuses_when_no_node_has_the_study_s_hardware(two_node_cluster, stored_study,
                                                                             tiny_space, tmp_path):
    cluster, _, _ = two_node_cluster
    s = _stored_tiny_study(stored_study, tmp_path, tiny_space, {"device": "NVIDIA H100", "cpu_model": "Test CPU"})
    done = subprocess.run([sys.executable, "-m", "tuner.cli", "confirm", s.url, "--address", cluster.address],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1
    assert "no node has the study's hardware (NVIDIA H100, Test CPU); the cluster has: cpu, " in err[0]
    assert "confirm" not in optuna.load_study(study_name="remote", storage=s.url).user_attrs


def test_the_baseline_is_measured_on_the_cluster_node_of_a_kind_only_search_trials_ran_on(two_node_cluster, stored_study,
                                                                                        tiny_space, tmp_path):
    from tuner.study import hardware_fingerprint
    from tuner.summary import hardware_kind, speedup_of

    cluster, worker_ids, _ = two_node_cluster
    here = hardware_fingerprint()  # the cluster's nodes; the baseline trial claims to have run elsewhere
    s = _stored_tiny_study(stored_study, tmp_path, tiny_space, {**here, "device": "NVIDIA H100"}, search_hardware=here)
    step = ("import sys, optuna; from tuner.runner import measure_kind_baselines; from tuner.space import SearchSpace; "
            "measure_kind_baselines(optuna.load_study(study_name='remote', storage=sys.argv[1]), "
            "SearchSpace.load(sys.argv[2]), print, sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", step, s.url, str(tmp_path / "remote.yaml"), cluster.address],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="remote", storage=s.url)
    measured = study.user_attrs["baselines_by_kind"][hardware_kind(here)]
    assert measured["node"]["node_id"] in worker_ids and measured["throughput"] > 0
    assert f"measuring the baseline (trial 0) on node {measured['node']['node_id'][:8]}" in done.stdout
    assert speedup_of(study, study.trials[1]) == pytest.approx(200.0 / measured["throughput"])


def test_a_trial_of_two_processes_trains_as_one_ddp_job_and_counts_both_ranks_images(ray_session, tiny_space, tmp_path,
                                                                                    monkeypatch):
    from tuner import run

    monkeypatch.chdir(tmp_path)
    path = tiny_space(tmp_path, "ddp", params={"crops.local_crops": {"choices": [0]}}, budget={"n_trials": 2},
                      constraints={"knn_noise_seeds": 1}, ray={"torch_threads": 2, "workers_per_trial": 2})
    summary = run(path, progress=None, confirm_rounds=0)
    assert summary.states == {"COMPLETE": 2}
    study = optuna.load_study(study_name="ddp", storage=f"sqlite:///{tmp_path}/studies/ddp.db")
    for t in study.trials:
        batch = t.user_attrs["config"]["optim"]["batch_size"]
        assert t.user_attrs["world_size"] == 2 and t.user_attrs["images_per_step"] == 2 * batch
        assert t.user_attrs["throughput_img_s"] > 0 and t.user_attrs["knn_top1"] is not None


def test_rungs_and_several_processes_per_trial_are_refused_together(tiny_space, tmp_path):
    from trainer.config import ConfigError
    from tuner.space import SearchSpace

    path = tiny_space(tmp_path, "both", trial={"rungs": [12]}, ray={"workers_per_trial": 2})
    with pytest.raises(ConfigError, match=r"both.yaml: ray.workers_per_trial 2: promotion rungs"):
        SearchSpace.load(path)
