"""`tuner explain`: which knob bought how much speed, measured on this machine.

The winner differs from the baseline in a handful of knobs. Each knob is first measured alone on the
baseline (to order them by measured gain); then the path baseline -> +knob1 -> +knob2 ... -> winner is
measured in interleaved rounds, each config read at its best round as `tuner confirm` reads it. Every
bar in the report's waterfall is one of those measurements, never a number inferred from the sampler.
Each exact or approximate knob then gets its parity check (the baseline plus that knob against the
baseline, `trainer.parity`); a method knob's quality is `unmeasured` here. The result is stored in the
study (user attributes `explain` and `parity`) so status, export and the report can show it later.
"""

from __future__ import annotations

from typing import Any, Callable

import optuna

from trainer.config import ConfigError, TrainConfig
from trainer.knobs import METHOD, flatten, group_class
from trainer.table import format_table
from tuner.remeasure import interleaved, local_measure, measured_config, on_cluster, ratio_stats
from tuner.select import baseline_trial, pick

# Fields that say how a trial is measured or seeded, not how it trains; never counted as knobs.
IGNORED = ("system.seed",)


def knob_groups(base: TrainConfig, target: TrainConfig) -> list[dict[str, Any]]:
    """The differing fields as knobs; a field that is not valid alone (e.g. prefetch_factor without
    workers) is merged with the knob it depends on, so every group applies cleanly to the baseline.

    Every field valid alone is its own knob (in config order); each dependent field then joins the first
    knob it is valid with. Fields that fit no single knob form one group of their own when that is valid,
    else join the last knob.
    """
    a, b = flatten(base.to_dict()), flatten(target.to_dict())
    diffs = {k: b[k] for k in b if a.get(k) != b[k] and k not in IGNORED}

    def valid(overrides: dict[str, Any]) -> bool:
        try:
            base.with_overrides(overrides)
        except ConfigError:
            return False
        return True

    groups = [{k: v} for k, v in diffs.items() if valid({k: v})]
    leftover: dict[str, Any] = {}
    for k, v in diffs.items():
        if any(k in g for g in groups):
            continue
        home = next((g for g in groups if valid({**g, k: v})), None)
        if home is not None:
            home[k] = v
        else:
            leftover[k] = v
    if leftover:  # only valid together with several knobs
        (groups[-1].update(leftover) if groups and not valid(leftover) else groups.append(leftover))
    return groups


def explain(study: optuna.Study, policy: str = "fastest", rounds: int = 3, echo: Callable[[str], None] = print,
            measure: Callable[[TrainConfig], float] | None = None, parity_steps: int | None = None,
            address: str | None = None) -> dict[str, Any]:
    """Measure the baseline-to-winner path one knob at a time, check each exact or approximate knob's
    parity (`parity_steps` optimizer steps each; 0 skips parity); store and return it. With `address`,
    the measurements run as Ray tasks on a node of that cluster whose hardware matches the winner's."""
    base_t, win_t = baseline_trial(study), pick(study, policy)
    if base_t is None:
        raise ConfigError(f"study {study.study_name!r} has no completed baseline to explain against")
    measured_on = None
    if measure is None and address:
        measure, measured_on = on_cluster(address, win_t.user_attrs.get("hardware"))
        echo(f"measuring on node {measured_on['node_id'][:8]} ({measured_on['node_ip']}): {measured_on['device']}, "
             f"{measured_on['cpu_model']}, {measured_on['cpus']} CPUs")
    elif measure is None:
        measure, measured_on = local_measure()
    base, target = measured_config(study, base_t), measured_config(study, win_t)
    groups = knob_groups(base, target)
    if not groups:
        raise ConfigError(f"trial {win_t.number} has the baseline's configuration; nothing to explain")
    echo(f"{len(groups)} knob(s) differ between baseline trial {base_t.number} and trial {win_t.number}; "
         "measuring each alone on the baseline to order them")
    alone = interleaved([base] + [base.with_overrides(g) for g in groups], 1, echo,
                        ["baseline"] + [_label(g) for g in groups], measure)
    gains = [a[0] / alone[0][0] for a in alone[1:]]
    order = sorted(range(len(groups)), key=lambda i: -gains[i])
    path, cfg = [base], base
    for i in order:
        cfg = cfg.with_overrides(groups[i])
        path.append(cfg)
    echo(f"measuring the path baseline -> winner, {rounds} interleaved round(s)")
    labels = ["baseline"] + [f"+ {_label(groups[i])}" for i in order]
    results = interleaved(path, rounds, echo, labels, measure)
    steps, base_values = [], flatten(base.to_dict())
    for n, i in enumerate(order, start=1):
        step_speedup, _, _ = ratio_stats(results[n], results[n - 1])
        cumulative, spread, _ = ratio_stats(results[n], results[0])
        key = ", ".join(groups[i])
        from_v = ", ".join(str(base_values.get(k)) for k in groups[i])
        to_v = ", ".join(str(v) for v in groups[i].values())
        steps.append({"knob": key, "from": from_v, "to": to_v, "alone_speedup": gains[i],
                      "throughput_img_s": max(results[n]), "step_speedup": step_speedup,
                      "cumulative_speedup": cumulative, "spread": spread, "rounds": results[n],
                      "class": group_class(groups[i], base.to_dict())})
    parity = knob_parity(base, [groups[i] for i in order], parity_steps, echo)
    tolerances = parity.pop("_tolerances", None)
    if tolerances is not None:  # what the verdicts were measured against: the round-off reference and the bands
        study.set_user_attr("parity_tolerances", tolerances)
    for step, group in zip(steps, (groups[i] for i in order)):
        step["parity"] = parity.get(", ".join(group))
    record = {"baseline_trial": base_t.number, "winner_trial": win_t.number, "policy": policy, "rounds": rounds,
              "baseline_throughput_img_s": max(results[0]), "baseline_rounds": results[0], "steps": steps,
              "measured_on": measured_on}
    study.set_user_attr("explain", record)
    study.set_user_attr("parity", {**(study.user_attrs.get("parity") or {}), **parity})
    return record


