"""Measuring configurations again, interleaved (A B C A B C ...), so machine drift hits all alike.

Used by `tuner confirm` (winner against baseline) and `tuner explain` (the path from one to the
other, knob by knob). Each measurement is the trainer's own speed phase (`train(..., speed_only=True)`)
run in this process, one at a time, so no two measurements share the machine.
"""

from __future__ import annotations

import statistics
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
    """Speedup of paired rounds: the median of per-round ratios and its spread (max - min)/2."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return statistics.median(ratios), (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else 0.0, ratios


def measured_config(study, trial) -> TrainConfig:
    """The config a trial was measured with: its stored full-training config plus the study's trial budget."""
    data = trial.user_attrs.get("config")
    if not data:
        raise ConfigError(f"trial {trial.number} stores no config (was it run by this version of tuner?)")
    config = TrainConfig.from_dict(data, source=f"trial {trial.number} of study {study.study_name!r}")
    return config.with_overrides(study.user_attrs.get("trial_overrides", {}))
