"""What a study holds, as one object (`StudySummary`) and as the `tuner status` tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from trainer.table import format_table
from tuner.remeasure import confirmed_speedup
from tuner.select import baseline_trial, best_feasible, is_feasible, pareto_set
from tuner.verdicts import compile_break_even, parity_failures, verdict


@dataclass
class TrialRow:
    """One trial as the summary shows it."""

    number: int
    state: str
    role: str
    throughput_img_s: float | None
    knn_top1: float | None
    speedup: float | None
    feasible: bool
    within_noise: bool | None
    fail_reason: str | None
    pruned_phase: str | None
    hardware_kind: str | None  # where its throughput was measured (`hardware_kind`), if recorded
    params: dict[str, Any]

    @classmethod
    def of(cls, t: FrozenTrial, study: optuna.Study, measured: dict[str, Any] | None = None) -> "TrialRow":
        """`measured`: the study's `baselines_by_kind`, read once for all rows."""
        u = t.user_attrs
        role = u.get("role", "search")
        if role == "rung":
            role = f"rung {u['rung'] + 1} of #{u['parent']}"
        return cls(t.number, t.state.name, role, u.get("throughput_img_s"), u.get(knn_key(t)),
                   speedup_of(study, t, measured), is_feasible(t), u.get("knn_within_noise"), u.get("fail_reason"),
                   u.get("pruned_phase"), trial_kind(study, t), dict(t.params))


def hardware_kind(hardware: dict[str, Any]) -> str:
    """What makes two trials' speeds comparable: the device and the CPU model."""
    return f"{hardware.get('device', '?')}, {hardware.get('cpu_model', '?')}"


def trial_kind(study: optuna.Study, t: FrozenTrial) -> str | None:
    """The kind of hardware a trial's throughput was measured on (None: not recorded). A promotion rung's
    record carries its parent's throughput, so it stands for its parent's hardware."""
    if t.user_attrs.get("role") == "rung" and t.user_attrs.get("parent") is not None:
        t = study.get_trials(deepcopy=False)[t.user_attrs["parent"]]
    hardware = t.user_attrs.get("hardware")
    return hardware_kind(hardware) if hardware else None


def speedup_of(study: optuna.Study, t: FrozenTrial, measured: dict[str, Any] | None = None) -> float | None:
    """A trial's speedup over the baseline measured on the same kind of hardware as the trial.

    Throughput differs between machines by more than most knobs change it, so a trial that ran on other
    hardware than the baseline trial is compared with the baseline's config measured on its own kind
    after the search (`tuner.runner.measure_kind_baselines`, stored as the study's `baselines_by_kind`;
    `measured` passes that in when many trials are read at once). A trial on the baseline trial's kind,
    or on a kind with no such measurement yet, keeps the speedup stored when it finished: against the
    baseline trial (`kind_baselines` says which kinds lack their own)."""
    measured = (study.user_attrs.get("baselines_by_kind") or {}) if measured is None else measured
    own = measured.get(trial_kind(study, t) or "")
    throughput = t.user_attrs.get("throughput_img_s")
    if own and own.get("throughput") and throughput is not None:
        return throughput / own["throughput"]
    stored = t.user_attrs.get("speedup")
    base = study.user_attrs.get("baseline_throughput_img_s")
    if stored is None and throughput is not None and base:
        # finished before the baseline did (another driver's baseline seed, for one): a finished trial's
        # attributes cannot be set afterwards, so its speedup is computed here, against the same baseline
        return throughput / base
    return stored


def kind_baselines(study: optuna.Study) -> dict[str, dict[str, Any] | None]:
    """Every kind of hardware the study's trials measured a throughput on, with the baseline throughput
    their speedups are against: the baseline trial's own for its kind, the measurement after the search
    for the others, None where none was made (those trials' speedups are still against the baseline
    trial's hardware). Empty until the baseline has completed; one entry on a single kind of machine."""
    base = baseline_trial(study)
    base_kind = trial_kind(study, base) if base is not None else None
    if base_kind is None:
        return {}
    measured = study.user_attrs.get("baselines_by_kind") or {}
    kinds: dict[str, dict[str, Any] | None] = {base_kind: {"throughput": base.values[0], "trial": base.number}}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("throughput_img_s") is None or t.user_attrs.get("role") == "rung":
            continue  # no speedup to compare; a rung record is its parent's kind
        kind = trial_kind(study, t)
        if kind is not None and kind not in kinds:
            kinds[kind] = measured.get(kind)
    return kinds


