"""Quality verdicts: what a study can say about a trial's quality, and what it cannot.

A trial differs from the baseline in knobs of three classes (`trainer.knobs`). Exact and approximate
knobs are judged by parity (`tuner explain` checks each knob on the baseline, `tuner confirm` the
winner's whole combination); method knobs need a kNN check with power, and until a study has one
their quality is `unmeasured`, said plainly, never implied by a kNN difference "within noise".

The verdicts live in the study's user attributes: `parity` (per knob, from explain) and
`confirm_parity` (the winner's combination, from confirm). This module reads them for `status`,
export headers and the report, so all three say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from trainer.config import ConfigError, TrainConfig
from trainer.knobs import METHOD, differences, knob_class
from trainer.measure import break_even_steps

#: Fields that say how a trial is measured or seeded, not how it trains.
IGNORED_PREFIXES = ("system.seed", "measure.", "eval.", "checkpoint_every_steps", "budget.time_limit_s",
                    "budget.stop_at_step")


@dataclass
class QualityVerdict:
    """A trial's quality verdict against the baseline."""

    method_changes: list[str] = field(default_factory=list)
    system_changes: list[str] = field(default_factory=list)  # exact and approximate knobs that differ
    parity_failed: dict[str, str] = field(default_factory=dict)  # knob (or "combination") -> the failing line
    parity_ok: list[str] = field(default_factory=list)
    combination_checked: bool = False
    knn_calibrated: bool = False  # the baseline's kNN moved beyond its noise within the trial's budget
    knn_delta_points: float | None = None
    knn_tolerance_points: float | None = None
    knn_steps: int | None = None  # the promotion rung the kNN verdict comes from (None: the trial's own budget)
    knn_lost_at_rung: bool = False  # a rung pruned the trial

    @property
    def text(self) -> str:
        """One line: `quality: parity FAILED ...`, `quality: unmeasured at this budget (method changes: ...)`, ..."""
        parts = []
        if self.parity_failed:
            parts.append("PARITY FAILED (" + "; ".join(f"{k}: {v}" for k, v in self.parity_failed.items()) + ")")
        if self.system_changes and not self.parity_failed:
            if self.combination_checked:
                parts.append(f"parity ok for {', '.join(self.system_changes)}")
            else:
                unchecked = [k for k in self.system_changes if k not in self.parity_ok]
                if unchecked:
                    parts.append(f"parity not checked for {', '.join(unchecked)} (run tuner confirm)")
                else:
                    parts.append(f"parity ok for {', '.join(self.system_changes)} (each alone; "
                                 "run tuner confirm for the combination)")
        if self.method_changes:
            changes = ", ".join(self.method_changes)
            at = f" at {self.knn_steps} steps" if self.knn_steps else ""
            lost = self.knn_delta_points is not None and self.knn_delta_points < -(self.knn_tolerance_points or 0.0)
            if self.knn_lost_at_rung and lost:
                parts.append(f"kNN LOST{at} by method changes ({changes}: {self.knn_delta_points:+.1f} points, beyond "
                             f"the tolerance {self.knn_tolerance_points:.1f}; pruned at that rung)")
            elif not self.knn_calibrated or self.knn_delta_points is None:
                parts.append(f"unmeasured {at.strip() or 'at this budget'} (method changes: {changes})")
            elif not lost:
                parts.append(f"kNN within tolerance{at} for method changes ({changes}: {self.knn_delta_points:+.1f} "
                             f"points, tolerance {self.knn_tolerance_points:.1f})")
            else:
                parts.append(f"kNN LOST by method changes ({changes}: {self.knn_delta_points:+.1f} points, "
                             f"beyond the tolerance {self.knn_tolerance_points:.1f})")
        if not parts:
            return "quality: the baseline's configuration"
        return "quality: " + "; ".join(parts)

    @property
    def failed(self) -> bool:
        return bool(self.parity_failed)

    @property
    def short(self) -> str:
        """A word or two for a dashboard card."""
        text = self.text
        if self.failed:
            return "parity FAILED"
        if "kNN LOST" in text:
            return "kNN LOST"
        if "unmeasured" in text:
            return "unmeasured"
        if "kNN within tolerance" in text:
            return "kNN within tolerance"
        return "parity" if self.system_changes else "-"


