"""The smoke study on a local Ray cluster of N worker nodes (Ray's own `cluster_utils.Cluster`: real
raylets on this machine, one CPU each, and a head node with none, where the driver runs), for each N
given: wall time, trials per node, and the trials' states.

    python benchmarks/cluster.py --nodes 1 2

Every run is a fresh study in a temporary folder (`tuner run smoke --address ... --confirm-rounds 0`
with `ray.torch_threads: 1`). On one machine the nodes share its cores, so this shows that trials
spread over nodes one per node and what the orchestration costs, not how a real cluster scales.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.measure import cpu_model  # noqa: E402
from tuner.shipped import resolve_space_path  # noqa: E402


def run_once(nodes: int) -> dict:
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="cl-bench-", dir="/tmp"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                           "temp_dir": str(tmp / "ray")})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        space = yaml.safe_load(resolve_space_path("smoke").read_text())
        space["ray"] = {"torch_threads": 1}
        (tmp / "smoke.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tuner.cli", "run", "smoke.yaml", "--address", cluster.address,
                               "--confirm-rounds", "0"], cwd=tmp, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"tuner run failed with {nodes} node(s):\n{done.stderr[-2000:]}")
        study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp}/studies/smoke.db")
        per_node = collections.Counter(t.user_attrs.get("node_id", "?")[:8] for t in study.trials)
        states = collections.Counter(t.state.name for t in study.trials)
        return {"nodes": nodes, "wall_s": wall, "per_node": dict(per_node), "states": dict(states)}
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    rows = [run_once(n) for n in args.nodes]
    print(f"smoke study on a local Ray cluster ({cpu_model()})")
    print(f"{'worker nodes':>12}  {'wall s':>7}  trials per node          states")
    for r in rows:
        nodes = ", ".join(f"{k} {v}" for k, v in sorted(r["per_node"].items()))
        states = ", ".join(f"{v} {k}" for k, v in sorted(r["states"].items()))
        print(f"{r['nodes']:>12}  {r['wall_s']:7.1f}  {nodes:<24} {states}")


if __name__ == "__main__":
    main()