def knob_parity(base: TrainConfig, groups: list[dict[str, Any]], steps: int | None,
                echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Parity of the baseline plus each exact or approximate knob group against the baseline alone.

    The baseline's trajectory, its round-off reference and the bands of approximate knobs are measured
    once and shared by every knob. Returns {knob: the stored record} (method knobs are left out).
    """
    from trainer.parity import DEFAULT_STEPS, ParityError, check, trajectory

    steps = DEFAULT_STEPS if steps is None else steps
    checked = [g for g in groups if group_class(g, base.to_dict()) != METHOD]
    if not checked or steps < 1:
        return {}
    echo(f"parity of {len(checked)} exact/approximate knob(s) against the baseline, {steps} steps each")
    shared: dict[str, Any] = {"reference": None, "bands": {}, "base": None}
    out: dict[str, dict[str, Any]] = {}
    for group in checked:
        key = ", ".join(group)
        try:
            if shared["base"] is None:
                shared["base"] = trajectory(base, steps)
            result = check(base, base.with_overrides(group), steps=steps, reference=shared["reference"],
                           bands=shared["bands"], base=shared["base"], progress=echo, source=f"explain: {key}")
        except ParityError as exc:  # e.g. an op with no deterministic implementation on this device
            out[key] = {"verdict": "unchecked", "line": f"parity not checked: {exc}", "steps": steps}
            echo(f"{key}: {out[key]['line']}")
            continue
        shared["reference"] = result.reference
        out[key] = {"verdict": result.verdict, "line": result.line(), "steps": steps, "seconds": result.seconds,
                    "max_diff": result.max_diff, "tolerance_source": result.tolerance_source,
                    "worst": result.as_dict()["worst"], "class": group_class(group, base.to_dict())}
        echo(f"{key}: {result.line()} [{result.seconds:.1f} s]")
    if shared["reference"] is not None:
        out["_tolerances"] = {"steps": steps, "round_off_reference": shared["reference"], "bands": shared["bands"]}
    return out


def format_explain(record: dict[str, Any]) -> str:
    """knob, from, to, throughput, step speedup, cumulative speedup, spread, quality verdict."""
    rows = [("baseline", "", "", record["baseline_throughput_img_s"], "", "1.00x", "", "")]
    for s in record["steps"]:
        rows.append((s["knob"], s["from"], s["to"], s["throughput_img_s"], f"{s['step_speedup']:.2f}x",
                     f"{s['cumulative_speedup']:.2f}x", f"±{s['spread']:.2f}x", quality_cell(s)))
    return format_table(["knob", "from", "to", "img/s", "step", "cumulative", "spread", "quality"], rows)


def quality_cell(step: dict[str, Any]) -> str:
    """A path step's quality verdict: its parity line, or why it has none."""
    if step.get("parity"):
        return step["parity"]["line"]
    if step.get("class") == METHOD:
        return "method knob: quality unmeasured (needs kNN)"
    return "parity not run"


def _label(group: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.items())