def compile_break_even(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
    """For a trial that compiles: the compile time (measured apart from throughput) and after how many
    optimizer steps the compiled run is ahead of running eager. The eager reference is explain's
    measurement of the same path without `system.compile` where there is one, else the baseline."""
    u, attrs = trial.user_attrs, study.user_attrs
    config = u.get("config") or {}
    compile_s, throughput = u.get("compile_s"), u.get("throughput_img_s")
    if (config.get("system") or {}).get("compile", "off") == "off" or not compile_s or not throughput:
        return None
    optim = config.get("optim") or {}
    images = u.get("images_per_step") or optim.get("batch_size", 0) * optim.get("accumulation_steps", 1)
    reference, against = attrs.get("baseline_throughput_img_s"), "the baseline"
    record = attrs.get("explain") or {}
    if record.get("winner_trial") == trial.number:
        for step in record.get("steps", []):
            if "system.compile" in step["knob"].split(", ") and step.get("step_speedup"):
                reference = step["throughput_img_s"] / step["step_speedup"]
                against = "the same configuration without compile (tuner explain)"
    if not reference or not images:
        return None
    steps = break_even_steps(compile_s, images / reference, images / throughput)
    text = (f"torch.compile took {compile_s:.0f} s; " +
            (f"ahead of {against} after about {steps:,.0f} steps" if steps is not None
             else f"never ahead of {against} (not faster per step)"))
    return {"compile_s": compile_s, "against": against, "break_even_steps": steps, "text": text}


def changed_knobs(base: dict[str, Any], other: dict[str, Any]) -> dict[str, str]:
    """{path: class} of every knob in which `other` differs from `base` (plain config data)."""
    out = {}
    for path in differences(base, other):
        if path.startswith(IGNORED_PREFIXES):
            continue
        try:
            out[path] = knob_class(path, base)
        except ConfigError:  # not a knob (e.g. the data set): it changes what is learned
            out[path] = METHOD
    return out


def verdict(study: optuna.Study, trial: FrozenTrial) -> QualityVerdict:
    """The quality verdict of `trial` against the study's baseline, from what the study stores."""
    from tuner.promotion import rung_records
    from tuner.select import baseline_trial

    base = baseline_trial(study)
    result = QualityVerdict()
    if base is None or not trial.user_attrs.get("config") or not base.user_attrs.get("config"):
        return result
    changes = changed_knobs(base.user_attrs["config"], trial.user_attrs["config"])
    result.method_changes = [k for k, c in changes.items() if c == METHOD]
    attrs = study.user_attrs
    result.knn_calibrated = bool((attrs.get("knn_power") or {}).get("calibrated"))
    result.knn_delta_points = trial.user_attrs.get("knn_delta_points")
    result.knn_tolerance_points = attrs.get("knn_tolerance_effective")
    records = rung_records(study).get(trial.number)
    if records:  # the longest budget it reached decides
        last = records[-1].user_attrs
        result.knn_steps = last.get("rung_steps")
        result.knn_calibrated = bool(last.get("calibrated"))
        result.knn_delta_points = last.get("knn_delta_points")
        result.knn_tolerance_points = last.get("tolerance_points")
        result.knn_lost_at_rung = records[-1].state == optuna.trial.TrialState.PRUNED
    result.system_changes = [k for k, c in changes.items() if c != METHOD]
    for knob, record in (study.user_attrs.get("parity") or {}).items():
        if not set(knob.split(", ")) & set(result.system_changes):
            continue
        if record.get("verdict") == "ok":
            result.parity_ok.extend(knob.split(", "))
        else:
            result.parity_failed[knob] = record.get("line", "failed")
    combo = (study.user_attrs.get("confirm_parity") or {})
    if combo.get("trial") == trial.number:
        result.combination_checked = True
        if combo.get("verdict") != "ok":
            result.parity_failed["combination"] = combo.get("line", "failed")
    return result


def parity_failures(study: optuna.Study) -> list[str]:
    """'knob: line' for every knob (and the confirmed combination) that failed parity in this study."""
    out = [f"{k}: {v.get('line')}" for k, v in (study.user_attrs.get("parity") or {}).items() if v.get("verdict") != "ok"]
    combo = study.user_attrs.get("confirm_parity") or {}
    if combo and combo.get("verdict") != "ok":
        out.append(f"trial {combo.get('trial')}'s combination: {combo.get('line')}")
    return out


def system_knobs_at_baseline(winner: TrainConfig, baseline: TrainConfig) -> TrainConfig:
    """`winner` with every exact and approximate knob put back to the baseline's value (method knobs kept):
    the reference that parity of the winner's whole combination of system knobs is checked against."""
    base_data = baseline.to_dict()
    flat_base = {}
    for path in differences(base_data, winner.to_dict()):
        if path.startswith(IGNORED_PREFIXES):
            continue
        try:
            cls = knob_class(path, winner.to_dict())
        except ConfigError:
            continue
        if cls != METHOD:
            node: Any = base_data
            for part in path.split("."):
                node = node[part]
            flat_base[path] = node
    return winner.with_overrides(flat_base, source="winner with its system knobs at the baseline's values")

