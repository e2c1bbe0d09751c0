"""`tuner confirm`: measure the winner and the baseline again, interleaved, so the speedup has a spread.

Throughput on a shared machine drifts by tens of percent between runs, so the two configs are measured
alternately (A B A B ...) in one process, each run only its speed phase, and the speedup is the winner's
best round over the baseline's (`ratio_stats`), with the per-round ratios as its spread. Then the
winner's whole combination of exact and approximate knobs gets one parity check: the winner against the
winner with every such knob at the baseline's value (method knobs kept), so the verdict covers knobs
that are harmless alone but not together.
"""

from __future__ import annotations

from typing import Callable

import optuna

from trainer.config import ConfigError
from tuner.remeasure import confirmed_speedup, interleaved, local_measure, measured_config, on_cluster, ratio_stats
from tuner.select import baseline_trial, pick
from tuner.verdicts import system_knobs_at_baseline, verdict


def confirm(study: optuna.Study, policy: str = "fastest", rounds: int = 3,
            progress: Callable[[str], None] | None = print, parity_steps: int | None = None,
            address: str | None = None) -> dict:
    """Measure the picked trial and the baseline `rounds` times each, interleaved, then check the parity of
    the winner's system knobs (`parity_steps` optimizer steps; 0 skips it); store and return the result.
    With `address`, the measurements run as Ray tasks on a node of that cluster whose hardware matches
    the winner's (parity stays in this process)."""
    winner, base = pick(study, policy), baseline_trial(study)
    if base is None:
        raise ConfigError(f"study {study.study_name!r} has no completed baseline trial to compare with")
    say = progress or (lambda line: None)
    labels = [f"winner (trial {winner.number})", f"baseline (trial {base.number})"]
    measure, measured_on = local_measure()
    if address:
        measure, measured_on = on_cluster(address, winner.user_attrs.get("hardware"))
        say(f"measuring on node {measured_on['node_id'][:8]} ({measured_on['node_ip']}): {measured_on['device']}, "
            f"{measured_on['cpu_model']}, {measured_on['cpus']} CPUs")
    # A failed measurement raises MeasurementFailed: not the user's mistake (`tuner confirm` exits 1, not 2).
    measured = interleaved([measured_config(study, winner), measured_config(study, base)], rounds, say, labels, measure)
    speedup, _, ratios = ratio_stats(measured[0], measured[1])
    outcome = {"trial": winner.number, "baseline_trial": base.number, "rounds": rounds, "pick": policy,
               "winner_img_s": measured[0], "baseline_img_s": measured[1], "speedups": ratios,
               "speedup": speedup, "speedup_min": min(ratios), "speedup_max": max(ratios),
               "measured_on": measured_on}
    study.set_user_attr("confirm", outcome)  # finished trials are read-only in Optuna: the result lives on the study
    history = dict(study.user_attrs.get("confirmed_speedups", {}))
    history[str(winner.number)] = speedup
    study.set_user_attr("confirmed_speedups", history)
    say(f"speedup of trial {winner.number} over the baseline: x{speedup:.2f} ({confirmed_speedup(outcome)[1]})")
    combo = combination_parity(study, winner, base, parity_steps, say)
    if combo is not None:
        outcome["parity"] = combo
    say(verdict(study, winner).text)
    return outcome


def combination_parity(study: optuna.Study, winner, base, steps: int | None,
                       say: Callable[[str], None]) -> dict | None:
    """Parity of the winner against itself with every exact/approximate knob at the baseline's value;
    stored as the study's `confirm_parity`. None when there is nothing to check."""
    from trainer.parity import DEFAULT_STEPS, ParityError, check

    steps = DEFAULT_STEPS if steps is None else steps
    target = measured_config(study, winner)
    reference = system_knobs_at_baseline(target, measured_config(study, base))
    if steps < 1 or reference.to_dict() == target.to_dict():
        return None
    say(f"parity of trial {winner.number}'s system knobs together, against the same config with them at the "
        f"baseline's values ({steps} steps each)")
    try:
        result = check(reference, target, steps=steps, progress=say, source=f"confirm: trial {winner.number}")
        record = {"trial": winner.number, "verdict": result.verdict, "line": result.line(), "steps": steps,
                  "knobs": result.knobs, "seconds": result.seconds, "worst": result.as_dict()["worst"],
                  "tolerance_source": result.tolerance_source}
    except ParityError as exc:
        record = {"trial": winner.number, "verdict": "unchecked", "line": f"parity not checked: {exc}", "steps": steps}
    study.set_user_attr("confirm_parity", record)
    say(f"{', '.join(record.get('knobs') or {}) or 'system knobs'}: {record['line']}")
    return record
