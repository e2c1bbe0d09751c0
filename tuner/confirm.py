"""`tuner confirm`: measure the winner and the baseline again, interleaved, so the speedup has a spread.

Throughput on a shared machine drifts by tens of percent between runs, so the two configs are measured
alternately (A B A B ...) in one process, each run only its speed phase, and the speedup is the ratio
within each round.
"""

from __future__ import annotations

from typing import Callable

import optuna

from trainer.config import ConfigError
from tuner.remeasure import interleaved, measured_config, ratio_stats
from tuner.select import baseline_trial, pick


def confirm(study: optuna.Study, policy: str = "fastest", rounds: int = 3,
            progress: Callable[[str], None] | None = print) -> dict:
    """Measure the picked trial and the baseline `rounds` times each, interleaved; store and return the result."""
    winner, base = pick(study, policy), baseline_trial(study)
    if base is None:
        raise ConfigError(f"study {study.study_name!r} has no completed baseline trial to compare with")
    say = progress or (lambda line: None)
    labels = [f"winner (trial {winner.number})", f"baseline (trial {base.number})"]
    # A failed measurement raises MeasurementFailed: not the user's mistake (`tuner confirm` exits 1, not 2).
    measured = interleaved([measured_config(study, winner), measured_config(study, base)], rounds, say, labels)
    median, _, ratios = ratio_stats(measured[0], measured[1])
    outcome = {"trial": winner.number, "baseline_trial": base.number, "rounds": rounds, "pick": policy,
               "winner_img_s": measured[0], "baseline_img_s": measured[1], "speedups": ratios,
               "speedup_median": median, "speedup_min": min(ratios), "speedup_max": max(ratios)}
    study.set_user_attr("confirm", outcome)  # finished trials are read-only in Optuna: the result lives on the study
    history = dict(study.user_attrs.get("confirmed_speedups", {}))
    history[str(winner.number)] = outcome["speedup_median"]
    study.set_user_attr("confirmed_speedups", history)
    say(f"speedup of trial {winner.number} over the baseline: x{median:.2f} "
        f"(range {outcome['speedup_min']:.2f}-{outcome['speedup_max']:.2f} over {rounds} interleaved rounds)")
    return outcome
