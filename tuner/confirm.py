"""`tuner confirm`: measure the winner and the baseline again, interleaved, so the speedup has a spread.

Throughput on a shared machine drifts by tens of percent between runs, so the two configs are measured
alternately (A B A B ...) in one process, each run only its speed phase, and the speedup is the ratio
within each round.
"""

from __future__ import annotations

import statistics
from typing import Callable

import optuna

from trainer.config import ConfigError, TrainConfig
from tuner.select import baseline_trial, pick


def confirm(study: optuna.Study, policy: str = "fastest", rounds: int = 3,
            progress: Callable[[str], None] | None = print) -> dict:
    """Measure the picked trial and the baseline `rounds` times each, interleaved; store and return the result."""
    from trainer import train

    winner, base = pick(study, policy), baseline_trial(study)
    if base is None:
        raise ConfigError(f"study {study.study_name!r} has no completed baseline trial to compare with")
    overrides = study.user_attrs.get("trial_overrides", {})
    configs = {name: TrainConfig.from_dict(t.user_attrs["config"]).with_overrides(overrides)
               for name, t in (("winner", winner), ("baseline", base))}
    say = progress or (lambda line: None)
    measured: dict[str, list[float]] = {"winner": [], "baseline": []}
    for r in range(rounds):
        for name in ("winner", "baseline"):
            result = train(configs[name], speed_only=True)
            if result.status != "ok":
                raise ConfigError(f"confirm: the {name} (trial {(winner if name == 'winner' else base).number}) failed: "
                                  f"{result.failure['reason']}: {result.failure['message']}")
            measured[name].append(result.summary["throughput_img_s"])
            say(f"round {r + 1}/{rounds}: {name} (trial {(winner if name == 'winner' else base).number}) "
                f"{measured[name][-1]:.1f} img/s")
    ratios = [a / b for a, b in zip(measured["winner"], measured["baseline"])]
    outcome = {"trial": winner.number, "baseline_trial": base.number, "rounds": rounds, "pick": policy,
               "winner_img_s": measured["winner"], "baseline_img_s": measured["baseline"], "speedups": ratios,
               "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}
    study.set_user_attr("confirm", outcome)  # finished trials are read-only in Optuna: the result lives on the study
    history = dict(study.user_attrs.get("confirmed_speedups", {}))
    history[str(winner.number)] = outcome["speedup_median"]
    study.set_user_attr("confirmed_speedups", history)
    say(f"speedup of trial {winner.number} over the baseline: x{outcome['speedup_median']:.2f} "
        f"(range {outcome['speedup_min']:.2f}-{outcome['speedup_max']:.2f} over {rounds} interleaved rounds)")
    return outcome