def kinds_text(kinds: dict[str, dict[str, Any] | None]) -> str | None:
    """The line `tuner status`, the export header and the report give a study whose trials ran on more
    than one kind of hardware: which baseline each kind's speedups are against. None for one kind."""
    if len(kinds) < 2:
        return None
    parts = []
    for kind, rec in kinds.items():
        if rec is None:
            parts.append(f"{kind}: no baseline measured there (its trials' speedups are against the baseline trial's hardware)")
        elif "trial" in rec:  # the baseline trial's own kind
            parts.append(f"{kind}: baseline {rec['throughput']:.1f} img/s (trial {rec['trial']})")
        else:
            node = rec.get("node") or {}
            where = (f" on node {node['node_id'][:8]} ({node.get('node_ip')})" if node.get("node_id")
                     else f" on {node['host']}" if node.get("host") else "")
            parts.append(f"{kind}: baseline {rec['throughput']:.1f} img/s (measured after the search{where})")
    return "speedups are per hardware kind, each trial against the baseline measured on its kind: " + "; ".join(parts)


def knn_key(t: FrozenTrial) -> str:
    """The attribute holding the kNN this trial was judged on: the teacher's, or the student's where the
    space's `constraints.knn_backbone` said so."""
    return "student_knn_top1" if t.user_attrs.get("knn_backbone") == "student" else "knn_top1"


