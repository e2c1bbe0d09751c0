"""`tuner export`: a trial's complete `TrainConfig` as YAML, with a header saying where it came from."""

from __future__ import annotations

from pathlib import Path

import optuna

from trainer.config import TrainConfig
from tuner.remeasure import confirmed_speedup
from tuner.select import baseline_trial, is_feasible, pick
from tuner.summary import kind_baselines, kinds_text, knn_key, speedup_of, trial_kind
from tuner.verdicts import compile_break_even, verdict


def export(study: optuna.Study, policy: str = "fastest", out: str | Path | None = None) -> tuple[Path, str]:
    """Write the picked trial's config to `out` (default studies/<name>-trial<N>.yaml); returns (path, header)."""
    trial = pick(study, policy)
    config = TrainConfig.from_dict(trial.user_attrs["config"], source=f"study {study.study_name} trial {trial.number}")
    header = export_header(study, trial, policy)
    path = Path(out) if out else Path("studies") / f"{study.study_name}-trial{trial.number}.yaml"
    config.save(path, header=header)
    return path, header


def export_header(study: optuna.Study, trial: optuna.trial.FrozenTrial, policy: str) -> str:
    """Study, trial, measured throughput, speedup, kNN (with its noise) and hardware, as comment lines."""
    u, s = trial.user_attrs, study.user_attrs
    base, speedup = baseline_trial(study), speedup_of(study, trial)
    kinds, kind = kind_baselines(study), trial_kind(study, trial)
    hw = u.get("hardware") or s.get("hardware") or {}
    against = f"(trial {base.number}, {base.values[0]:.1f} img/s)" if base is not None else ""
    if len(kinds) > 1 and kinds.get(kind) is not None and "trial" not in kinds[kind]:
        against = f"measured on its hardware, {kind} ({kinds[kind]['throughput']:.1f} img/s)"
    elif len(kinds) > 1 and kind in kinds and kinds[kind] is None:
        against = f"{against}, measured on other hardware ({next(iter(kinds))}): no baseline was measured on {kind}"
    lines = [f"Exported by `tuner export --pick {policy}` from study {study.study_name!r}, trial {trial.number} "
             f"({u.get('role', 'search')}).",
             f"Measured throughput: {u.get('throughput_img_s', 0):.1f} img/s (window spread {100 * (u.get('throughput_spread') or 0):.0f}%)"
             + (f", study speedup x{speedup:.2f} over the baseline {against}."
                if speedup is not None and base is not None else ".")]
    per_kind = kinds_text(kinds)
    if per_kind:
        lines.append(per_kind[0].upper() + per_kind[1:] + ".")
    key = knn_key(trial)
    if u.get(key) is not None:
        who = "student" if key.startswith("student") else "teacher"
        knn = f"kNN top-1 ({who}): {u[key]:.2f}% (before training {u.get(key + '_initial') or 0:.2f}%)"
        if s.get("baseline_knn_top1") is not None:
            noise = s.get("knn_noise_points")
            knn += f"; baseline {s['baseline_knn_top1']:.2f}%"
            knn += f", noise {noise:.2f} points" if noise is not None else ", noise not measured"
            if u.get("knn_within_noise") and not s.get("quality_warning"):  # only where the check could have failed
                knn += "; the difference is within noise"
        lines.append(knn + ".")
    quality = verdict(study, trial)
    lines.append(quality.text[0].upper() + quality.text[1:] + ".")
    if quality.failed:
        lines.append("WARNING: a knob of this trial failed parity: it changes what training computes; "
                     "see `tuner status` and the report.")
    compiled = compile_break_even(study, trial)
    if compiled is not None:
        lines.append(compiled["text"] + " (compile time is not in the throughput).")
    if not is_feasible(trial):
        lines.append("WARNING: this trial is not feasible (its kNN or memory constraint is violated).")
    confirm, claim = s.get("confirm"), confirmed_speedup(s.get("confirm"))
    if claim and confirm.get("trial") == trial.number:
        lines.append(f"Confirmed speedup (interleaved A/B, {confirm['rounds']} rounds): x{claim[0]:.2f} ({claim[1]}).")
    elif trial.user_attrs.get("role") == "search":
        lines.append("Speedup unconfirmed: the study's short windows are not a claim; run `tuner confirm` "
                     "to measure it against the baseline, interleaved.")
    if s.get("quality_warning"):
        lines.append(f"WARNING: {s['quality_warning']}.")
    lines.append(f"Hardware: {hw.get('device', '?')}, {hw.get('cpu_model', '?')} x{hw.get('cpu_cores', '?')} cores, "
                 f"torch {hw.get('torch', '?')}, CUDA {hw.get('cuda')}.")
    if trial.params:
        lines.append("Searched knobs: " + ", ".join(f"{k}={v}" for k, v in trial.params.items()) + ".")
    lines.append("Trials measured a short budget; this file keeps the base config's full-training budget. "
                 "Run it with: trainer train THIS_FILE.yaml")
    return "\n".join(lines)
