"""Measuring configurations again, interleaved (A B C A B C ...), so machine drift hits all alike.

Used by `tuner confirm` (winner against baseline) and `tuner explain` (the path from one to the
other, knob by knob). Each measurement is the trainer's own speed phase (`train(..., speed_only=True)`)
run in this process, one at a time, so no two measurements share the machine.
"""

from __future__ import annotations

from typing import Callable

from trainer.config import ConfigError, TrainConfig


class MeasurementFailed(RuntimeError):
    """A configuration that measured fine in the study failed when measured again."""


def measure_throughput(config: TrainConfig) -> float:
    """One speed phase of `config`: median images/s over its timed windows."""
    from trainer.engine import train

    result = train(config, speed_only=True)
    if result.status != "ok" or result.speed is None:
        failure = result.failure or {}
        raise MeasurementFailed(f"{failure.get('reason', 'error')}: {failure.get('message', 'no measurement')}")
    return result.speed.throughput_img_s


def local_measure() -> tuple[Callable[[TrainConfig], float], dict]:
    """`measure_throughput` in this process, and a description of where that is (`measured_on`)."""
    import platform

    from tuner.study import hardware_fingerprint

    fp = hardware_fingerprint()
    return measure_throughput, {"node_id": None, "node_ip": None, "host": platform.node(), "device": fp["device"],
                                "cpu_model": fp["cpu_model"], "cpus": fp["cpu_cores"], "gpus": fp["gpu_count"]}


def interleaved(configs: list[TrainConfig], rounds: int, echo: Callable[[str], None] = lambda _: None,
                labels: list[str] | None = None,
                measure: Callable[[TrainConfig], float] = measure_throughput) -> list[list[float]]:
    """Throughput of each config in each round: `result[i][r]`, measured in the order c0 c1 ... c0 c1 ..."""
    labels = labels or [f"config {i}" for i in range(len(configs))]
    results: list[list[float]] = [[] for _ in configs]
    for r in range(rounds):
        for i, cfg in enumerate(configs):
            tp = measure(cfg)
            results[i].append(tp)
            echo(f"round {r + 1}/{rounds}  {labels[i]:<40} {tp:8.1f} img/s")
    return results


def ratio_stats(numerator: list[float], denominator: list[float]) -> tuple[float, float, list[float]]:
    """Speedup of interleaved rounds: each config's best round over the other's best, the spread of the
    per-round ratios ((max - min) / 2) and those ratios.

    Best, not the median of per-round ratios: interference on a shared machine only ever slows a
    measurement, and it slows configurations unlike each other (on a shared VM a compute-bound config
    runs at one of two speeds a quarter apart for tens of seconds at a time, while a memory-bound one
    holds steady), so a round's ratio moves with whichever state the round landed in; each config's
    fastest round is the steadiest reading of what the machine does for it (docs/results.md).
    """
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return max(numerator) / max(denominator), (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else 0.0, ratios


def confirmed_speedup(confirm: dict | None) -> tuple[float, str] | None:
    """The speedup a stored confirmation claims and how it was measured, in words; None without one.
    Studies confirmed before the claim was each config's best round stored the median of the per-round
    ratios (`speedup_median`), and say so."""
    if not confirm or confirm.get("speedup", confirm.get("speedup_median")) is None:
        return None
    rounds, spread = confirm["rounds"], f"{confirm['speedup_min']:.2f}-{confirm['speedup_max']:.2f}"
    if "speedup" in confirm:
        return confirm["speedup"], f"best of {rounds} interleaved rounds each; per-round ratios {spread}"
    return confirm["speedup_median"], f"median of {rounds} interleaved rounds; range {spread}"


def measured_config(study, trial) -> TrainConfig:
    """The config a trial was measured with: its stored full-training config plus the study's trial budget."""
    data = trial.user_attrs.get("config")
    if not data:
        raise ConfigError(f"trial {trial.number} stores no config (was it run by this version of tuner?)")
    config = TrainConfig.from_dict(data, source=f"trial {trial.number} of study {study.study_name!r}")
    return config.with_overrides(study.user_attrs.get("trial_overrides", {}))


def _measure_task(config: dict, threads: int) -> float:
    """Ray task: one speed phase on the node it was placed on, with all of that node's threads."""
    import torch

    torch.set_num_threads(max(1, threads))
    return measure_throughput(TrainConfig.from_dict(config, source="measured config"))


def on_cluster(address: str, hardware: dict | None, where: str = "--address",
               threads: int | None = None) -> tuple[Callable[[TrainConfig], float], dict]:
    """A `measure` function that runs each measurement as a Ray task on a node of the cluster at `address`
    whose hardware matches `hardware` (the trial's device and CPU model), taking all of that node's CPUs
    (and one GPU where it has one), so re-measurements happen on the hardware the study was tuned on and
    never beside another measurement. Torch uses all those CPUs, or `threads` (as many as the study's
    trials used, where the measurement is compared with their throughput). Returns it with a
    description of the node (`measured_on`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tuner.runner import _init_ray
    from tuner.study import hardware_fingerprint

    _init_ray(address, where)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    probe = ray.remote(num_cpus=0)(hardware_fingerprint)
    prints = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                      for n in nodes])
    want = {k: (hardware or {}).get(k) for k in ("device", "cpu_model")}
    matching = [(n, fp) for n, fp in zip(nodes, prints) if {k: fp.get(k) for k in want} == want]
    if not matching:
        have = "; ".join(sorted({f"{fp.get('device')}, {fp.get('cpu_model')}" for fp in prints})) or "no node with a CPU"
        raise ConfigError(f"{where} {address}: no node has the study's hardware ({want['device']}, {want['cpu_model']}); "
                          f"the cluster has: {have}")
    node, fp = matching[0]
    cpus = int(node["Resources"]["CPU"])
    gpus = 1 if node["Resources"].get("GPU") else 0
    task = ray.remote(_measure_task).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))

    def measure(config: TrainConfig) -> float:
        try:
            return ray.get(task.remote(config.to_dict(), threads or cpus))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
            raise MeasurementFailed(str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__) from None

    where_measured = {"node_id": node["NodeID"], "node_ip": node.get("NodeManagerAddress"), "device": fp.get("device"),
                      "cpu_model": fp.get("cpu_model"), "cpus": cpus, "gpus": gpus}
    return measure, where_measured