@dataclass
class StudySummary:
    """A study at a glance: the result object of `tuner.run` and the content of `tuner status`."""

    study_name: str
    storage_url: str
    states: dict[str, int]
    fail_reasons: dict[str, int]
    baseline: TrialRow | None
    best_feasible: TrialRow | None
    pareto: list[TrialRow]
    trials: list[TrialRow]
    knn_noise_points: float | None
    knn_tolerance_points: float | None
    time_saved_by_pruning_s: float
    warnings: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    confirm: dict[str, Any] | None = None
    quality: str | None = None  # the best feasible trial's quality verdict (`tuner.verdicts`)
    compile_break_even: str | None = None  # the best feasible trial compiles: its compile time and break-even
    rungs: list[dict[str, Any]] = field(default_factory=list)  # per promotion rung: steps, baseline kNN, outcomes
    nodes: dict[str, int] = field(default_factory=dict)  # trials per Ray node ("id (ip)"), where recorded
    measures_nothing: bool = False  # the baseline's kNN did not move: no kNN difference means anything
    hardware_kinds: dict[str, Any] = field(default_factory=dict)  # kind -> the baseline its speedups are against

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready data: what `tuner status --format json` prints."""
        return {**asdict(self), "n_trials": self.n_trials}


def summarize(study: optuna.Study, storage_url: str = "") -> StudySummary:
    """Collect states, failure reasons, baseline, best feasible, Pareto set and warnings."""
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    warnings = [w for w in (attrs.get("quality_warning"),) if w]
    warnings += [f"parity FAILED for {line}" for line in parity_failures(study)]
    if attrs.get("baseline_trial") is None:
        warnings.append("no completed baseline yet: speedups and the kNN constraint are not known")
    elif attrs.get("knn_noise_points") is None:
        warnings.append("kNN noise not measured (constraints.knn_noise_seeds < 2 or the noise trial did not finish)")
    base, best = baseline_trial(study), best_feasible(study)
    kinds, measured = kind_baselines(study), attrs.get("baselines_by_kind") or {}
    base_kind = next(iter(kinds), None)
    for kind in [k for k, rec in kinds.items() if rec is None]:
        numbers = [t.number for t in trials if t.user_attrs.get("throughput_img_s") is not None
                   and t.user_attrs.get("role") != "rung" and trial_kind(study, t) == kind]
        warnings.append(f"no baseline measured on {kind} (trials {', '.join(map(str, numbers))}): their speedups are "
                        f"against the baseline trial on {base_kind}, which mixes the knob with the machine, so they are "
                        "not ranked (never the best feasible trial, not in the Pareto set); `tuner run` "
                        "measures it after its search while a node of that kind is in the cluster (--address)")
    quality = verdict(study, best).text if best is not None else None
    compiled = compile_break_even(study, best) if best is not None else None
    return StudySummary(
        study_name=study.study_name, storage_url=storage_url,
        states=dict(Counter(t.state.name for t in trials)),
        fail_reasons=dict(Counter(t.user_attrs["fail_reason"] for t in trials if t.user_attrs.get("fail_reason"))),
        baseline=TrialRow.of(base, study, measured) if base else None,
        best_feasible=TrialRow.of(best, study, measured) if best else None,
        pareto=[TrialRow.of(t, study, measured) for t in pareto_set(study)],
        trials=[TrialRow.of(t, study, measured) for t in trials], hardware_kinds=kinds,
        knn_noise_points=attrs.get("knn_noise_points"), knn_tolerance_points=attrs.get("knn_tolerance_effective"),
        time_saved_by_pruning_s=sum(t.user_attrs.get("time_saved_s", 0.0) for t in trials if t.state == TrialState.PRUNED),
        warnings=warnings, hardware=attrs.get("hardware", {}), confirm=attrs.get("confirm"),
        quality=quality, compile_break_even=compiled["text"] if compiled else None, measures_nothing=bool(attrs.get("quality_warning")), rungs=rung_summary(study),
        nodes=dict(Counter(f"{t.user_attrs['node_id'][:8]} ({t.user_attrs.get('node_ip')})" for t in trials
                           if t.user_attrs.get("node_id"))),
    )


def rung_summary(study: optuna.Study) -> list[dict[str, Any]]:
    """Per promotion rung: its steps, the baseline's kNN there, the tolerance, power, and each candidate's outcome."""
    from tuner.promotion import rung_records

    rungs: dict[int, dict[str, Any]] = {}
    for parent, records in sorted(rung_records(study).items()):
        for t in records:
            u = t.user_attrs
            r = rungs.setdefault(u["rung"], {"rung": u["rung"] + 1, "steps": u["rung_steps"], "baseline_knn": None,
                                             "tolerance": None, "calibrated": None, "within": [], "pruned": []})
            if u.get("baseline_knn_at_rung") is None:
                continue  # a baseline seed
            if u.get("control"):  # the positive control: it decides the rung's power
                r.update(baseline_knn=u["baseline_knn_at_rung"], tolerance=u.get("tolerance_points"),
                         calibrated=u.get("calibrated"), control={"trial": parent, "delta": u.get("knn_delta_points")})
                continue
            r.update(baseline_knn=u["baseline_knn_at_rung"], tolerance=u.get("tolerance_points"),
                     calibrated=u.get("calibrated"))
            r["pruned" if t.state == TrialState.PRUNED else "within"].append(parent)
    return [rungs[k] for k in sorted(rungs)]


def knn_note(row: TrialRow, summary: StudySummary) -> str:
    """'within noise' when a kNN difference from the baseline is not larger than the measured noise, and only
    where the kNN check could have failed (not when the baseline's own kNN did not move)."""
    if row.role != "search" or row.knn_top1 is None or summary.baseline is None or summary.measures_nothing:
        return ""
    return "within noise" if row.within_noise else ""


def format_status(s: StudySummary) -> str:
    """The `tuner status` text: states, baseline, best feasible, the Pareto set, warnings."""
    out = [f"study {s.study_name}  ({s.storage_url})",
           "trials: " + ", ".join(f"{n} {k}" for k, n in sorted(s.states.items())) +
           (f"  (failures: {', '.join(f'{n} {k}' for k, n in sorted(s.fail_reasons.items()))})" if s.fail_reasons else "")]
    if s.hardware:
        out.append(f"hardware: {s.hardware.get('device')}, {s.hardware.get('cpu_model')} x{s.hardware.get('cpu_cores')}, "
                   f"torch {s.hardware.get('torch')}, CUDA {s.hardware.get('cuda')}")
    if len(s.nodes) > 1:
        out.append("trials per node: " + ", ".join(f"{node} {n}" for node, n in sorted(s.nodes.items())))
    if kinds_text(s.hardware_kinds):
        out.append(kinds_text(s.hardware_kinds))
    if s.baseline:
        noise = f"{s.knn_noise_points:.2f}" if s.knn_noise_points is not None else "not measured"
        out.append(f"baseline: trial {s.baseline.number}, {s.baseline.throughput_img_s:.1f} img/s, kNN {s.baseline.knn_top1:.1f} "
                   f"(noise {noise} points, tolerance {s.knn_tolerance_points or 0:.2f} points)")
    if s.best_feasible:
        b = s.best_feasible
        note = knn_note(b, s)
        out.append(f"best feasible: trial {b.number}, {b.throughput_img_s:.1f} img/s, {speedup_text(s, b)}, "
                   f"kNN {b.knn_top1:.1f}{' (' + note + ')' if note else ''}")
        if s.quality:
            out.append(f"  {s.quality}")
        if s.compile_break_even:
            out.append(f"  {s.compile_break_even}")
    for r in s.rungs:
        if r["baseline_knn"] is None:
            continue
        if r.get("control"):
            power = (f"the control lost {-r['control']['delta']:.1f} points: "
                     f"{'the kNN check has power here' if r['calibrated'] else 'quality unmeasured at this rung'}")
        else:
            power = "the baseline's kNN moved beyond its noise" if r["calibrated"] else "quality unmeasured at this rung"
        out.append(f"rung {r['rung']} ({r['steps']} steps): baseline kNN {r['baseline_knn']:.1f}, tolerance "
                   f"{r['tolerance']:.1f}; within: {', '.join(f'#{n}' for n in r['within']) or 'none'}; PRUNED: "
                   f"{', '.join(f'#{n}' for n in r['pruned']) or 'none'} ({power})")
    if s.time_saved_by_pruning_s:
        out.append(f"pruning saved about {s.time_saved_by_pruning_s:.0f} s of trial time")
    if s.pareto:
        axis = "speedup on its own hardware kind" if len(s.hardware_kinds) > 1 else "throughput"
        out.append(f"\nPareto set (feasible; {axis} vs kNN):")
        out.append(_trial_table(s.pareto, s))
    out.append("\nall trials:")
    out.append(_trial_table(s.trials, s))
    claim = confirmed_speedup(s.confirm)
    if claim:
        out.append(f"\nconfirmed: trial {s.confirm['trial']} vs baseline, speedup x{claim[0]:.2f} ({claim[1]})")
    out += [f"warning: {w}" for w in s.warnings]
    return "\n".join(out)


def speedup_text(s: StudySummary, row: TrialRow) -> str:
    """The confirmed speedup with its range where `tuner confirm` (or the end of `tuner run`) measured this
    trial, else the study's own figure marked `unconfirmed`: a trial's short windows are not a claim."""
    claim = confirmed_speedup(s.confirm)
    if claim and s.confirm.get("trial") == row.number:
        return f"x{claim[0]:.2f} confirmed ({claim[1]}; the study's windows said x{(row.speedup or float('nan')):.2f})"
    return f"x{(row.speedup or float('nan')):.2f} unconfirmed"


def no_own_baseline(row: TrialRow, s: StudySummary) -> bool:
    """Whether a trial ran on a kind of hardware that has no baseline measurement of its own (of several kinds)."""
    return len(s.hardware_kinds) > 1 and row.hardware_kind is not None and s.hardware_kinds.get(row.hardware_kind) is None


def _trial_table(rows: list[TrialRow], s: StudySummary) -> str:
    def note(r: TrialRow) -> str:
        text = r.fail_reason or (f"pruned: {r.pruned_phase}" if r.pruned_phase else knn_note(r, s))
        flag = "speedup across hardware (no baseline on its kind)" if r.speedup and no_own_baseline(r, s) else ""
        return "; ".join(x for x in (text, flag) if x)

    return format_table(
        ["#", "state", "role", "img/s", "kNN", "speedup (own kind)" if len(s.hardware_kinds) > 1 else "speedup (study)",
         "feasible", "note"],
        [(r.number, r.state, r.role, r.throughput_img_s, r.knn_top1, f"{r.speedup:.2f}x" if r.speedup else None,
          "yes" if r.feasible else "no", note(r)) for r in rows])
